//! Baselines measured beside Coffer in the same run: the crypto limit (ring in process, one core),
//! what a design calling the HSM per request could reach (SoftHSM wrap and unwrap through
//! cryptoki, as `coffer-hsm` does it), and the process-level figures (CPU time, resident memory)
//! read from `/proc`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use coffer_hsm::{Hsm, HsmConfig, Key256, PinSource, DEFAULT_ROOT_KEY_LABEL};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

use crate::load::{self, Measured, OpFn};

/// AES-256-GCM seal of `bytes` bytes with ring on one core, for `duration`.
pub fn ring_seal(bytes: usize, duration: Duration) -> anyhow::Result<Measured> {
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
pub enum HsmOp {
    /// Wrap a 256-bit key under the root key (CKM_AES_KEY_WRAP_PAD).
    Wrap,
    /// Unwrap it again.
    Unwrap,
}

/// Opens the token of a drill-style node directory (`softhsm2.conf`, `pin`, token label `drill`).
///
/// # Errors
/// The token cannot be opened.
pub fn open_hsm(node_dir: &Path) -> anyhow::Result<Hsm> {
    // SoftHSM reads its config path from the environment at the first PKCS#11 call, which has not
    // happened in this process yet; nothing else here reads the environment concurrently.
    std::env::set_var("SOFTHSM2_CONF", node_dir.join("softhsm2.conf"));
    let config = HsmConfig {
        module: None,
        token_label: "drill".into(),
        pin: PinSource::File(node_dir.join("pin")),
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
pub async fn hsm_op(hsm: Hsm, op: HsmOp) -> anyhow::Result<OpFn> {
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

/// CPU time (user + system) a process has used, from `/proc/PID/stat`.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after ") state".
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_micros(ticks * 1_000_000 / clock_ticks()))
}

/// Resident memory of a process, bytes, from `/proc/PID/status`.
pub fn resident_bytes(pid: u32) -> Option<u64> {
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
pub fn total_cpu(pids: &[u32]) -> Duration {
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
