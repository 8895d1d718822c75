use coffer_raft::{
    ClusterRecord, Command, InitCluster, KeyringRecord, KeyringVersion, NodeId, Op, Outcome, PutSecret, Rejection,
    RequestId, Response, SealedValue, SecretVersion, SetVersionState, StateMachine, StateReader, Store, TypeConfig,
    UnixMillis, VersionState, Write,
};
use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};

struct Fixture {
    _dir: tempfile::TempDir,
    sm: StateMachine,
    reader: StateReader,
    next_index: u64,
}

impl Fixture {
    fn new() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        Ok(Fixture { _dir: dir, sm: StateMachine::new(store.clone()), reader: StateReader::new(store), next_index: 1 })
    }

    /// Applies the commands in one `apply` call, as openraft does with a batch of committed entries.
    async fn apply(&mut self, commands: Vec<Command>) -> anyhow::Result<Vec<Response>> {
        let entries: Vec<Entry<TypeConfig>> = commands
            .into_iter()
            .map(|c| {
                let index = self.next_index;
                self.next_index += 1;
                Entry {
                    log_id: LogId::new(CommittedLeaderId::new(1, NodeId(0)), index),
                    payload: EntryPayload::Normal(c),
                }
            })
            .collect();
        Ok(self.sm.apply(entries).await?)
    }
}

fn sealed(tag: u8) -> SealedValue {
    SealedValue { keyring_version: KeyringVersion(1), wrapped_data_key: vec![tag; 60], ciphertext: vec![tag; 20] }
}

fn put(path: &str, version: u64, cas: Option<u64>, id: Option<&str>) -> PutSecret {
    PutSecret {
        request_id: id.map(str::to_owned),
        path: crate::must_path(path),
        version: SecretVersion(version),
        cas: cas.map(SecretVersion),
        max_versions: None,
        default_max_versions: 3,
        sealed: sealed(version as u8),
        at_ms: UnixMillis(1000 + version),
    }
}

/// The apply rules of each domain are unit-tested beside them (`raft/src/state/`); these tests
/// drive openraft's `apply` with whole entries, as a node does.
#[tokio::test]
async fn entries_of_writes_apply_in_order_each_on_its_own() -> anyhow::Result<()> {
    let mut f = Fixture::new()?;
    let writes = Command::Writes(vec![
        Write::new(Op::PutSecret(put("p", 1, None, None))),
        Write::new(Op::PutSecret(put("p", 1, None, None))),
        Write { request_id: RequestId::parse("r")?, op: Op::PutSecret(put("p", 2, Some(1), None)) },
        Write::new(Op::PutSecret(put("q", 1, Some(5), None))),
    ]);
    let retry =
        Command::Writes(vec![Write { request_id: RequestId::parse("r")?, op: Op::PutSecret(put("p", 3, None, None)) }]);
    let r = f.apply(vec![writes, retry]).await?;
    assert_eq!(
        r,
        vec![
            Response::Batch(vec![
                Outcome::Put { version: SecretVersion(1), created_at_ms: UnixMillis(1001) },
                Outcome::Rejected(Rejection::VersionTaken { version: SecretVersion(1), current: SecretVersion(1) }),
                Outcome::Put { version: SecretVersion(2), created_at_ms: UnixMillis(1002) },
                Outcome::Rejected(Rejection::CasMismatch { expected: SecretVersion(5), current: SecretVersion(0) }),
            ]),
            Response::Batch(vec![Outcome::Put { version: SecretVersion(2), created_at_ms: UnixMillis(1002) }]),
        ]
    );
    assert_eq!(
        f.reader.secret(&crate::must_path("p"))?.map(|m| m.current_version),
        Some(SecretVersion(2)),
        "the retry wrote nothing"
    );
    assert!(f.reader.secret(&crate::must_path("q"))?.is_none(), "a rejected item wrote nothing");
    Ok(())
}

/// Entries written by the first release (one command per entry, or a batch of them, a put's
/// request id inside the put) still apply as they did.
#[tokio::test]
async fn format_1_entries_still_apply() -> anyhow::Result<()> {
    let mut f = Fixture::new()?;
    let init = Command::InitCluster(InitCluster {
        cluster: ClusterRecord { cluster_id: "c1".into(), root_kcv: "00".into(), created_at_ms: UnixMillis(1) },
        keyring: KeyringRecord { version: KeyringVersion(1), wrapped: vec![1; 40], created_at_ms: UnixMillis(1) },
    });
    let r = f
        .apply(vec![
            init.clone(),
            init,
            Command::PutSecret(put("x", 1, None, Some("req-1"))),
            Command::PutSecret(put("x", 2, None, Some("req-1"))),
            Command::Batch(vec![
                Op::PutSecret(put("x", 2, None, None)),
                Op::PutSecret(put("done", 1, None, Some("req-9"))),
            ]),
            Command::Batch(vec![Op::PutSecret(put("done", 2, None, Some("req-9")))]),
            Command::SetVersionState(SetVersionState {
                path: crate::must_path("x"),
                versions: vec![],
                state: VersionState::Deleted,
                at_ms: UnixMillis(5000),
            }),
        ])
        .await?;
    assert_eq!(r[0], Response::Applied);
    assert_eq!(r[1], Response::Rejected(Rejection::AlreadyInitialized));
    assert_eq!(r[2], r[3], "a format-1 request id applies once");
    assert_eq!(
        r[5],
        Response::Batch(vec![Outcome::Put { version: SecretVersion(1), created_at_ms: UnixMillis(1001) }]),
        "inside a format-1 batch too"
    );
    assert_eq!(f.reader.secret(&crate::must_path("done"))?.map(|m| m.current_version), Some(SecretVersion(1)));
    let x = f.reader.secret(&crate::must_path("x"))?.expect("the secret");
    assert_eq!(
        x.versions[&SecretVersion(2)].deleted_at_ms,
        Some(UnixMillis(5000)),
        "an empty list meant the current version"
    );
    assert_eq!(f.reader.cluster()?.map(|c| c.cluster_id), Some("c1".into()));
    Ok(())
}

#[tokio::test]
async fn list_pages() -> anyhow::Result<()> {
    let mut f = Fixture::new()?;
    let puts =
        ["app/a", "app/b", "app/c", "apq", "db/x"].iter().map(|p| Write::new(Op::PutSecret(put(p, 1, None, None))));
    f.apply(vec![Command::Writes(puts.collect())]).await?;
    assert_eq!(f.reader.list("app/", None, 2)?, vec!["app/a", "app/b"]);
    assert_eq!(f.reader.list("app/", Some("app/b"), 2)?, vec!["app/c"]);
    assert_eq!(f.reader.list("", Some("apq"), 10)?, vec!["db/x"]);
    Ok(())
}
