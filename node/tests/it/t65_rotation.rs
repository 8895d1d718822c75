//! Issue #14: staged secret rotation on real nodes, with a real PostgreSQL for its rotator.
//!
//! PostgreSQL is a throwaway cluster the test kit starts (see `coffer_testkit::postgres`); Coffer
//! logs in as `coffer_admin`, a role with CREATEROLE and not a superuser. Logins are checked with
//! `psql` over TCP with the password, the way a client would log in.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use coffer_proto::v1::rotation_config::Rotator;
use coffer_proto::v1::secrets_client::SecretsClient;
use coffer_proto::v1::{
    CancelRotationRequest, ConfigureRotationRequest, DescribeRequest, GeneratorRotator, GetRequest, PostgresRotator,
    RotateRequest, RotationConfig, RotationInfo, RotationStatusRequest, WatchEvent, WatchRequest,
};
use coffer_testkit::postgres::Postgres;
use coffer_testkit::Cluster;
use tonic::transport::Channel;
use tonic::Code;

use crate::{must_start_cluster, put};

fn seconds(s: u64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds: i64::try_from(s).unwrap_or(i64::MAX), nanos: 0 })
}

fn staged(path: &str, stage: &str) -> GetRequest {
    GetRequest { path: path.into(), version: None, max_staleness: None, stage: stage.into() }
}

/// Calls `f` on node `i`'s client until it is not `UNAVAILABLE` (an election), for up to 15 s.
async fn retrying<T, F, Fut>(cluster: &Cluster, i: usize, mut f: F) -> Result<T, tonic::Status>
where
    F: FnMut(SecretsClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let started = Instant::now();
    loop {
        let client = cluster.client(i).map_err(|e| tonic::Status::internal(e.to_string()))?;
        match f(client).await {
            Err(s) if s.code() == Code::Unavailable && started.elapsed() < Duration::from_secs(15) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

/// Waits until rotation `id` of `path` has ended (idle or failed), asking node `i`.
async fn wait_ended(
    cluster: &Cluster,
    i: usize,
    path: &str,
    id: u64,
    within: Duration,
) -> anyhow::Result<RotationInfo> {
    let started = Instant::now();
    loop {
        let reply = retrying(cluster, i, |mut c| async move {
            c.rotation_status(RotationStatusRequest { prefix: path.into() }).await
        })
        .await?;
        let info = reply.into_inner().rotations.into_iter().find(|r| r.path == path).context("no rotation record")?;
        if info.rotation >= id && info.state != "running" {
            return Ok(info);
        }
        anyhow::ensure!(started.elapsed() < within, "rotation {id} of {path} still running after {within:?}: {info:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Collects node `i`'s Watch events from `from` into a shared list until the stream ends.
fn watch(cluster: &Cluster, i: usize, prefix: &str, from: u64) -> anyhow::Result<Arc<Mutex<Vec<WatchEvent>>>> {
    let events: Arc<Mutex<Vec<WatchEvent>>> = Arc::default();
    let channel = cluster.stream_channel(i)?;
    let (sink, prefix) = (events.clone(), prefix.to_owned());
    tokio::spawn(async move {
        let mut client = SecretsClient::new(channel);
        let Ok(reply) = client.watch(WatchRequest { prefix, from_revision: from }).await else { return };
        let mut stream = reply.into_inner();
        while let Ok(Some(event)) = stream.message().await {
            if event.kind != "bookmark" {
                sink.lock().expect("lock").push(event);
            }
        }
    });
    Ok(events)
}

async fn wait_for_event(
    events: &Arc<Mutex<Vec<WatchEvent>>>,
    what: impl Fn(&WatchEvent) -> bool,
    within: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    while !events.lock().expect("lock").iter().any(&what) {
        anyhow::ensure!(started.elapsed() < within, "event not seen within {within:?}: {:?}", kinds(events));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn kinds(events: &Arc<Mutex<Vec<WatchEvent>>>) -> Vec<String> {
    events
        .lock()
        .expect("lock")
        .iter()
        .map(|e| if e.step.is_empty() { e.kind.clone() } else { format!("{}:{}", e.kind, e.step) })
        .collect()
}

/// A PostgreSQL with the admin role and two application roles; `None` (and a SKIPPED line) when
/// PostgreSQL is not installed.
fn postgres() -> anyhow::Result<Option<Postgres>> {
    if !coffer_testkit::postgres::available() {
        eprintln!("SKIPPED: PostgreSQL is not installed (scripts/deps installs it)");
        return Ok(None);
    }
    let pg = Postgres::start()?;
    pg.psql(
        "CREATE ROLE coffer_admin LOGIN CREATEROLE PASSWORD 'admin-pw';
         CREATE ROLE app_a LOGIN PASSWORD 'pw-a';
         CREATE ROLE app_b LOGIN;
         CREATE ROLE app_single LOGIN PASSWORD 'pw-single';
         GRANT app_a, app_b, app_single TO coffer_admin WITH ADMIN OPTION;",
    )?;
    Ok(Some(pg))
}

fn login(pg: &Postgres, user: &str, password: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "host": pg.host(), "port": pg.port(), "dbname": "postgres", "username": user, "password": password,
    }))
    .expect("JSON")
}

fn parse_login(value: &[u8]) -> anyhow::Result<(String, String)> {
    let v: serde_json::Value = serde_json::from_slice(value)?;
    Ok((v["username"].as_str().context("username")?.to_owned(), v["password"].as_str().context("password")?.to_owned()))
}

fn postgres_config(users: &[&str], grace_s: u64) -> RotationConfig {
    RotationConfig {
        rotator: Some(Rotator::Postgres(PostgresRotator {
            admin_secret: "db/admin".into(),
            users: users.iter().map(|u| (*u).to_owned()).collect(),
        })),
        grace: seconds(grace_s),
        step_deadline: seconds(10),
        ..Default::default()
    }
}

async fn configure(cluster: &Cluster, i: usize, path: &str, config: RotationConfig) -> anyhow::Result<()> {
    let req = ConfigureRotationRequest { path: path.into(), config: Some(config) };
    retrying(cluster, i, |mut c| {
        let req = req.clone();
        async move { c.configure_rotation(req).await }
    })
    .await?;
    Ok(())
}

async fn rotate(cluster: &Cluster, i: usize, path: &str) -> anyhow::Result<u64> {
    let reply =
        retrying(cluster, i, |mut c| async move { c.rotate(RotateRequest { path: path.into() }).await }).await?;
    Ok(reply.into_inner().rotation)
}

async fn read(cluster: &Cluster, i: usize, path: &str, stage: &str) -> Result<(u64, Vec<u8>), tonic::Status> {
    let reply = retrying(cluster, i, |mut c| async move { c.get(staged(path, stage)).await }).await?.into_inner();
    Ok((reply.version, reply.value))
}

/// A generated secret rotates through every step; PREVIOUS keeps the old value; a watcher on a
/// follower sees every event in order, and after its node is killed resumes on another node from
/// the revision after its last without missing one.
#[tokio::test(flavor = "multi_thread")]
async fn a_generated_secret_rotates_and_a_watcher_sees_every_event_across_a_kill() -> anyhow::Result<()> {
    let mut cluster = must_start_cluster(3, "")?;
    let leader = cluster.leader()?;
    let (watcher, other) = ((leader + 1) % 3, (leader + 2) % 3);
    cluster.client(leader)?.put(put("gen/key", b"first", None)).await?;
    let events = watch(&cluster, watcher, "gen", 1)?;
    let generator = Rotator::Generator(GeneratorRotator { kind: "password".into(), length: 20, classes: vec![] });
    configure(
        &cluster,
        leader,
        "gen/key",
        RotationConfig { rotator: Some(generator), grace: seconds(3600), ..Default::default() },
    )
    .await?;
    // Refusals name the rule and change nothing.
    let err = cluster.client(leader)?.get(staged("gen/key", "PENDING")).await.expect_err("no rotation yet");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = cluster.client(leader)?.get(staged("gen/key", "NEWEST")).await.expect_err("not a label");
    assert!(err.code() == Code::InvalidArgument && err.message().contains("CURRENT, PENDING or PREVIOUS"), "{err:?}");
    let err = cluster.client(leader)?.cancel_rotation(CancelRotationRequest { path: "gen/key".into() }).await;
    assert_eq!(err.expect_err("nothing to cancel").code(), Code::FailedPrecondition);

    let id = rotate(&cluster, leader, "gen/key").await?;
    assert_eq!(id, 1);
    let info = wait_ended(&cluster, other, "gen/key", id, Duration::from_secs(20)).await?;
    assert_eq!((info.state.as_str(), info.failures), ("idle", 0), "{info:?}");
    assert!(info.last_success.is_some());
    let (version, value) = read(&cluster, other, "gen/key", "").await?;
    assert_eq!((version, value.len()), (2, 20), "CURRENT is the generated password");
    assert_eq!(read(&cluster, other, "gen/key", "AWSPREVIOUS").await?, (1, b"first".to_vec()), "the AWS alias");
    let err = read(&cluster, other, "gen/key", "PENDING").await.expect_err("no PENDING after finish");
    assert!(err.code() == Code::NotFound && err.message().contains("no rotation is in progress"), "{err:?}");
    let d = cluster.client(other)?.describe(DescribeRequest { path: "gen/key".into() }).await?.into_inner();
    assert_eq!((d.current, d.pending, d.previous), (2, 0, 1));

    wait_for_event(&events, |e| e.kind == "rotation-finished", Duration::from_secs(10)).await?;
    assert_eq!(
        kinds(&events),
        [
            "put:CURRENT",
            "rotation-configured",
            "rotation-started",
            "put:PENDING",
            "rotation-step:create",
            "rotation-step:set",
            "rotation-step:test",
            "labels-moved",
            "rotation-finished"
        ],
        "every event of the rotation, in order"
    );

    // kill -9 the watcher's node; rotate again; resume on another node from the next revision.
    let last = events.lock().expect("lock").last().map(|e| e.revision).context("events")?;
    cluster.kill(watcher)?;
    let id = rotate(&cluster, other, "gen/key").await?;
    wait_ended(&cluster, other, "gen/key", id, Duration::from_secs(20)).await?;
    let resumed = watch(&cluster, other, "gen", last + 1)?;
    wait_for_event(&resumed, |e| e.kind == "rotation-finished", Duration::from_secs(10)).await?;
    let all: Vec<u64> =
        events.lock().expect("lock").iter().chain(resumed.lock().expect("lock").iter()).map(|e| e.revision).collect();
    let first = all[0];
    assert_eq!(all, (first..first + all.len() as u64).collect::<Vec<_>>(), "no revision missed or repeated");
    assert_eq!(kinds(&resumed).first().map(String::as_str), Some("rotation-started"));
    Ok(())
}

/// Alternating users: after a rotation the new login works and the old one still does until
/// PREVIOUS's grace ends; a single user's new password works and the old one is refused.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_rotation_keeps_previous_logins_until_the_grace_ends() -> anyhow::Result<()> {
    let Some(pg) = postgres()? else { return Ok(()) };
    let cluster = must_start_cluster(1, "")?;
    let mut c = cluster.client(0)?;
    c.put(put("db/admin", &login(&pg, "coffer_admin", "admin-pw"), None)).await?;
    c.put(put("db/app", &login(&pg, "app_a", "pw-a"), None)).await?;
    c.put(put("db/single", &login(&pg, "app_single", "pw-single"), None)).await?;
    configure(&cluster, 0, "db/app", postgres_config(&["app_a", "app_b"], 4)).await?;
    configure(&cluster, 0, "db/single", postgres_config(&["app_single"], 0)).await?;

    let id = rotate(&cluster, 0, "db/app").await?;
    let info = wait_ended(&cluster, 0, "db/app", id, Duration::from_secs(30)).await?;
    assert_eq!(info.state, "idle", "{info:?}");
    let finished = Instant::now();
    let (_, current) = read(&cluster, 0, "db/app", "CURRENT").await?;
    let (user, password) = parse_login(&current)?;
    assert_eq!(user, "app_b", "the user not in use got the new password");
    assert!(pg.can_login(&user, &password)?, "the new login works");
    let (_, previous) = read(&cluster, 0, "db/app", "PREVIOUS").await?;
    assert_eq!(parse_login(&previous)?, ("app_a".to_owned(), "pw-a".to_owned()));
    assert!(pg.can_login("app_a", "pw-a")?, "PREVIOUS still logs in within its grace");
    // A second rotation now would change app_a's password under its holders: refused, named.
    let err = cluster.client(0)?.rotate(RotateRequest { path: "db/app".into() }).await.expect_err("in grace");
    assert!(err.code() == Code::FailedPrecondition && err.message().contains("grace"), "{err:?}");
    tokio::time::sleep(Duration::from_secs(4).saturating_sub(finished.elapsed()) + Duration::from_millis(1500)).await;
    assert!(!pg.can_login("app_a", "pw-a")?, "after the grace, PostgreSQL refuses the old login (VALID UNTIL)");
    let err = read(&cluster, 0, "db/app", "PREVIOUS").await.expect_err("grace over");
    assert!(err.code() == Code::NotFound && err.message().contains("grace period ended"), "{err:?}");
    assert!(pg.can_login(&user, &password)?, "CURRENT unaffected");
    // Now the next rotation goes back to app_a, with a new password.
    let id = rotate(&cluster, 0, "db/app").await?;
    wait_ended(&cluster, 0, "db/app", id, Duration::from_secs(30)).await?;
    let (user2, password2) = parse_login(&read(&cluster, 0, "db/app", "").await?.1)?;
    assert_eq!(user2, "app_a");
    assert!(pg.can_login(&user2, &password2)? && !pg.can_login("app_a", "pw-a")?);
    assert!(pg.can_login(&user, &password)?, "PREVIOUS (app_b) works in its grace");

    let id = rotate(&cluster, 0, "db/single").await?;
    wait_ended(&cluster, 0, "db/single", id, Duration::from_secs(30)).await?;
    let (user, password) = parse_login(&read(&cluster, 0, "db/single", "").await?.1)?;
    assert_eq!(user, "app_single");
    assert!(pg.can_login(&user, &password)?, "the new password works");
    assert!(!pg.can_login("app_single", "pw-single")?, "the old one does not (one user: no overlap)");
    // Passwords reach PostgreSQL as SCRAM verifiers, never in clear.
    let stored = pg.psql("SELECT rolpassword FROM pg_authid WHERE rolname = 'app_single'")?;
    assert!(stored.starts_with("SCRAM-SHA-256$") && !stored.contains(&password), "{stored}");
    Ok(())
}

/// kill -9 the leader inside each step of a rotation (a pause before each step's work gives the
/// kill its place): every rotation finishes exactly once, writes one PENDING version, and its
/// login works.
#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_completes_exactly_once_when_the_leader_is_killed_in_each_step() -> anyhow::Result<()> {
    let Some(pg) = postgres()? else { return Ok(()) };
    let mut cluster = must_start_cluster(3, "[rotation]\nstep-pause = \"1500ms\"\n")?;
    let leader = cluster.leader()?;
    let mut c = cluster.client(leader)?;
    c.put(put("db/admin", &login(&pg, "coffer_admin", "admin-pw"), None)).await?;
    c.put(put("db/app", &login(&pg, "app_a", "pw-a"), None)).await?;
    configure(&cluster, leader, "db/app", postgres_config(&["app_a", "app_b"], 0)).await?;
    // The step whose start is marked by each event.
    let steps = [
        ("create", "rotation-started"),
        ("set", "rotation-step:create"),
        ("test", "rotation-step:set"),
        ("finish", "rotation-step:test"),
    ];
    for (step, marker) in steps {
        let leader = cluster.leader()?;
        let watcher = (leader + 1) % 3;
        let (version_before, _) = read(&cluster, watcher, "db/app", "").await?;
        let from = {
            let d = cluster.client(watcher)?.describe(DescribeRequest { path: "db/app".into() }).await?.into_inner();
            d.current_version
        };
        let events = watch(&cluster, watcher, "db/", 0)?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let id = rotate(&cluster, leader, "db/app").await?;
        let marked = |e: &WatchEvent| {
            let k = if e.step.is_empty() { e.kind.clone() } else { format!("{}:{}", e.kind, e.step) };
            k == marker && e.rotation == id
        };
        wait_for_event(&events, marked, Duration::from_secs(20)).await?;
        cluster.kill(leader)?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        cluster.start_node(leader)?;
        let info = wait_ended(&cluster, watcher, "db/app", id, Duration::from_secs(60)).await?;
        assert_eq!(info.state, "idle", "killed in {step}: {info:?}");
        wait_for_event(&events, |e| e.kind == "rotation-finished" && e.rotation == id, Duration::from_secs(10)).await?;
        let seen = events.lock().expect("lock").clone();
        let finished = seen.iter().filter(|e| e.kind == "rotation-finished" && e.rotation == id).count();
        let pending_puts = seen.iter().filter(|e| e.kind == "put" && e.step == "PENDING").count();
        assert_eq!((finished, pending_puts), (1, 1), "killed in {step}: {:?}", kinds(&events));
        let (version, value) = read(&cluster, watcher, "db/app", "").await?;
        assert_eq!(version, from + 1, "killed in {step}: one new version (was {version_before})");
        let (user, password) = parse_login(&value)?;
        assert!(pg.can_login(&user, &password)?, "killed in {step}: CURRENT logs in");
    }
    Ok(())
}

/// PostgreSQL down during `set`: the rotation fails cleanly after its attempts, CURRENT still
/// logs in once PostgreSQL is back, and the next scheduled rotation succeeds. A dependency that
/// accepts and never answers hits the step deadline.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_step_fails_cleanly_and_the_next_scheduled_rotation_succeeds() -> anyhow::Result<()> {
    let Some(pg) = postgres()? else { return Ok(()) };
    let cluster = must_start_cluster(1, "")?;
    let mut c = cluster.client(0)?;
    c.put(put("db/admin", &login(&pg, "coffer_admin", "admin-pw"), None)).await?;
    c.put(put("db/app", &login(&pg, "app_a", "pw-a"), None)).await?;
    pg.stop()?;
    let config = RotationConfig { every: seconds(6), max_attempts: 2, ..postgres_config(&["app_a", "app_b"], 0) };
    configure(&cluster, 0, "db/app", config).await?;
    let failed = wait_ended(&cluster, 0, "db/app", 1, Duration::from_secs(30)).await?;
    assert_eq!((failed.state.as_str(), failed.step.as_str(), failed.failures), ("failed", "set", 1), "{failed:?}");
    assert!(failed.last_error.contains("cannot log in to PostgreSQL"), "{failed:?}");
    assert_eq!(read(&cluster, 0, "db/app", "PENDING").await?.0, 2, "PENDING kept for inspection");
    let (_, current) = read(&cluster, 0, "db/app", "CURRENT").await?;
    assert_eq!(parse_login(&current)?.0, "app_a", "CURRENT did not move");
    // The failure is audited.
    let audit = std::fs::read_to_string(cluster.data_dir(0).join("audit.log"))?;
    assert!(audit.lines().any(|l| l.contains("\"method\":\"rotation/set\"") && l.contains("\"status\":\"ABORTED\"")));
    pg.resume()?;
    assert!(pg.can_login("app_a", "pw-a")?, "CURRENT still works");
    let next = wait_ended(&cluster, 0, "db/app", 2, Duration::from_secs(30)).await?;
    assert_eq!((next.state.as_str(), next.failures), ("idle", 0), "the next scheduled rotation: {next:?}");
    let (user, password) = parse_login(&read(&cluster, 0, "db/app", "").await?.1)?;
    assert!(user == "app_b" && pg.can_login(&user, &password)?);
    assert!(read(&cluster, 0, "db/app", "PENDING").await.is_err(), "the stale PENDING was replaced, then moved");

    // A black hole: a port that accepts and never answers. The step hits its deadline.
    let hole = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = hole.local_addr()?.port();
    let held = std::thread::spawn(move || {
        let kept: Vec<_> = hole.incoming().take(4).collect();
        std::thread::sleep(Duration::from_secs(20));
        drop(kept);
    });
    let admin = serde_json::json!({"host": "127.0.0.1", "port": port, "username": "x", "password": "y"});
    c.put(put("hole/admin", &serde_json::to_vec(&admin)?, None)).await?;
    c.put(put("hole/app", &login(&pg, "app_a", "pw-a"), None)).await?;
    let config = RotationConfig {
        rotator: Some(Rotator::Postgres(PostgresRotator {
            admin_secret: "hole/admin".into(),
            users: vec!["app_a".into()],
        })),
        step_deadline: seconds(1),
        max_attempts: 1,
        ..Default::default()
    };
    configure(&cluster, 0, "hole/app", config).await?;
    let id = rotate(&cluster, 0, "hole/app").await?;
    let info = wait_ended(&cluster, 0, "hole/app", id, Duration::from_secs(20)).await?;
    assert_eq!((info.state.as_str(), info.step.as_str()), ("failed", "set"), "{info:?}");
    assert!(info.last_error.contains("deadline"), "{info:?}");
    // A failed rotation does not block the next one; cancel clears its PENDING.
    cluster.client(0)?.cancel_rotation(CancelRotationRequest { path: "hole/app".into() }).await?;
    assert_eq!(read(&cluster, 0, "hole/app", "PENDING").await.expect_err("cleared").code(), Code::NotFound);
    assert!(pg.can_login("app_a", &parse_login(&read(&cluster, 0, "db/app", "PREVIOUS").await?.1)?.1)?);
    drop(held);
    Ok(())
}
