//! Audit files (issue #13, first part): the spool's chain as `coffer audit verify` checks it,
//! against each way of tampering with a file that the chain alone can show.

use coffer_node::audit::spool::Spool;

use crate::coffer_bin;

fn verify(file: &std::path::Path) -> anyhow::Result<(bool, String)> {
    let out = std::process::Command::new(coffer_bin()).args(["audit", "verify"]).arg(file).output()?;
    Ok((out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned()))
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_verify_passes_a_real_spool_and_names_each_tampering() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("audit.log");
    let spool = Spool::open(&path)?;
    for i in 0..50 {
        spool.append(format!("{{\"method\":\"coffer.v1.Secrets/Get\",\"path\":\"app/{i}\"}}")).await?;
    }
    drop(spool);
    let (ok, said) = verify(&path)?;
    assert!(ok && said.contains("50 records, seq 1..50, chain intact"), "{said}");
    let lines: Vec<String> = std::fs::read_to_string(&path)?.lines().map(|l| format!("{l}\n")).collect();
    let tampered = |name: &str, lines: Vec<String>| -> anyhow::Result<(bool, String)> {
        let file = dir.path().join(name);
        std::fs::write(&file, lines.concat())?;
        verify(&file)
    };
    let mut edited = lines.clone();
    edited[9] = edited[9].replace("app/9", "app/X");
    let (ok, said) = tampered("edited", edited)?;
    assert!(!ok && said.contains("line 10 (seq 10): its content does not match its hash"), "{said}");
    let mut removed = lines.clone();
    removed.remove(20);
    let (ok, said) = tampered("removed", removed)?;
    assert!(!ok && said.contains("line 21 (seq 22): does not follow seq 20"), "{said}");
    let mut reordered = lines;
    reordered.swap(30, 31);
    let (ok, said) = tampered("reordered", reordered)?;
    assert!(!ok && said.contains("does not follow"), "{said}");
    Ok(())
}
