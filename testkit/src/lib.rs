//! Coffer's test kit: the one SoftHSM token writer, the one local cluster launcher, and the one
//! way to serve a node inside a test's runtime. The node, HSM and raft tests, the failover drills
//! (`coffer-chaos`) and the benchmark (`coffer-bench`) all use it; before it existed there were
//! six SoftHSM config writers and two cluster launchers, each a little different.
//!
//! - [`softhsm`]: a token set in a directory (`softhsm2.conf`, `tokens/`, PIN files), made with
//!   `coffer hsm init-token` and `init-root-key` or with `softhsm2-util`, copied to give another
//!   node the same root key; and the one token set of a process that calls PKCS#11 itself.
//! - [`cluster`]: real `coffer server` processes on fixed loopback ports, formed with
//!   `coffer operator init` and `join`: for what needs a process (kill -9, a cut link, a restart,
//!   an HSM outage at start).
//! - [`pki`]: a CA and certificates, so that nodes, tests, drills and benchmarks run with TLS.
//! - [`in_process`]: a server run by a `run(listener, shutdown)` function on a listener bound to
//!   `127.0.0.1:0`, inside the test's Tokio runtime: for the API tests.
//! - [`postgres`]: a throwaway PostgreSQL cluster of a test's own (never the system one), with a
//!   trusted superuser on a unix socket and password logins over TCP: for database credentials.
//!
//! # Why a crate, and why the dependencies point this way
//! The drills are a binary (`coffer-chaos`) that needs the launcher at run time, so the launcher
//! must live in a crate that can be a normal dependency: a dev-dependency cannot serve a binary.
//! It lives here, not in `coffer-chaos`, so that the node tests do not depend on the drills
//! (their workload, checker and reports) to start a cluster, and so that the token writer, which
//! the launcher needs, is not split from it: `chaos → testkit` as a normal dependency (the drills
//! and the benchmark are tools, not shipped in the server), `node, hsm → testkit` as a
//! dev-dependency. `testkit → chaos` would be a cycle.
//!
//! The kit depends on no server crate (`coffer-node`, `coffer-raft`, `coffer-hsm`): it drives
//! nodes through the `coffer` binary and the gRPC API only, so the drills binary does not link
//! the server it attacks. That is also why [`in_process::InProcess`] takes the `run` function
//! as an argument: `node`'s tests pass `coffer_node::run`.
//!
//! Everything here returns `Result` (the drills are a product binary that must not panic on a
//! failed set-up); tests turn errors into failures with `?`.

pub mod cluster;
pub mod in_process;
pub mod pki;
pub mod postgres;
pub mod softhsm;

pub use cluster::{coffer_cli, free_port, with_token, Cluster, Node, Options, Ready, TEST_IDENTITY, TEST_ROLE};
pub use in_process::InProcess;
pub use pki::TestPki;
pub use postgres::Postgres;
pub use softhsm::{copy_dir, process_softhsm, SoftHsm, PIN, SO_PIN, TOKEN_LABEL};

/// The directories in the temporary directory named `<prefix><pid>-…` whose process no longer
/// runs (Linux: a process runs while `/proc/<pid>` exists; elsewhere none): what a killed test
/// process left behind.
pub(crate) fn dirs_of_exited_processes(prefix: &str) -> Vec<std::path::PathBuf> {
    if !std::path::Path::new("/proc/self").exists() {
        return Vec::new();
    }
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return Vec::new() };
    entries
        .flatten()
        .filter(|entry| {
            entry
                .file_name()
                .to_str()
                .and_then(|n| n.strip_prefix(prefix))
                .and_then(|rest| rest.split_once('-'))
                .and_then(|(pid, _)| pid.parse::<u32>().ok())
                .is_some_and(|pid| !std::path::Path::new("/proc").join(pid.to_string()).exists())
        })
        .map(|entry| entry.path())
        .collect()
}
