use coffer_raft::{
    ClusterRecord, Command, KeyringRecord, Rejection, Response, SealedValue, StateMachine, StateReader, Store,
    TypeConfig, VersionState,
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
                Entry { log_id: LogId::new(CommittedLeaderId::new(1, 0), index), payload: EntryPayload::Normal(c) }
            })
            .collect();
        Ok(self.sm.apply(entries).await?)
    }
}

fn sealed(tag: u8) -> SealedValue {
    SealedValue { keyring_version: 1, wrapped_data_key: vec![tag; 60], ciphertext: vec![tag; 20] }
}

fn put(path: &str, version: u64, cas: Option<u64>, id: Option<&str>) -> Command {
    Command::PutSecret {
        request_id: id.map(str::to_owned),
        path: path.to_owned(),
        version,
        cas,
        max_versions: None,
        default_max_versions: 3,
        sealed: sealed(version as u8),
        at_ms: 1000 + version,
    }
}

#[tokio::test]
async fn versions_cas_and_pruning() -> anyhow::Result<()> {
    let mut f = Fixture::new()?;
    let r = f.apply(vec![put("a/b", 1, Some(0), None), put("a/b", 2, None, None), put("a/b", 2, None, None)]).await?;
    assert_eq!(r[0], Response::Put { version: 1, created_at_ms: 1001 });
    assert_eq!(r[1], Response::Put { version: 2, created_at_ms: 1002 });
    assert_eq!(
        r[2],
        Response::Rejected(Rejection::VersionTaken { version: 2, current: 2 }),
        "same batch sees earlier writes"
    );

    let r = f.apply(vec![put("a/b", 3, Some(1), None), put("a/b", 1, Some(0), None)]).await?;
    assert_eq!(r[0], Response::Rejected(Rejection::CasMismatch { expected: 1, current: 2 }));
    assert_eq!(r[1], Response::Rejected(Rejection::CasMismatch { expected: 0, current: 2 }));
    assert_eq!(f.reader.secret("a/b")?.map(|m| m.current_version), Some(2), "rejections wrote nothing");

    f.apply(vec![put("a/b", 3, Some(2), None), put("a/b", 4, None, None)]).await?;
    let meta = f.reader.secret("a/b")?.expect("secret exists");
    assert_eq!(meta.versions.keys().copied().collect::<Vec<_>>(), vec![2, 3, 4], "max_versions 3 pruned version 1");
    let (_, _, gone) = f.reader.secret_version("a/b", Some(1))?.expect("meta");
    assert!(gone.is_none(), "pruned ciphertext is removed");
    let (_, v, kept) = f.reader.secret_version("a/b", None)?.expect("meta");
    assert_eq!((v, kept), (4, Some(sealed(4))));
    Ok(())
}

#[tokio::test]
async fn request_id_applies_once() -> anyhow::Result<()> {
    let mut f = Fixture::new()?;
    let first = f.apply(vec![put("x", 1, None, Some("req-1"))]).await?;
    // The retry was sealed for the next version, as a client retry after a lost answer would be.
    let retry = f.apply(vec![put("x", 2, None, Some("req-1"))]).await?;
    assert_eq!(first, retry);
    assert_eq!(f.reader.secret("x")?.map(|m| m.current_version), Some(1));
    Ok(())
}

#[tokio::test]
async fn a_batch_applies_its_items_in_order_each_on_its_own() -> anyhow::Result<()> {
    let mut f = Fixture::new()?;
    f.apply(vec![put("done", 1, None, Some("req-9"))]).await?;
    let batch = Command::Batch(vec![
        put("p", 1, None, None),
        put("p", 1, None, None),
        put("p", 2, Some(1), None),
        put("q", 1, Some(5), None),
        put("done", 2, None, Some("req-9")),
        Command::Batch(vec![put("r", 1, None, None)]),
    ]);
    let r = f.apply(vec![batch]).await?;
    assert_eq!(
        r,
        vec![Response::Batch(vec![
            Response::Put { version: 1, created_at_ms: 1001 },
            Response::Rejected(Rejection::VersionTaken { version: 1, current: 1 }),
            Response::Put { version: 2, created_at_ms: 1002 },
            Response::Rejected(Rejection::CasMismatch { expected: 5, current: 0 }),
            Response::Put { version: 1, created_at_ms: 1001 },
            Response::Rejected(Rejection::NestedBatch),
        ])]
    );
    assert_eq!(f.reader.secret("p")?.map(|m| m.current_version), Some(2), "later items see earlier ones");
    assert!(f.reader.secret("q")?.is_none(), "a rejected item wrote nothing");
    assert_eq!(f.reader.secret("done")?.map(|m| m.current_version), Some(1), "the request id held inside a batch");
    assert!(f.reader.secret("r")?.is_none(), "a nested batch is refused whole");
    Ok(())
}

#[tokio::test]
async fn delete_undelete_destroy() -> anyhow::Result<()> {
    let mut f = Fixture::new()?;
    f.apply(vec![put("s", 1, None, None), put("s", 2, None, None)]).await?;
    let set = |versions: Vec<u64>, state| Command::SetVersionState { path: "s".into(), versions, state, at_ms: 5000 };

    let r = f.apply(vec![set(vec![1, 9], VersionState::Deleted)]).await?;
    assert_eq!(r[0], Response::Rejected(Rejection::VersionNotFound { path: "s".into(), version: 9 }));
    assert_eq!(f.reader.secret("s")?.expect("meta").versions[&1].deleted_at_ms, None, "nothing changed");

    f.apply(vec![set(vec![], VersionState::Deleted)]).await?;
    assert_eq!(f.reader.secret("s")?.expect("meta").versions[&2].deleted_at_ms, Some(5000), "empty list means current");
    f.apply(vec![set(vec![2], VersionState::Undeleted)]).await?;
    assert_eq!(f.reader.secret("s")?.expect("meta").versions[&2].deleted_at_ms, None);

    f.apply(vec![set(vec![1], VersionState::Destroyed)]).await?;
    let (meta, _, value) = f.reader.secret_version("s", Some(1))?.expect("meta");
    assert!(meta.versions[&1].destroyed && value.is_none());
    let r = f.apply(vec![set(vec![1], VersionState::Undeleted)]).await?;
    assert_eq!(r[0], Response::Rejected(Rejection::VersionDestroyed { path: "s".into(), version: 1 }));

    let r = f
        .apply(vec![Command::SetVersionState {
            path: "nope".into(),
            versions: vec![],
            state: VersionState::Deleted,
            at_ms: 1,
        }])
        .await?;
    assert_eq!(r[0], Response::Rejected(Rejection::SecretNotFound { path: "nope".into() }));
    Ok(())
}

#[tokio::test]
async fn init_once_and_list_pages() -> anyhow::Result<()> {
    let mut f = Fixture::new()?;
    let init = Command::InitCluster {
        cluster: ClusterRecord { cluster_id: "c1".into(), root_kcv: "00".into(), created_at_ms: 1 },
        keyring: KeyringRecord { version: 1, wrapped: vec![1; 40], created_at_ms: 1 },
    };
    let r = f.apply(vec![init.clone(), init]).await?;
    assert_eq!(r, vec![Response::Applied, Response::Rejected(Rejection::AlreadyInitialized)]);
    assert_eq!(f.reader.cluster()?.map(|c| c.cluster_id), Some("c1".into()));
    assert_eq!(f.reader.keyrings()?.len(), 1);

    f.apply(["app/a", "app/b", "app/c", "apq", "db/x"].iter().map(|p| put(p, 1, None, None)).collect()).await?;
    assert_eq!(f.reader.list("app/", None, 2)?, vec!["app/a", "app/b"]);
    assert_eq!(f.reader.list("app/", Some("app/b"), 2)?, vec!["app/c"]);
    assert_eq!(f.reader.list("", Some("apq"), 10)?, vec!["db/x"]);
    Ok(())
}
