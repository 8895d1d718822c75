//! SoftHSM2 token sets: the one writer of `softhsm2.conf`, token directories and PIN files.
//!
//! A token set is a directory holding `softhsm2.conf` (pointing SoftHSM at `tokens/` beside it),
//! `tokens/`, and the PINs in `pin` and `so-pin`. Tokens are made by child processes, never by
//! the caller's own PKCS#11 state: with `coffer hsm init-token` and `coffer hsm init-root-key`
//! where a `coffer` binary is at hand (node tests, drills: the commands an operator would run),
//! with `softhsm2-util` where none is (the HSM crate's tests, which make their own keys).
//! A token is a directory of files: a copy holds the same root key.
//!
//! # Correctness
//! SoftHSM reads `SOFTHSM2_CONF` once per process, when the process's PKCS#11 state is created,
//! and that state is shared by every user in the process (`coffer-hsm` keeps one context per
//! module and never finalises it). So a process that calls PKCS#11 itself has exactly one token
//! set, made before its first call: [`process_softhsm`]. Node processes are given theirs through
//! the environment of the child, never through this process's.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use anyhow::{bail, Context};

/// The label of every token the kit makes with `coffer` (and the one node configs name).
pub const TOKEN_LABEL: &str = "coffer-test";
/// The user PIN of every token the kit makes; a test PIN, not a secret.
pub const PIN: &str = "123456";
/// The security officer PIN of every token the kit makes.
pub const SO_PIN: &str = "87654321";

/// The config the `coffer hsm` commands read: the `[hsm]` section of a node config. A node config
/// needs a data directory too; these commands never open it.
const HSM_CONFIG: &str = "hsm.toml";

/// A SoftHSM token set in a directory: `softhsm2.conf`, `tokens/`, `pin`, `so-pin`.
#[derive(Debug, Clone)]
pub struct SoftHsm {
    dir: PathBuf,
}

impl SoftHsm {
    /// Writes an empty token set (no token yet) into `dir`, creating it.
    ///
    /// # Errors
    /// A file cannot be written.
    pub fn write(dir: &Path) -> anyhow::Result<SoftHsm> {
        let hsm = SoftHsm { dir: dir.to_owned() };
        std::fs::create_dir_all(hsm.tokens())?;
        hsm.write_conf()?;
        std::fs::write(hsm.pin_file(), format!("{PIN}\n"))?;
        std::fs::write(hsm.so_pin_file(), format!("{SO_PIN}\n"))?;
        Ok(hsm)
    }

    /// Writes a token set into `dir` holding one token, [`TOKEN_LABEL`], with a new root key,
    /// made by `coffer hsm init-token` and `coffer hsm init-root-key` (each a child process with
    /// its own PKCS#11 state).
    ///
    /// # Errors
    /// A file cannot be written, or a `coffer` command fails (its stderr is in the error).
    pub fn create_with_coffer(dir: &Path, coffer: &Path) -> anyhow::Result<SoftHsm> {
        let hsm = SoftHsm::write(dir)?;
        let config = dir.join(HSM_CONFIG);
        std::fs::write(
            &config,
            format!("data-dir = \"data\"\ntls = \"off\"\n[hsm]\ntoken-label = \"{TOKEN_LABEL}\"\npin-file = \"pin\"\n"),
        )?;
        let so_pin = hsm.so_pin_file();
        let so_pin = so_pin.to_str().context("the SO PIN path is not UTF-8")?;
        for args in [vec!["hsm", "init-token", "--so-pin-file", so_pin], vec!["hsm", "init-root-key"]] {
            let out = Command::new(coffer)
                .args(&args)
                .arg("--config")
                .arg(&config)
                .env("SOFTHSM2_CONF", hsm.conf())
                .output()
                .with_context(|| format!("running {}", coffer.display()))?;
            if !out.status.success() {
                bail!("coffer {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
        }
        Ok(hsm)
    }

    /// The token set already written in `dir` (by [`SoftHsm::write`] or the launcher).
    pub fn at(dir: &Path) -> SoftHsm {
        SoftHsm { dir: dir.to_owned() }
    }

    /// Copies the tokens and the user PIN into `dir`, with a config of its own: another token set
    /// holding the same root key, as on another machine.
    ///
    /// # Errors
    /// Any IO failure.
    pub fn copy_to(&self, dir: &Path) -> anyhow::Result<SoftHsm> {
        let copy = SoftHsm { dir: dir.to_owned() };
        copy_dir(&self.tokens(), &copy.tokens())?;
        std::fs::copy(self.pin_file(), copy.pin_file())?;
        copy.write_conf()?;
        Ok(copy)
    }

    /// Initialises a token labelled `label` with [`PIN`] and [`SO_PIN`] and no key, with
    /// `softhsm2-util` (for code that makes its own keys).
    ///
    /// # Errors
    /// `softhsm2-util` is missing or fails.
    pub fn init_token(&self, label: &str) -> anyhow::Result<()> {
        let status = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", self.conf())
            .args(["--init-token", "--free", "--label", label, "--so-pin", SO_PIN, "--pin", PIN])
            .stdout(Stdio::null())
            .status()
            .context("running softhsm2-util (apt-get install softhsm2)")?;
        anyhow::ensure!(status.success(), "softhsm2-util --init-token {label} failed with {status}");
        Ok(())
    }

    /// The directory of the set.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `softhsm2.conf`: what `SOFTHSM2_CONF` must name.
    pub fn conf(&self) -> PathBuf {
        self.dir.join("softhsm2.conf")
    }

    /// The token directory.
    pub fn tokens(&self) -> PathBuf {
        self.dir.join("tokens")
    }

    /// The file holding the user PIN.
    pub fn pin_file(&self) -> PathBuf {
        self.dir.join("pin")
    }

    /// The file holding the security officer PIN (absent from a copy).
    pub fn so_pin_file(&self) -> PathBuf {
        self.dir.join("so-pin")
    }

    fn write_conf(&self) -> std::io::Result<()> {
        std::fs::write(
            self.conf(),
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                self.tokens().display()
            ),
        )
    }
}

/// The token set of this process, for code that calls PKCS#11 in the calling process itself (the
/// HSM crate's tests, nodes served in process). The first call makes it with `create` in a new
/// temporary directory, then points `SOFTHSM2_CONF` at it; every later call returns the same set
/// and ignores its `create`. So every caller in one test binary must be content with the tokens
/// the first one makes: give them all the same `create`.
///
/// # Correctness
/// `SOFTHSM2_CONF` is set before any PKCS#11 call of this process as long as every PKCS#11 user
/// in the process enters through here first, and while the other test threads wait on this
/// function's lock rather than read the environment. Tokens are all made before that call, as
/// SoftHSM is not relied on to notice tokens added to its directory afterwards. The directory is
/// not removed by its process, which may use it until it exits (statics are never dropped); its
/// name carries the process id, and the next call in another process removes the sets of
/// processes that have exited.
///
/// # Errors
/// `create` failed (in this call or the first one).
pub fn process_softhsm(create: impl FnOnce(&Path) -> anyhow::Result<SoftHsm>) -> anyhow::Result<&'static SoftHsm> {
    static SET: OnceLock<Result<SoftHsm, String>> = OnceLock::new();
    let set = SET.get_or_init(|| {
        remove_sets_of_exited_processes();
        let made = tempfile::Builder::new()
            .prefix(&format!("{PROCESS_SET_PREFIX}{}-", std::process::id()))
            .tempdir()
            .map_err(anyhow::Error::from)
            .and_then(|dir| create(&dir.keep()));
        match made {
            Ok(hsm) => {
                std::env::set_var("SOFTHSM2_CONF", hsm.conf());
                Ok(hsm)
            }
            Err(e) => Err(format!("{e:#}")),
        }
    });
    set.as_ref().map_err(|e| anyhow::anyhow!("this process's SoftHSM token set could not be made: {e}"))
}

/// The name of a process's token set: this, its process id, a dash, a random suffix.
const PROCESS_SET_PREFIX: &str = "coffer-softhsm-";

/// Removes the token sets [`process_softhsm`] made in processes that no longer run (Linux: a
/// process runs while `/proc/<pid>` exists; elsewhere nothing is removed). Best effort: a set
/// that cannot be removed stays.
fn remove_sets_of_exited_processes() {
    for dir in crate::dirs_of_exited_processes(PROCESS_SET_PREFIX) {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Copies a directory tree (a token directory: a copy holds the same root key).
///
/// # Errors
/// Any IO failure.
pub fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &to.join(entry.file_name()))?;
        } else {
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_points_at_its_own_tokens_and_holds_the_same_files() -> anyhow::Result<()> {
        let root = tempfile::tempdir()?;
        let first = SoftHsm::write(&root.path().join("a"))?;
        std::fs::create_dir_all(first.tokens().join("slot"))?;
        std::fs::write(first.tokens().join("slot").join("object"), b"key")?;
        let copy = first.copy_to(&root.path().join("b"))?;
        assert_eq!(std::fs::read(copy.tokens().join("slot").join("object"))?, b"key");
        assert_eq!(std::fs::read_to_string(copy.pin_file())?.trim(), PIN);
        assert!(!copy.so_pin_file().exists(), "a copy needs no SO PIN");
        let conf = std::fs::read_to_string(copy.conf())?;
        assert!(conf.contains(&format!("directories.tokendir = {}\n", copy.tokens().display())), "{conf}");
        Ok(())
    }
}
