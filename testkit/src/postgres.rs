//! A throwaway PostgreSQL cluster for the tests of database credentials: `initdb` into a new
//! temporary directory, the server on a free loopback port and on a unix socket in a private
//! directory, stopped and removed on drop. Never the system cluster: nothing here reads or
//! writes `/var/lib/postgresql` or connects to port 5432 unless [`crate::free_port`] chose it.
//!
//! # Why it runs as another user
//! `initdb` and `pg_ctl` refuse to run as root, and CI runs as root. So as root they run through
//! `runuser -u postgres --` (the user Debian's `postgresql` package creates; `nobody` where it is
//! missing), and the cluster's directory is `chown`ed to that user; as any other user they run
//! as this process's user. `psql` always runs as this process's user: root reaches the private
//! socket directory anyway, and the socket itself is open to every local user.
//!
//! # Authentication
//! `initdb --auth-local=trust --auth-host=scram-sha-256`: the bootstrap superuser
//! ([`SUPERUSER`]) sets up each test through the unix socket with no password
//! ([`Postgres::psql`]), while every TCP login from `127.0.0.1` must present the role's password,
//! checked with SCRAM as it is for Coffer's issued credentials ([`Postgres::can_login`]). `VALID
//! UNTIL` limits only password logins, so it is seen over TCP, never over the socket.
//!
//! # Correctness
//! - A password never appears on a command line: `can_login` hands it to `psql` in
//!   `PGPASSWORD`, and `psql` reads SQL (`CREATE ROLE … PASSWORD …`) from its stdin.
//! - The children's `PG*` environment is cleared, so a developer's `PGHOST`, `PGSERVICE` or
//!   `PGOPTIONS` cannot point a test at another server, and `~/.pgpass` is never read.
//! - The cluster is started with `fsync=off` and made with `--no-sync`: durability across a power
//!   loss is not under test, and a crashed test machine loses only a cluster meant to be thrown
//!   away.
//! - A test process killed before its drop leaves a server running; the first start in a later
//!   process stops the clusters of processes that have exited and removes their directories.
//!   (PostgreSQL also shuts itself down within a minute or so of losing its directory.) With
//!   `COFFER_KEEP_TEST_DIRS` set, the directory (with `server.log`) is kept and its path printed;
//!   its server is still stopped.

use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;

use anyhow::{bail, Context};

use crate::cluster::free_port;

/// The bootstrap superuser of every cluster, trusted on the unix socket.
pub const SUPERUSER: &str = "postgres";

/// The address the server listens on, and the only one [`Postgres::can_login`] uses.
const HOST: &str = "127.0.0.1";
/// Where Debian installs each major version's server binaries, `<major>/bin`.
const PG_LIB: &str = "/usr/lib/postgresql";
/// The name of a cluster's directory: this, the process id, a dash, a counter and the time.
const DIR_PREFIX: &str = "coffer-postgres-";
/// How many free ports [`Postgres::start`] tries when another process binds one first.
const START_ATTEMPTS: u32 = 3;
/// How many lines of `server.log` an error quotes.
const LOG_TAIL_LINES: usize = 20;
/// What [`Postgres::start`] says when [`available`] is false.
const NOT_INSTALLED: &str =
    "PostgreSQL is not installed (apt-get install postgresql): no /usr/lib/postgresql/<version>/bin/initdb";
/// The file in a kept cluster directory that tells the sweep of exited processes to keep it.
const KEEP_MARKER: &str = "kept";

/// Whether PostgreSQL's server binaries (`initdb`, `pg_ctl`) and `psql` are installed, so that a
/// test can say it is SKIPPED rather than fail on a machine without them.
pub fn available() -> bool {
    Binaries::find().is_some()
}

/// A PostgreSQL cluster of its own in a temporary directory (`data/`, `sock/`, `server.log`),
/// running until [`Postgres::stop`] or drop; dropping it stops the server and removes the
/// directory.
#[derive(Debug)]
pub struct Postgres {
    bin: Binaries,
    owner: Owner,
    dir: PathBuf,
    port: u16,
}

impl Postgres {
    /// Makes a fresh cluster with `initdb` and starts it with `pg_ctl`, listening on
    /// `127.0.0.1:<free port>` and on a unix socket in a private directory. A port another
    /// process binds first is replaced by another, up to three times.
    ///
    /// # Errors
    /// PostgreSQL is not installed; as root, no user to run it as; the directory cannot be made;
    /// `initdb` or `pg_ctl start` fails (the error quotes its output and the tail of the server's
    /// log).
    pub fn start() -> anyhow::Result<Postgres> {
        let bin = Binaries::find().context(NOT_INSTALLED)?;
        let owner = Owner::for_this_process()?;
        static SWEEP: Once = Once::new();
        SWEEP.call_once(|| stop_clusters_of_exited_processes(&bin, &owner));
        let dir = new_cluster_dir()?;
        // From here on, drop stops whatever was started and removes the directory.
        let mut pg = Postgres { bin, owner, dir, port: 0 };
        if std::env::var_os("COFFER_KEEP_TEST_DIRS").is_some() {
            std::fs::write(pg.dir.join(KEEP_MARKER), b"")?;
            eprintln!("postgres directory kept: {}", pg.dir.display());
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(pg.socket_dir())
            .with_context(|| format!("creating {}", pg.socket_dir().display()))?;
        if let Owner::User(name) = &pg.owner {
            let out = Command::new("chown")
                .arg("-R")
                .arg(format!("{name}:"))
                .arg(&pg.dir)
                .output()
                .context("running chown")?;
            if !out.status.success() {
                bail!("chown -R {name}: {}: {}", pg.dir.display(), String::from_utf8_lossy(&out.stderr).trim());
            }
        }
        pg.initdb()?;
        let mut attempt = 1;
        loop {
            pg.port = free_port()?;
            match pg.launch()? {
                Launch::Started => return Ok(pg),
                Launch::PortTaken if attempt < START_ATTEMPTS => attempt += 1,
                Launch::PortTaken => {
                    bail!("PostgreSQL could not start: another process bound each of {START_ATTEMPTS} free ports first")
                }
            }
        }
    }

    /// The address the server listens on: `127.0.0.1`.
    pub fn host(&self) -> &str {
        HOST
    }

    /// The server's TCP port (also the number in its unix socket's name); the same after
    /// [`Postgres::resume`].
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the server's unix socket (`.s.PGSQL.<port>`).
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.join("sock")
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Runs `sql` as [`SUPERUSER`] in the `postgres` database, through the unix socket (trusted,
    /// no password), with `psql -X -q -At -v ON_ERROR_STOP=1`, the SQL on its stdin (so a
    /// password in it is never on a command line). Each statement commits on its own; the first
    /// that fails stops the rest. Returns what `psql` printed: one row a line, columns separated
    /// by `|`, nothing for statements that return no rows.
    ///
    /// # Errors
    /// `psql` cannot run, cannot connect, or a statement fails (its stderr is in the error, and
    /// may quote the failing statement).
    pub fn psql(&self, sql: &str) -> anyhow::Result<String> {
        let mut child = client_command(&self.bin.psql, &self.dir)
            .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(self.socket_dir())
            .args(["-p", &self.port.to_string(), "-U", SUPERUSER, "-d", "postgres", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", self.bin.psql.display()))?;
        let stdin = child.stdin.take().context("psql's stdin was not piped")?;
        let (out, written) = std::thread::scope(|scope| {
            // Written from another thread: psql may fill its output pipe before it has read all
            // of `sql`, and would wait for this thread to read while this thread waits to write.
            let writer = scope.spawn(move || {
                let mut stdin = stdin;
                stdin.write_all(sql.as_bytes())
            });
            (child.wait_with_output(), writer.join())
        });
        let out = out.context("waiting for psql")?;
        if !out.status.success() {
            bail!(
                "psql as {SUPERUSER} on port {} failed with {}: {}",
                self.port,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let written = written.map_err(|_| anyhow::anyhow!("the thread writing SQL to psql panicked"))?;
        written.context("writing SQL to psql")?;
        String::from_utf8(out.stdout).context("psql printed something that is not UTF-8")
    }

    /// Tries a password login as `user` over TCP to `127.0.0.1` (SCRAM), with `psql -w` and the
    /// password in `PGPASSWORD` (never on the command line). `Ok(true)`: logged in. `Ok(false)`:
    /// the server refused the credentials: a wrong or empty password, a role that does not exist
    /// (which SCRAM reports as a wrong password), a `NOLOGIN` role, or a password past its
    /// `VALID UNTIL`.
    ///
    /// # Errors
    /// Anything else: `psql` cannot run, the server is down or refuses for another reason (too
    /// many connections, shutting down); the error quotes `psql`'s stderr.
    pub fn can_login(&self, user: &str, password: &str) -> anyhow::Result<bool> {
        /// What `psql` prints when the server refused the credentials themselves (PostgreSQL 15,
        /// `lc_messages = C`, which `initdb --locale=C` sets).
        const REFUSALS: [&str; 3] =
            ["password authentication failed", "is not permitted to log in", "fe_sendauth: no password supplied"];
        let out = client_command(&self.bin.psql, &self.dir)
            .args(["-X", "-q", "-At", "-w", "-h", HOST, "-p", &self.port.to_string(), "-U", user])
            .args(["-d", "postgres", "-c", "select 1"])
            .env("PGPASSWORD", password)
            // A file that does not exist: an empty password must not be completed from ~/.pgpass.
            .env("PGPASSFILE", self.dir.join("no-passfile"))
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", self.bin.psql.display()))?;
        if out.status.success() {
            return Ok(true);
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        if REFUSALS.iter().any(|refusal| stderr.contains(refusal)) {
            return Ok(false);
        }
        bail!("psql could not try a login as {user} on {HOST}:{} ({}): {}", self.port, out.status, stderr.trim())
    }

    /// Stops the server (`pg_ctl stop -m fast`: sessions are ended, the data is kept);
    /// [`Postgres::resume`] starts it again.
    ///
    /// # Errors
    /// `pg_ctl stop` fails, for example because the server is not running.
    pub fn stop(&self) -> anyhow::Result<()> {
        let out = self.pg_ctl_stop("fast")?;
        if !out.status.success() {
            bail!("pg_ctl stop -m fast ({}) failed with {}: {}", self.dir.display(), out.status, output_text(&out));
        }
        Ok(())
    }

    /// Starts the stopped server again, on the same port and socket, with the same data.
    ///
    /// # Errors
    /// `pg_ctl start` fails (the error quotes the tail of the server's log), including when
    /// another process took the port while the server was stopped.
    pub fn resume(&self) -> anyhow::Result<()> {
        match self.launch()? {
            Launch::Started => Ok(()),
            Launch::PortTaken => {
                bail!("PostgreSQL could not resume: port {} was taken while it was stopped", self.port)
            }
        }
    }

    fn initdb(&self) -> anyhow::Result<()> {
        let out = self
            .owner
            .command(&self.bin.initdb, &self.dir)
            .arg("-D")
            .arg(self.data_dir())
            .args(["--auth-local=trust", "--auth-host=scram-sha-256", "-U", SUPERUSER])
            .args(["--no-sync", "-E", "UTF8", "--locale=C"])
            .output()
            .with_context(|| format!("running {}{}", self.owner.describe(), self.bin.initdb.display()))?;
        if !out.status.success() {
            bail!(
                "initdb -D {} ({}) failed with {}: {}",
                self.data_dir().display(),
                self.owner.describe_user(),
                out.status,
                output_text(&out)
            );
        }
        Ok(())
    }

    /// Starts the server on `self.port` and waits until it accepts connections.
    fn launch(&self) -> anyhow::Result<Launch> {
        let socket_dir = self.socket_dir();
        let socket_dir = socket_dir.to_str().context("the socket directory's path is not UTF-8")?;
        // pg_ctl passes `-o` to the server through a shell: the single quotes keep a path with
        // spaces whole, and a path with a single quote cannot be quoted this way.
        if socket_dir.contains('\'') {
            bail!("the socket directory's path {socket_dir} holds a single quote (set TMPDIR elsewhere)");
        }
        let log = self.log_file();
        let log_from = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let out = self
            .owner
            .command(&self.bin.pg_ctl, &self.dir)
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(&log)
            .args(["-w", "-s", "-o"])
            .arg(format!("-k '{socket_dir}' -p {} -c listen_addresses={HOST} -c fsync=off", self.port))
            .arg("start")
            .output()
            .with_context(|| format!("running {}{}", self.owner.describe(), self.bin.pg_ctl.display()))?;
        if out.status.success() {
            return Ok(Launch::Started);
        }
        let tail = log_tail(&log, log_from);
        if tail.contains("Address already in use") {
            return Ok(Launch::PortTaken);
        }
        bail!(
            "pg_ctl start ({}, port {}) failed with {}: {}\nserver log ({}):\n{tail}",
            self.data_dir().display(),
            self.port,
            out.status,
            output_text(&out),
            log.display()
        )
    }

    fn pg_ctl_stop(&self, mode: &str) -> anyhow::Result<Output> {
        pg_ctl_stop(&self.bin, &self.owner, &self.dir, mode)
    }

    fn log_file(&self) -> PathBuf {
        self.dir.join("server.log")
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // `immediate`: the data is thrown away, so there is nothing to shut down cleanly. Fails
        // harmlessly when the server is not running.
        let _ = self.pg_ctl_stop("immediate");
        if !self.dir.join(KEEP_MARKER).exists() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// What came of `pg_ctl start`, when it was not an error.
enum Launch {
    /// The server accepts connections.
    Started,
    /// Another process bound the port first: try another.
    PortTaken,
}

/// The binaries of the newest PostgreSQL installed under [`PG_LIB`].
#[derive(Debug, Clone)]
struct Binaries {
    initdb: PathBuf,
    pg_ctl: PathBuf,
    /// That version's `psql`, or `/usr/bin/psql` (Debian's wrapper) without it.
    psql: PathBuf,
}

impl Binaries {
    fn find() -> Option<Binaries> {
        let bin = std::fs::read_dir(PG_LIB)
            .ok()?
            .flatten()
            .filter_map(|entry| {
                let major: u32 = entry.file_name().to_str()?.parse().ok()?;
                let bin = entry.path().join("bin");
                (bin.join("initdb").is_file() && bin.join("pg_ctl").is_file()).then_some((major, bin))
            })
            .max_by_key(|(major, _)| *major)
            .map(|(_, bin)| bin)?;
        let psql = [bin.join("psql"), PathBuf::from("/usr/bin/psql")].into_iter().find(|p| p.is_file())?;
        Some(Binaries { initdb: bin.join("initdb"), pg_ctl: bin.join("pg_ctl"), psql })
    }
}

/// Who runs `initdb` and `pg_ctl`, and so owns the cluster's files and the server's processes.
#[derive(Debug, Clone)]
enum Owner {
    /// This process's user, which is not root.
    ThisUser,
    /// A system user, through `runuser -u <name> --`, because this process is root and the
    /// PostgreSQL tools refuse root.
    User(String),
}

impl Owner {
    fn for_this_process() -> anyhow::Result<Owner> {
        if !is_root()? {
            return Ok(Owner::ThisUser);
        }
        ["postgres", "nobody"]
            .into_iter()
            .find(|name| Command::new("id").arg("-u").arg(name).output().is_ok_and(|out| out.status.success()))
            .map(|name| Owner::User(name.to_owned()))
            .context(
                "running as root, and there is neither a `postgres` nor a `nobody` user to run initdb and pg_ctl as \
                 (they refuse root; apt-get install postgresql creates `postgres`)",
            )
    }

    /// A command running `program` as this owner, in `dir`, with no stdin, `C` messages (the
    /// errors matched here are English) and no `PG*` variables.
    fn command(&self, program: &Path, dir: &Path) -> Command {
        let mut command = match self {
            Owner::ThisUser => Command::new(program),
            Owner::User(name) => {
                let mut command = Command::new("runuser");
                command.args(["-u", name, "--"]).arg(program);
                command
            }
        };
        without_pg_env(&mut command);
        command.current_dir(dir).env("LC_ALL", "C").stdin(Stdio::null());
        command
    }

    /// `runuser -u <name> -- ` or nothing: for errors.
    fn describe(&self) -> String {
        match self {
            Owner::ThisUser => String::new(),
            Owner::User(name) => format!("runuser -u {name} -- "),
        }
    }

    /// Who the tools run as, and what that needs: for errors.
    fn describe_user(&self) -> String {
        match self {
            Owner::ThisUser => "as this process's user".to_owned(),
            Owner::User(name) => {
                format!("as `{name}`, which must be able to reach {}", std::env::temp_dir().display())
            }
        }
    }
}

/// A command running `psql` as this process's user, in `dir`, with `C` messages and no `PG*`
/// variables.
fn client_command(psql: &Path, dir: &Path) -> Command {
    let mut command = Command::new(psql);
    without_pg_env(&mut command);
    command.current_dir(dir).env("LC_ALL", "C");
    command
}

/// Clears every `PG*` variable (`PGHOST`, `PGSERVICE`, `PGOPTIONS`, `PGPASSWORD`, …) from the
/// child's environment: the command lines say everything the child needs.
fn without_pg_env(command: &mut Command) {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("PG") {
            command.env_remove(name);
        }
    }
}

/// Whether this process's effective user is root (whom `initdb` and `pg_ctl` refuse).
fn is_root() -> anyhow::Result<bool> {
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        // `Uid:` real, effective, saved, filesystem.
        let effective = status.lines().find_map(|line| line.strip_prefix("Uid:")?.split_whitespace().nth(1));
        if let Some(uid) = effective {
            return Ok(uid == "0");
        }
    }
    let out = Command::new("id").arg("-u").output().context("running id -u")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim() == "0")
}

/// Creates a new cluster directory, `<temp dir>/coffer-postgres-<pid>-<n>-<nanos>`, readable by
/// its owner only (the tools' user, after a `chown` as root).
fn new_cluster_dir() -> anyhow::Result<PathBuf> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|since| since.subsec_nanos())
        .unwrap_or_default();
    for _ in 0..100 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("{DIR_PREFIX}{}-{n}-{nanos}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            // Left by an earlier process with the same id: take the next number.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        }
    }
    bail!("no new directory name under {} after 100 tries", std::env::temp_dir().display())
}

fn pg_ctl_stop(bin: &Binaries, owner: &Owner, dir: &Path, mode: &str) -> anyhow::Result<Output> {
    owner
        .command(&bin.pg_ctl, dir)
        .arg("-D")
        .arg(dir.join("data"))
        .args(["-w", "-s", "-m", mode, "stop"])
        .output()
        .with_context(|| format!("running {}{}", owner.describe(), bin.pg_ctl.display()))
}

/// Stops the servers of the clusters that processes which no longer run left behind (killed
/// before their drop), and removes their directories unless kept (Linux: a process runs while
/// `/proc/<pid>` exists; elsewhere nothing is done). Best effort: what cannot be stopped or
/// removed stays.
fn stop_clusters_of_exited_processes(bin: &Binaries, owner: &Owner) {
    for dir in crate::dirs_of_exited_processes(DIR_PREFIX) {
        let _ = pg_ctl_stop(bin, owner, &dir, "immediate");
        if !dir.join(KEEP_MARKER).exists() {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// The last lines the server wrote to `log` from byte `from` on (this start's lines).
fn log_tail(log: &Path, from: u64) -> String {
    let Ok(bytes) = std::fs::read(log) else { return format!("({} cannot be read)", log.display()) };
    let from = usize::try_from(from).unwrap_or(0).min(bytes.len());
    let text = String::from_utf8_lossy(&bytes[from..]);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

/// A tool's stderr and stdout, trimmed: for errors.
fn output_text(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    format!("{} {}", stderr.trim(), stdout.trim()).trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The contract Coffer's database credentials rely on: over TCP a role logs in with its
    /// password only, not once `NOLOGIN` or past `VALID UNTIL`; a stopped server is an error, not
    /// a refusal; the roles survive a stop and resume; drop stops the server and removes the
    /// directory.
    #[test]
    fn a_role_logs_in_over_tcp_with_its_password_only_and_survives_a_restart() -> anyhow::Result<()> {
        if !available() {
            eprintln!("SKIPPED: {NOT_INSTALLED}");
            return Ok(());
        }
        let pg = Postgres::start()?;
        assert_eq!(pg.psql("select current_user")?.trim(), SUPERUSER);
        pg.psql(
            "create role app login password 'right-password';
             create role locked nologin password 'locked-password';",
        )?;
        assert!(pg.can_login("app", "right-password")?);
        assert!(!pg.can_login("app", "wrong-password")?);
        assert!(!pg.can_login("app", "")?, "an empty password");
        assert!(!pg.can_login("nobody-here", "right-password")?, "a role that does not exist");
        assert!(!pg.can_login("locked", "locked-password")?, "a NOLOGIN role");
        pg.psql("alter role app valid until '2000-01-01'")?;
        assert!(!pg.can_login("app", "right-password")?, "a password past its VALID UNTIL");
        assert!(pg.psql("select nosuch").is_err(), "a failing statement is an error");

        pg.stop()?;
        assert!(pg.can_login("app", "right-password").is_err(), "a stopped server is an error, not a refusal");
        pg.resume()?;
        pg.psql("alter role app valid until 'infinity'")?;
        assert!(pg.can_login("app", "right-password")?, "the role survived the restart");

        let (dir, port) = (pg.dir.clone(), pg.port());
        drop(pg);
        assert!(std::net::TcpListener::bind((HOST, port)).is_ok(), "the server still holds port {port}");
        if std::env::var_os("COFFER_KEEP_TEST_DIRS").is_none() {
            assert!(!dir.exists(), "{} was not removed", dir.display());
        }
        Ok(())
    }
}
