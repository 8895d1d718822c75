use crate::InProcessNode;

fn text(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_round_trips() -> anyhow::Result<()> {
    let node = InProcessNode::must_start().await?;

    // Value from stdin, from an argument, from a file.
    let out = node.cli(&["secret", "put", "db/password"], Some(b"from-stdin"))?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(text(&out).trim(), "db/password: version 1");
    let out = node.cli(&["secret", "put", "db/password", "from-arg"], None)?;
    assert!(out.status.success());
    let file = node.path().join("value.bin");
    std::fs::write(&file, b"from-file\n\x00\xff")?;
    let out =
        node.cli(&["secret", "put", "db/password", "--file", file.to_str().unwrap_or_default(), "--cas", "2"], None)?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // get prints the raw bytes, nothing added.
    let out = node.cli(&["secret", "get", "db/password"], None)?;
    assert!(out.status.success());
    assert_eq!(out.stdout, b"from-file\n\x00\xff");
    let out = node.cli(&["secret", "get", "db/password", "--version", "1"], None)?;
    assert_eq!(out.stdout, b"from-stdin");

    let out = node.cli(&["secret", "get", "db/password", "--version", "2", "--output", "json"], None)?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(json["value"], "from-arg");
    assert_eq!(json["version"], 2);
    let out = node.cli(&["secret", "get", "db/password", "-o", "json"], None)?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert!(json["value_base64"].is_string(), "non-UTF-8 values come base64-encoded: {json}");

    // Wrong CAS: exit 1 and the status on stderr.
    let out = node.cli(&["secret", "put", "db/password", "x", "--cas", "1"], None)?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("FailedPrecondition"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = node.cli(&["secret", "delete", "db/password", "--versions", "1,2"], None)?;
    assert!(out.status.success());
    let out = node.cli(&["secret", "describe", "db/password", "-o", "json"], None)?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let states: Vec<_> =
        json["versions"].as_array().map(|a| a.iter().map(|v| v["state"].clone()).collect()).unwrap_or_default();
    assert_eq!(states, vec!["deleted", "deleted", "live"]);
    let out = node.cli(&["secret", "undelete", "db/password", "--versions", "2"], None)?;
    assert!(out.status.success());
    let out = node.cli(&["secret", "destroy", "db/password", "--versions", "1"], None)?;
    assert!(out.status.success());
    let out = node.cli(&["secret", "describe", "db/password"], None)?;
    let described = text(&out);
    assert!(described.contains("newest version:  3") && described.contains("CURRENT:         3"), "{described}");
    assert!(described.contains("destroyed") && described.contains("live"), "{described}");

    let out = node.cli(&["secret", "get", "db/password", "--version", "1"], None)?;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("destroyed"));

    node.cli(&["secret", "put", "app/a", "1"], None)?;
    node.cli(&["secret", "put", "app/b", "2"], None)?;
    let out = node.cli(&["secret", "list", "app/", "--page-size", "1"], None)?;
    assert_eq!(text(&out), "app/a\napp/b\n");
    let out = node.cli(&["secret", "list", "-o", "json"], None)?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(json["paths"].as_array().map(Vec::len), Some(3));

    let out = node.cli(&["secret", "put", "bad path", "x"], None)?;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("InvalidArgument"));
    Ok(())
}

#[test]
fn cli_explains_an_unreachable_server() -> anyhow::Result<()> {
    let out = std::process::Command::new(crate::coffer_bin())
        .args(["secret", "get", "x"])
        .env("COFFER_ADDR", "http://127.0.0.1:1")
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("COFFER_ADDR"), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}
