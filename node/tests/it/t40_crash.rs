use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{get, put, TestNode};

/// An acknowledged write: path, version, value.
type Acked = (String, u64, Vec<u8>);

/// kill -9 the node while several clients write; every write that was acknowledged reads back
/// after a restart.
#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_writes_survive_kill_9() -> anyhow::Result<()> {
    let mut node = TestNode::must_start()?;
    let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
    let mut writers = Vec::new();
    for w in 0..4 {
        let mut c = node.client().await?;
        let acked = acked.clone();
        writers.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            for i in 0..5000u32 {
                if Instant::now() > deadline {
                    break;
                }
                let path = format!("crash/w{w}/k{}", i % 7);
                let value = format!("w{w}-i{i}").into_bytes();
                // Keep every version: at most 5000 / 7 per key, far below 1000.
                let mut req = put(&path, &value, None);
                req.max_versions = Some(1000);
                match c.put(req).await {
                    Ok(reply) => acked.lock().expect("lock").push((path, reply.into_inner().version, value)),
                    Err(_) => break, // the node is gone
                }
            }
        }));
    }
    // Let the writers get going, then kill mid-stream.
    let start = Instant::now();
    while acked.lock().expect("lock").len() < 200 && start.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    node.must_kill9()?;
    for w in writers {
        w.await?;
    }
    let acked = std::mem::take(&mut *acked.lock().expect("lock"));
    assert!(acked.len() >= 200, "only {} writes were acknowledged before the kill", acked.len());

    node.must_restart()?;
    let mut c = node.client().await?;
    for (path, version, value) in &acked {
        match c.get(get(path, Some(*version))).await {
            Ok(reply) => assert_eq!(&reply.into_inner().value, value, "{path} v{version}"),
            Err(status) => panic!("acknowledged write {path} v{version} lost: {status}"),
        }
    }
    Ok(())
}
