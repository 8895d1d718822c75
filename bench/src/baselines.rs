//! Baselines measured beside Coffer in the same run: the crypto limit (ring in process, one core),
//! what a design calling the HSM per request could reach (SoftHSM wrap and unwrap through
//! cryptoki, as `coffer-hsm` does it, and AES-256-GCM encryption inside the token), and the
//! process-level figures (CPU time, resident memory) read from `/proc`.

use std::cell::RefCell;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coffer_hsm::{Hsm, HsmConfig, Key256, PinSource, DEFAULT_ROOT_KEY_LABEL};
use coffer_testkit::{SoftHsm, TOKEN_LABEL};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

use crate::load::{self, Measured, OpFn};

/// AES-256-GCM seal of `bytes` bytes with ring on one core, for `duration`.
pub(crate) fn ring_seal(bytes: usize, duration: Duration) -> anyhow::Result<Measured> {
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[7u8; 32]).map_err(|_| anyhow::anyhow!("ring key"))?);
    let mut buf = Vec::with_capacity(bytes + 16);
    Ok(load::one_core(duration, 100_000_000, |n| {
        buf.clear();
        buf.resize(bytes, 42);
        let mut nonce = [0u8; 12];
        nonce[..8].copy_from_slice(&n.to_le_bytes());
        let _ = key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut buf);
    }))
}

/// The SoftHSM operations a per-request design would make.
#[derive(Debug, Clone, Copy)]
pub(crate) enum HsmOp {
    /// Wrap a 256-bit key under the root key (CKM_AES_KEY_WRAP_PAD).
    Wrap,
    /// Unwrap it again.
    Unwrap,
}

/// Opens the token of a node directory of the test kit's launcher (its token set: `softhsm2.conf`,
/// `pin`, token label [`TOKEN_LABEL`]).
///
/// # Errors
/// The token cannot be opened.
pub(crate) fn open_hsm(node_dir: &Path) -> anyhow::Result<Hsm> {
    let tokens = SoftHsm::at(node_dir);
    // SoftHSM reads its config path from the environment at the first PKCS#11 call, which has not
    // happened in this process yet; nothing else here reads the environment concurrently.
    std::env::set_var("SOFTHSM2_CONF", tokens.conf());
    let config = HsmConfig {
        module: None,
        token_label: TOKEN_LABEL.into(),
        pin: PinSource::File(tokens.pin_file()),
        root_key_label: DEFAULT_ROOT_KEY_LABEL.into(),
        sessions: 2,
        fault_file: None,
    };
    Ok(Hsm::open(&config)?)
}

/// An HSM operation as a load operation.
///
/// # Errors
/// The first wrap, made to have something to unwrap, fails.
pub(crate) async fn hsm_op(hsm: Hsm, op: HsmOp) -> anyhow::Result<OpFn> {
    let key = Key256::from_array(&mut [9u8; 32]);
    let wrapped = Arc::new(hsm.wrap(&key).await?);
    let hsm = Arc::new(hsm);
    Ok(Arc::new(move |_, _| {
        let (hsm, wrapped) = (hsm.clone(), wrapped.clone());
        Box::pin(async move {
            let result = match op {
                HsmOp::Wrap => hsm.wrap(&Key256::from_array(&mut [9u8; 32])).await.map(|_| 1),
                HsmOp::Unwrap => hsm.unwrap(&wrapped).await.map(|_| 1),
            };
            result.map_err(|_| tonic::Code::Internal)
        })
    }))
}

/// AES-256-GCM encryption inside SoftHSM, one `C_EncryptInit` + `C_Encrypt` per call, with a key
/// generated in the token (sensitive, not extractable): what a design that encrypts in the HSM per
/// request could reach at best. The root key cannot serve: it may only wrap and unwrap.
///
/// Each blocking thread that runs a call keeps its own session (a cryptoki `Session` is not
/// `Sync`); the key is a session object of `owner`, visible to every session of this process.
pub(crate) struct HsmGcm {
    ctx: Pkcs11,
    slot: Slot,
    key: ObjectHandle,
    nonces: AtomicU64,
    /// Creator of the key; the key lives as long as this session.
    _owner: Mutex<Session>,
}

thread_local! {
    /// This thread's session for [`HsmGcm`], opened at its first call.
    static GCM_SESSION: RefCell<Option<Session>> = const { RefCell::new(None) };
}

impl HsmGcm {
    /// Reaches the token of `node_dir` (as [`open_hsm`] does), logs in, and generates the key.
    ///
    /// # Errors
    /// The module, token or PIN cannot be reached, or the token refuses to make the key.
    pub(crate) fn open(node_dir: &Path) -> anyhow::Result<HsmGcm> {
        let tokens = SoftHsm::at(node_dir);
        std::env::set_var("SOFTHSM2_CONF", tokens.conf());
        let ctx = Pkcs11::new(coffer_hsm::resolve_module(None)?)?;
        // coffer-hsm may have initialised the library in this process already: one state per process.
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => return Err(e.into()),
        }
        let slot = ctx
            .get_slots_with_initialized_token()?
            .into_iter()
            .find(|s| ctx.get_token_info(*s).is_ok_and(|i| i.label().trim_end() == TOKEN_LABEL))
            .ok_or_else(|| anyhow::anyhow!("no token labelled {TOKEN_LABEL} in {}", node_dir.display()))?;
        let owner = ctx.open_rw_session(slot)?;
        let pin = AuthPin::new(std::fs::read_to_string(tokens.pin_file())?.trim().into());
        match owner.login(UserType::User, Some(&pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e) => return Err(e.into()),
        }
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Token(false),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
        ];
        let key = owner.generate_key(&Mechanism::AesKeyGen, &template)?;
        Ok(HsmGcm { ctx, slot, key, nonces: AtomicU64::new(0), _owner: Mutex::new(owner) })
    }

    /// One encryption of `data` under a fresh counter nonce; blocking.
    fn encrypt(&self, data: &[u8]) -> cryptoki::error::Result<usize> {
        let mut iv = [0u8; 12];
        iv[..8].copy_from_slice(&self.nonces.fetch_add(1, Ordering::Relaxed).to_le_bytes());
        let params = GcmParams::new(&mut iv, &[], 128.into())?;
        GCM_SESSION.with(|cell| {
            let mut cell = cell.borrow_mut();
            let session = match cell.take() {
                Some(s) => s,
                None => self.ctx.open_ro_session(self.slot)?,
            };
            let sealed = session.encrypt(&Mechanism::AesGcm(params), self.key, data);
            *cell = Some(session);
            sealed.map(|c| c.len())
        })
    }

    /// Encryption of `bytes` bytes as a load operation, run on Tokio's blocking threads.
    pub(crate) fn op(self: &Arc<Self>, bytes: usize) -> OpFn {
        let gcm = Arc::clone(self);
        Arc::new(move |_, _| {
            let gcm = Arc::clone(&gcm);
            Box::pin(async move {
                match tokio::task::spawn_blocking(move || gcm.encrypt(&vec![42u8; bytes])).await {
                    Ok(Ok(len)) if len == bytes + 16 => Ok(1),
                    _ => Err(tonic::Code::Internal),
                }
            })
        })
    }
}

/// CPU time (user + system) a process has used, from `/proc/PID/stat`.
pub(crate) fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after ") state".
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_micros(ticks * 1_000_000 / clock_ticks()))
}

/// Resident memory of a process, bytes, from `/proc/PID/status`.
pub(crate) fn resident_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .filter(|t| *t > 0)
        .unwrap_or(100)
}

/// Summed CPU time of processes.
pub(crate) fn total_cpu(pids: &[u32]) -> Duration {
    pids.iter().filter_map(|p| cpu_time(*p)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let me = std::process::id();
        // Burn a little CPU so the counter has moved past zero.
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert_ne!(x, 1);
        assert!(cpu_time(me).is_some_and(|t| t > Duration::ZERO));
        assert!(resident_bytes(me).is_some_and(|b| b > 1024 * 1024));
        assert_eq!(cpu_time(u32::MAX), None);
    }

    #[test]
    fn ring_seal_measures_calls() -> anyhow::Result<()> {
        let m = ring_seal(64, Duration::from_millis(50))?;
        assert!(m.ops >= 64 && m.ops_per_sec > 0.0, "{m:?}");
        Ok(())
    }
}
