use std::path::Path;

use coffer_raft::{StateReader, Store};

use crate::{get, put, TestNode};

fn files_containing(dir: &Path, needle: &[u8]) -> anyhow::Result<Vec<String>> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                stack.push(entry.path());
            } else if std::fs::read(entry.path())?.windows(needle.len()).any(|w| w == needle) {
                hits.push(entry.path().display().to_string());
            }
        }
    }
    Ok(hits)
}

/// A known marker value never reaches the data directory in plaintext: not in the Raft log, the
/// WAL, the SST files after flush and compaction, or the snapshots.
#[tokio::test(flavor = "multi_thread")]
async fn no_plaintext_under_the_data_directory() -> anyhow::Result<()> {
    let mut node = TestNode::must_start()?;
    let marker = b"MARKER-7f3a9c1e-plaintext-must-not-persist";
    {
        let mut c = node.client().await?;
        for i in 0..20 {
            c.put(put(&format!("marker/{i}"), marker, None)).await?;
        }
        assert_eq!(c.get(get("marker/3", None)).await?.into_inner().value, marker);
    }
    // Check while running (WAL and log), then after a clean stop with flush and compaction.
    assert_eq!(files_containing(&node.data_dir(), marker)?, Vec::<String>::new());
    node.must_stop()?;
    let store = Store::open(&node.data_dir())?;
    StateReader::new(store.clone()).flush_and_compact()?;
    drop(store);
    let sst_count = files_containing(&node.data_dir(), b"marker/3")?.len();
    assert!(sst_count > 0, "the check must see the stored records (their paths are not secret)");
    assert_eq!(files_containing(&node.data_dir(), marker)?, Vec::<String>::new());
    assert_eq!(
        files_containing(node.path(), marker)?,
        Vec::<String>::new(),
        "nor anywhere else in the node's directory"
    );
    Ok(())
}
