//! A server run inside the caller's Tokio runtime: `run(listener, shutdown)` on a listener bound
//! to `127.0.0.1:0`, as mini-redis's tests run theirs. No process to spawn and no port to guess:
//! for the API tests. What needs kill -9, a cut link or a restart runs as processes
//! ([`crate::cluster`]).
//!
//! # Correctness
//! - Nodes served in one process share its PKCS#11 state, so they must share its one token set
//!   ([`crate::process_softhsm`]); their configs name it.
//! - The directory a server uses is removed only once the server has let go of it: a store must
//!   not see its files go while it is open. `coffer_node::run` returns before every task it
//!   spawned has ended (a probe counted 3 still alive, gone within 50 ms), and the store closes
//!   when the last one drops; removing the directory at once left RocksDB files behind for about
//!   half the nodes. So stopping waits for `run` to return, then for the runtime's live tasks to
//!   fall back to their count before the server started (one server per test runtime, whose own
//!   tasks have ended: what the node tests do). If it cannot wait (no multi-threaded runtime,
//!   the one `#[tokio::test(flavor = "multi_thread")]` gives), or the server or its tasks do not
//!   end in time, the directory is kept and its path printed: never removed under a live store.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::ClientTlsConfig;

/// How long a server may take to serve after `run` is called.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a server may take to return after its shutdown signal.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the tasks a server leaves behind may take to end once it has returned.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

/// The shutdown signal handed to `run`: completes when the server should stop.
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A server running in this process, stopped when dropped.
#[derive(Debug)]
pub struct InProcess {
    url: String,
    dir: tempfile::TempDir,
    /// Live tasks of the runtime before the server started.
    tasks_before: usize,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl InProcess {
    /// Binds `127.0.0.1:0`, spawns `run(listener, shutdown)` on the current runtime, and waits
    /// until the server reports SERVING for `coffer.v1.Secrets` on gRPC health. `dir` (the
    /// server's files) lives until the server has stopped.
    ///
    /// # Errors
    /// The listener cannot be bound, `run` returns first (its error is given), or the server
    /// does not serve within 60 s.
    pub async fn start<R, F, E>(dir: tempfile::TempDir, run: R) -> anyhow::Result<InProcess>
    where
        R: FnOnce(TcpListener, Shutdown) -> F,
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<anyhow::Error>,
    {
        InProcess::start_with(dir, None, run).await
    }

    /// [`InProcess::start`] for a server that speaks TLS: its URL is `https://…`, and the
    /// readiness check connects with `tls`.
    ///
    /// # Errors
    /// As [`InProcess::start`].
    pub async fn start_with<R, F, E>(
        dir: tempfile::TempDir,
        tls: Option<ClientTlsConfig>,
        run: R,
    ) -> anyhow::Result<InProcess>
    where
        R: FnOnce(TcpListener, Shutdown) -> F,
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<anyhow::Error>,
    {
        let tasks_before = Handle::current().metrics().num_alive_tasks();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{}", listener.local_addr()?);
        let (tx, rx) = oneshot::channel::<()>();
        let signal: Shutdown = Box::pin(async move {
            // A dropped sender stops the server too.
            let _ = rx.await;
        });
        let served = run(listener, signal);
        let task = tokio::spawn(async move { served.await.map_err(Into::into) });
        let mut server = InProcess { url, dir, tasks_before, shutdown: Some(tx), task: Some(task) };
        let started = Instant::now();
        while !serving_with(&server.url, tls.as_ref()).await {
            if server.task.as_ref().is_some_and(JoinHandle::is_finished) {
                let result = server.join().await;
                anyhow::bail!("the server returned before it served: {result:?}");
            }
            if started.elapsed() > START_TIMEOUT {
                anyhow::bail!("the server did not serve within {START_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(server)
    }

    /// `http://127.0.0.1:<port>` (`https://` when started with TLS).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The server's directory.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Stops the server (its shutdown signal), waits for `run` to return and for the tasks it
    /// left to end, then removes its directory (kept if they did not end in time).
    ///
    /// # Errors
    /// `run` failed, panicked, or did not return within 30 s.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.join().await
    }

    /// Signals shutdown and waits for the server and the tasks it left; keeps the directory
    /// unless both ended in time.
    async fn join(&mut self) -> anyhow::Result<()> {
        self.shutdown.take();
        let Some(task) = self.task.take() else { return Ok(()) };
        let result = match tokio::time::timeout(STOP_TIMEOUT, task).await {
            Ok(Ok(result)) => result,
            Ok(Err(panicked)) => Err(anyhow::anyhow!("the server task failed: {panicked}")),
            Err(_) => {
                self.keep_dir();
                return Err(anyhow::anyhow!("the server did not stop within {STOP_TIMEOUT:?}"));
            }
        };
        let runtime = Handle::current().metrics();
        let started = Instant::now();
        while runtime.num_alive_tasks() > self.tasks_before {
            if started.elapsed() > SETTLE_TIMEOUT {
                self.keep_dir();
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        result
    }

    fn keep_dir(&mut self) {
        self.dir.disable_cleanup(true);
        eprintln!("server directory kept (the server may still use it): {}", self.dir.path().display());
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if self.task.is_none() {
            return;
        }
        let handle = match Handle::try_current() {
            Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => handle,
            _ => {
                // No runtime to wait on: the server stops when its runtime does, after we are gone.
                self.shutdown.take();
                self.keep_dir();
                return;
            }
        };
        let stopped = tokio::task::block_in_place(|| handle.block_on(self.join()));
        if let Err(e) = stopped {
            eprintln!("in-process server: {e:#}");
        }
    }
}

/// Whether the server at `url` reports SERVING for `coffer.v1.Secrets` (one try, 2 s at most).
pub async fn serving(url: &str) -> bool {
    serving_with(url, None).await
}

/// [`serving`], connecting with `tls` when given.
pub async fn serving_with(url: &str, tls: Option<&ClientTlsConfig>) -> bool {
    let Ok(mut endpoint) = tonic::transport::Endpoint::from_shared(url.to_owned()) else { return false };
    if let Some(tls) = tls {
        let Ok(with_tls) = endpoint.tls_config(tls.clone()) else { return false };
        endpoint = with_tls;
    }
    let Ok(channel) = endpoint.timeout(Duration::from_secs(2)).connect_timeout(Duration::from_secs(2)).connect().await
    else {
        return false;
    };
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let request = tonic_health::pb::HealthCheckRequest { service: "coffer.v1.Secrets".into() };
    health
        .check(request)
        .await
        .is_ok_and(|r| r.into_inner().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
}

/// [`serving`] from synchronous code, on a runtime of its own in a thread of its own (the caller
/// may be a Tokio worker, where blocking on another runtime is not allowed).
pub fn serving_blocking(url: &str, tls: Option<ClientTlsConfig>) -> bool {
    let url = url.to_owned();
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return false };
        rt.block_on(serving_with(&url, tls.as_ref()))
    })
    .join()
    .unwrap_or(false)
}
