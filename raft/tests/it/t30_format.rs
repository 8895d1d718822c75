//! Committed format fixtures: a log entry, a reply to a forwarded write and a snapshot file, written
//! by the code of commit 6808560 (before the architecture rework of issue #10), must still decode to
//! the same values, and values built today must still encode to the same bytes. A change to the
//! on-disk or wire format then fails here instead of slipping in unnoticed; a deliberate change adds
//! new fixtures beside these and keeps the old ones decoding.
//!
//! `COFFER_WRITE_FIXTURES=1 cargo test -p coffer-raft --test it t30_format` rewrites the files
//! (only ever for a new format version, never to make this test pass).

use std::path::PathBuf;

use coffer_raft::{
    ClusterRecord, Command, CreateKey, DeleteKey, InitCluster, KeyVersion, KeyVersionRecord, KeyringRecord,
    KeyringVersion, NamedKeyRecord, NamedKeyType, NodeId, Op, Outcome, PutSecret, Rejection, Response, RotateKey,
    SealedValue, SecretVersion, SetVersionState, StateMachine, StateReader, Store, TypeConfig, UnixMillis,
    UpdateKeyConfig, VersionState,
};
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};

/// The fixtures of the clone being tested. `cargo test` sets `CARGO_MANIFEST_DIR` at run time too;
/// the compile-time path can name another clone when a target directory is shared and the test
/// binary was not rebuilt (it happened: CI clones elsewhere into the same `/var/tmp` target).
fn fixtures() -> PathBuf {
    let manifest =
        std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), PathBuf::from);
    manifest.join("tests/fixtures")
}

fn writing() -> bool {
    std::env::var_os("COFFER_WRITE_FIXTURES").is_some()
}

fn sealed(tag: u8) -> SealedValue {
    SealedValue { keyring_version: KeyringVersion(1), wrapped_data_key: vec![tag; 60], ciphertext: vec![tag; 20] }
}

fn key_record() -> NamedKeyRecord {
    NamedKeyRecord {
        key_type: NamedKeyType::Aes256Gcm,
        exportable: false,
        created_at_ms: UnixMillis(2000),
        min_decryption_version: KeyVersion(1),
        min_encryption_version: KeyVersion(1),
        deletion_allowed: false,
        auto_rotate_period_ms: 0,
        versions: [(
            KeyVersion(1),
            KeyVersionRecord {
                created_at_ms: UnixMillis(2000),
                keyring_version: KeyringVersion(1),
                wrapped: vec![9; 60],
                public_key: vec![],
            },
        )]
        .into(),
        generation: 1,
    }
}

/// Every kind of operation, in one batch entry, as format 1 proposed them.
fn commands() -> Vec<Op> {
    vec![
        Op::InitCluster(InitCluster {
            cluster: ClusterRecord {
                cluster_id: "c0ffee".into(),
                root_kcv: "0011223344556677".into(),
                created_at_ms: UnixMillis(1),
            },
            keyring: KeyringRecord { version: KeyringVersion(1), wrapped: vec![1; 40], created_at_ms: UnixMillis(1) },
        }),
        Op::PutSecret(PutSecret {
            request_id: Some("req-1".into()),
            path: crate::must_path("app/db"),
            version: SecretVersion(1),
            cas: Some(SecretVersion(0)),
            max_versions: Some(5),
            default_max_versions: 10,
            sealed: sealed(1),
            at_ms: UnixMillis(1001),
        }),
        Op::PutSecret(PutSecret {
            request_id: None,
            path: crate::must_path("app/db"),
            version: SecretVersion(2),
            cas: None,
            max_versions: None,
            default_max_versions: 10,
            sealed: sealed(2),
            at_ms: UnixMillis(1002),
        }),
        Op::SetVersionState(SetVersionState {
            path: crate::must_path("app/db"),
            versions: vec![SecretVersion(1)],
            state: VersionState::Deleted,
            at_ms: UnixMillis(1003),
        }),
        Op::CreateKey(CreateKey { name: crate::must_name("orders"), record: key_record() }),
        Op::RotateKey(RotateKey {
            name: crate::must_name("orders"),
            version: KeyVersion(2),
            material: KeyVersionRecord {
                created_at_ms: UnixMillis(3000),
                keyring_version: KeyringVersion(1),
                wrapped: vec![8; 60],
                public_key: vec![],
            },
        }),
        Op::UpdateKeyConfig(UpdateKeyConfig {
            name: crate::must_name("orders"),
            min_decryption_version: Some(KeyVersion(1)),
            min_encryption_version: None,
            deletion_allowed: Some(true),
            auto_rotate_period_ms: Some(86_400_000),
        }),
        Op::CreateKey(CreateKey {
            name: crate::must_name("gone"),
            record: NamedKeyRecord { deletion_allowed: true, ..key_record() },
        }),
        Op::DeleteKey(DeleteKey { name: crate::must_name("gone") }),
    ]
}

fn entry(index: u64, command: Command) -> Entry<TypeConfig> {
    Entry { log_id: LogId::new(CommittedLeaderId::new(3, NodeId(1)), index), payload: EntryPayload::Normal(command) }
}

/// Compares `bytes` with the fixture file, or writes it when asked to.
fn check_bytes(name: &str, bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
    let path = fixtures().join(name);
    if writing() {
        std::fs::create_dir_all(fixtures())?;
        std::fs::write(&path, bytes)?;
    }
    let stored = std::fs::read(&path)?;
    Ok(stored)
}

#[test]
fn a_log_entry_of_every_command_keeps_its_encoding() -> anyhow::Result<()> {
    let expected = entry(7, Command::Batch(commands()));
    let stored = check_bytes("entry-batch-v1.postcard", &postcard::to_allocvec(&expected)?)?;
    let decoded: Entry<TypeConfig> = postcard::from_bytes(&stored)?;
    assert_eq!(decoded.log_id, expected.log_id);
    match (&decoded.payload, &expected.payload) {
        (EntryPayload::Normal(got), EntryPayload::Normal(want)) => assert_eq!(got, want),
        _ => anyhow::bail!("the fixture entry is not a normal entry"),
    }
    assert_eq!(postcard::to_allocvec(&expected)?, stored, "today's encoding differs from the committed one");
    // A lone command is its own entry.
    let Op::PutSecret(put) = commands().remove(1) else { anyhow::bail!("the second fixture op is a put") };
    let lone = entry(8, Command::PutSecret(put));
    let stored = check_bytes("entry-put-v1.postcard", &postcard::to_allocvec(&lone)?)?;
    assert_eq!(postcard::to_allocvec(&lone)?, stored);
    Ok(())
}

#[test]
fn a_batch_reply_keeps_its_encoding() -> anyhow::Result<()> {
    // What the leader answers a forwarded batch with, and what the requests column family holds.
    let expected = Response::Batch(vec![
        Outcome::Applied,
        Outcome::Put { version: SecretVersion(1), created_at_ms: UnixMillis(1001) },
        Outcome::Rejected(Rejection::CasMismatch { expected: SecretVersion(0), current: SecretVersion(1) }),
        Outcome::Rejected(Rejection::VersionTaken { version: SecretVersion(2), current: SecretVersion(2) }),
        Outcome::Rejected(Rejection::SecretNotFound { path: "p".into() }),
        Outcome::Rejected(Rejection::VersionNotFound { path: "p".into(), version: SecretVersion(4) }),
        Outcome::Rejected(Rejection::VersionDestroyed { path: "p".into(), version: SecretVersion(4) }),
        Outcome::Rejected(Rejection::AlreadyInitialized),
        Outcome::Rejected(Rejection::KeyExists { name: "k".into() }),
        Outcome::Rejected(Rejection::KeyNotFound { name: "k".into() }),
        Outcome::Rejected(Rejection::NestedBatch),
    ]);
    let stored = check_bytes("response-batch-v1.postcard", &postcard::to_allocvec(&expected)?)?;
    assert_eq!(postcard::from_bytes::<Response>(&stored)?, expected);
    assert_eq!(postcard::to_allocvec(&expected)?, stored);
    Ok(())
}

#[tokio::test]
async fn a_snapshot_file_still_installs() -> anyhow::Result<()> {
    let name = "snapshot-v1.snap";
    if writing() {
        let dir = tempfile::tempdir()?;
        let mut sm = StateMachine::new(Store::open(dir.path())?);
        let responses = sm.apply(vec![entry(1, Command::Batch(commands()))]).await?;
        anyhow::ensure!(
            matches!(&responses[..], [Response::Batch(items)] if items.iter().all(|r| !matches!(r, Outcome::Rejected(_)))),
            "every fixture command applies: {responses:?}"
        );
        sm.get_snapshot_builder().await.build_snapshot().await?;
        std::fs::copy(dir.path().join("snapshots/current.snap"), fixtures().join(name))?;
    }
    // A node restarting with this snapshot file reads it back; a new member installs it.
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    std::fs::copy(fixtures().join(name), dir.path().join("snapshots/current.snap"))?;
    let mut sm = StateMachine::new(store.clone());
    let snapshot = sm.get_current_snapshot().await?.ok_or_else(|| anyhow::anyhow!("no snapshot read back"))?;
    assert_eq!(snapshot.meta.last_log_id.map(|l| l.index), Some(1));
    let fresh = tempfile::tempdir()?;
    let store = Store::open(fresh.path())?;
    let mut sm = StateMachine::new(store.clone());
    sm.install_snapshot(&snapshot.meta, snapshot.snapshot).await?;
    let reader = StateReader::new(store);

    assert_eq!(reader.cluster()?.map(|c| c.root_kcv), Some("0011223344556677".into()));
    assert_eq!(reader.keyrings()?.len(), 1);
    let meta = reader.secret(&crate::must_path("app/db"))?.ok_or_else(|| anyhow::anyhow!("secret missing"))?;
    assert_eq!((meta.current_version, meta.max_versions), (SecretVersion(2), 5));
    assert_eq!(meta.versions[&SecretVersion(1)].deleted_at_ms, Some(UnixMillis(1003)));
    let read =
        reader.secret_version(&crate::must_path("app/db"), None)?.ok_or_else(|| anyhow::anyhow!("no version"))?;
    assert_eq!((read.version, read.sealed), (SecretVersion(2), Some(sealed(2))));
    let key = reader.named_key(&crate::must_name("orders"))?.ok_or_else(|| anyhow::anyhow!("key missing"))?;
    assert_eq!(
        (key.primary(), key.deletion_allowed, key.auto_rotate_period_ms, key.generation),
        (KeyVersion(2), true, 86_400_000, 3)
    );
    assert!(reader.named_key(&crate::must_name("gone"))?.is_none());
    Ok(())
}
