use std::process::{Command, Stdio};

use crate::{coffer_bin, get, put, TestNode};

/// A node started against a token whose root key is not the one its cluster recorded refuses to
/// start, and says why.
#[tokio::test(flavor = "multi_thread")]
async fn a_different_root_key_is_refused_at_start() -> anyhow::Result<()> {
    let mut node = TestNode::must_start()?;
    node.client().await?.put(put("k/v", b"value", None)).await?;
    node.must_stop()?;

    // Same token label and PIN, but a new token with a new root key.
    node.must_replace_token()?;
    let out = Command::new(coffer_bin())
        .args(["server", "--config"])
        .arg(node.path().join("node.toml"))
        .env("SOFTHSM2_CONF", node.path().join("softhsm2.conf"))
        .stdout(Stdio::null())
        .output()?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("KCV") && stderr.contains("refusing to start"), "{stderr}");
    Ok(())
}

/// The same root key in a copied token (as on another machine) is accepted, and data reads back.
#[tokio::test(flavor = "multi_thread")]
async fn a_copy_of_the_token_is_the_same_root_key() -> anyhow::Result<()> {
    let mut node = TestNode::must_start()?;
    node.client().await?.put(put("k/v", b"value", None)).await?;
    node.must_stop()?;
    let tokens = node.path().join("tokens");
    let moved = node.path().join("tokens-copy");
    std::fs::rename(&tokens, &moved)?;
    coffer_testkit::copy_dir(&moved, &tokens)?;
    std::fs::remove_dir_all(&moved)?;
    node.must_restart()?;
    assert_eq!(node.client().await?.get(get("k/v", None)).await?.into_inner().value, b"value");
    Ok(())
}
