//! The PKCS#11 backend: one process-wide library context, a pool of logged-in sessions owned by
//! threads, and the root-key operations (wrap, unwrap, key check value, creation).
//!
//! # Correctness
//! - A cryptoki `Session` is `Send` but not `Sync`, and PKCS#11 calls block: each session lives on a
//!   pool thread that runs jobs sent to it, so async callers never block a Tokio worker.
//! - A PKCS#11 library has one state per process: a second `C_Initialize` fails and `C_Finalize` on
//!   any handle ends every handle. [`context`] hands out one shared, never-finalised context per
//!   module path.
//! - Login state is per token and per process; the pool keeps its sessions open for its lifetime so
//!   the token stays logged in (closing the last session logs the process out). Nothing logs in per
//!   request.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use zeroize::Zeroize;

use crate::config::{resolve_module, HsmConfig};
use crate::error::HsmError;
use crate::secret::{Key256, Pin};
use crate::Kcv;

/// Every context this process has initialised, by module path. A std `Mutex`: it is taken only
/// while loading a module at start-up, never on a request path and never across an `.await`.
static CONTEXTS: Mutex<Vec<(PathBuf, Pkcs11)>> = Mutex::new(Vec::new());

/// The process-wide, initialised context of a PKCS#11 module.
fn context(module: &Path) -> Result<Pkcs11, HsmError> {
    let mut contexts = CONTEXTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, ctx)) = contexts.iter().find(|(p, _)| p == module) {
        return Ok(ctx.clone());
    }
    let load_err = |source| HsmError::ModuleLoad { path: module.to_owned(), source };
    let ctx = Pkcs11::new(module).map_err(load_err)?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(load_err(e)),
    }
    contexts.push((module.to_owned(), ctx.clone()));
    Ok(ctx)
}

/// A context, the slot of the configured token, and the PIN: what every HSM entry point starts from.
struct Token {
    ctx: Pkcs11,
    slot: Slot,
    label: String,
    pin: Pin,
}

impl Token {
    fn find(config: &HsmConfig) -> Result<Token, HsmError> {
        let module = resolve_module(config.module.as_deref())?;
        let pin = config.pin.read()?;
        let ctx = context(&module)?;
        let mut available = Vec::new();
        for slot in ctx.get_slots_with_initialized_token()? {
            let info = ctx.get_token_info(slot)?;
            let label = info.label().trim_end().to_owned();
            if label == config.token_label {
                return Ok(Token { ctx, slot, label, pin });
            }
            available.push(label);
        }
        Err(HsmError::TokenNotFound { label: config.token_label.clone(), available })
    }

    /// Opens a read-write session; the first one in the process logs the token in.
    fn session(&self) -> Result<Session, HsmError> {
        let session = self.ctx.open_rw_session(self.slot)?;
        match session.login(UserType::User, Some(&self.pin.auth_pin())) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
            Err(CkError::Pkcs11(RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange, _)) => {
                Err(HsmError::WrongPin { label: self.label.clone() })
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// The objects labelled as the root key.
fn find_root(session: &Session, label: &str) -> Result<Vec<ObjectHandle>, HsmError> {
    Ok(session
        .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY), Attribute::Label(label.as_bytes().to_vec())])?)
}

/// Checks that the object is an AES key that cannot leave the token and can wrap and unwrap.
fn check_root(session: &Session, root: ObjectHandle, label: &str) -> Result<(), HsmError> {
    let attrs = session.get_attributes(
        root,
        &[
            AttributeType::KeyType,
            AttributeType::Sensitive,
            AttributeType::Extractable,
            AttributeType::Wrap,
            AttributeType::Unwrap,
        ],
    )?;
    let unsafe_key = |reason| Err(HsmError::RootKeyUnsafe { label: label.to_owned(), reason });
    let flag = |wanted: AttributeType| {
        attrs.iter().find_map(|a| match (a, wanted) {
            (Attribute::Sensitive(v), AttributeType::Sensitive)
            | (Attribute::Extractable(v), AttributeType::Extractable)
            | (Attribute::Wrap(v), AttributeType::Wrap)
            | (Attribute::Unwrap(v), AttributeType::Unwrap) => Some(*v),
            _ => None,
        })
    };
    if !attrs.iter().any(|a| matches!(a, Attribute::KeyType(KeyType::AES))) {
        return unsafe_key("it is not an AES key");
    }
    if flag(AttributeType::Extractable) != Some(false) {
        return unsafe_key("it is extractable (CKA_EXTRACTABLE is not false), so its value could leave the HSM");
    }
    if flag(AttributeType::Sensitive) != Some(true) {
        return unsafe_key("it is not sensitive (CKA_SENSITIVE is not true), so its value could be read");
    }
    if flag(AttributeType::Wrap) != Some(true) || flag(AttributeType::Unwrap) != Some(true) {
        return unsafe_key("it lacks CKA_WRAP or CKA_UNWRAP");
    }
    Ok(())
}

/// Fixed, public key material whose wrap under the root key gives the key check value. RFC 5649
/// wrapping is deterministic, so the same root key always gives the same KCV, and the root key
/// needs no ENCRYPT permission (which the classic "encrypt a zero block" KCV would require).
const KCV_PROBE: [u8; 32] = *b"coffer key check value, v1 probe";

/// Imports key bytes as a temporary, extractable session object, runs `f` on it, and destroys it.
fn with_session_key<R>(
    session: &Session,
    key: &[u8],
    f: impl FnOnce(ObjectHandle) -> Result<R, HsmError>,
) -> Result<R, HsmError> {
    let mut template = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(false),
        Attribute::Sensitive(false),
        Attribute::Extractable(true),
        Attribute::Value(key.to_vec()),
    ];
    let created = session.create_object(&template);
    for attr in &mut template {
        if let Attribute::Value(bytes) = attr {
            bytes.zeroize();
        }
    }
    let handle = created?;
    let result = f(handle);
    let destroyed = session.destroy_object(handle);
    let value = result?;
    destroyed?;
    Ok(value)
}

fn wrap_with(session: &Session, root: ObjectHandle, key: &[u8]) -> Result<Vec<u8>, HsmError> {
    with_session_key(session, key, |handle| Ok(session.wrap_key(&Mechanism::AesKeyWrapPad, root, handle)?))
}

fn kcv_with(session: &Session, root: ObjectHandle) -> Result<Kcv, HsmError> {
    let wrapped = wrap_with(session, root, &KCV_PROBE)?;
    Ok(Kcv::from_wrapped_probe(&wrapped))
}

fn unwrap_with(session: &Session, root: ObjectHandle, wrapped: &[u8]) -> Result<Key256, HsmError> {
    let template = [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(false),
        Attribute::Sensitive(false),
        Attribute::Extractable(true),
    ];
    let handle = match session.unwrap_key(&Mechanism::AesKeyWrapPad, root, wrapped, &template) {
        Ok(handle) => handle,
        // SoftHSM reports a failed RFC 5649 integrity check as CKR_GENERAL_ERROR.
        Err(CkError::Pkcs11(
            RvError::GeneralError
            | RvError::WrappedKeyInvalid
            | RvError::WrappedKeyLenRange
            | RvError::EncryptedDataInvalid
            | RvError::EncryptedDataLenRange,
            _,
        )) => return Err(HsmError::Integrity),
        Err(e) => return Err(e.into()),
    };
    let attrs = session.get_attributes(handle, &[AttributeType::Value]);
    let destroyed = session.destroy_object(handle);
    let mut key = None;
    for attr in attrs? {
        if let Attribute::Value(mut bytes) = attr {
            key = Key256::from_slice(&bytes);
            bytes.zeroize();
        }
    }
    destroyed?;
    key.ok_or(HsmError::Integrity)
}

/// Creates the AES-256 root key in the token. Refuses when a key with the label exists.
///
/// The key is created inside the HSM (`C_GenerateKey`) as a token object that is sensitive, not
/// extractable and not copyable, usable only to wrap and unwrap.
///
/// # Errors
/// [`HsmError::RootKeyExists`] when the label is taken; any error of reaching the token.
pub fn init_root_key(config: &HsmConfig) -> Result<Kcv, HsmError> {
    let token = Token::find(config)?;
    let session = token.session()?;
    if !find_root(&session, &config.root_key_label)?.is_empty() {
        return Err(HsmError::RootKeyExists { label: config.root_key_label.clone(), token: token.label });
    }
    let template = [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(32.into()),
        Attribute::Label(config.root_key_label.as_bytes().to_vec()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Copyable(false),
        Attribute::Wrap(true),
        Attribute::Unwrap(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
    ];
    let root = session.generate_key(&Mechanism::AesKeyGen, &template)?;
    kcv_with(&session, root)
}

/// Initialises a token with the configured label in the first free slot, and sets its user PIN.
/// Meant for development and test tokens (SoftHSM always offers one free slot); production tokens
/// are set up with the HSM vendor's tools.
///
/// # Errors
/// [`HsmError::TokenExists`] when a token has the label already; [`HsmError::NoFreeSlot`]; any
/// failing PKCS#11 call.
pub fn init_token(config: &HsmConfig, so_pin: &Pin) -> Result<(), HsmError> {
    let module = resolve_module(config.module.as_deref())?;
    let user_pin = config.pin.read()?;
    let ctx = context(&module)?;
    for slot in ctx.get_slots_with_initialized_token()? {
        if ctx.get_token_info(slot)?.label().trim_end() == config.token_label {
            return Err(HsmError::TokenExists { label: config.token_label.clone() });
        }
    }
    let mut free = None;
    for slot in ctx.get_slots_with_token()? {
        if !ctx.get_token_info(slot)?.token_initialized() {
            free = Some(slot);
            break;
        }
    }
    let slot = free.ok_or(HsmError::NoFreeSlot)?;
    ctx.init_token(slot, &so_pin.auth_pin(), &config.token_label)?;
    let session = ctx.open_rw_session(slot)?;
    session.login(UserType::So, Some(&so_pin.auth_pin()))?;
    session.init_pin(&user_pin.auth_pin())?;
    session.logout()?;
    Ok(())
}

type Job = Box<dyn FnOnce(&Session, ObjectHandle) + Send>;

/// A handle to the HSM: a pool of logged-in sessions, the root key, and its key check value.
///
/// Cheap to clone; the pool stops when the last clone is dropped.
#[derive(Clone)]
pub struct Hsm {
    inner: Arc<Inner>,
}

struct Inner {
    jobs: Option<mpsc::SyncSender<Job>>,
    workers: Vec<JoinHandle<()>>,
    kcv: Kcv,
    token_label: String,
    fault_file: Option<std::path::PathBuf>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel ends every worker; each closes its session on the way out.
        self.jobs.take();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

/// How many HSM calls may wait for a session: past it a call fails with [`HsmError::Busy`]
/// instead of queueing without bound. The HSM is called only to unwrap keyring keys and wrap new
/// ones (a handful per rotation), so a full queue means something is wrong upstream.
pub(crate) const JOB_QUEUE: usize = 1024;

impl std::fmt::Debug for Hsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hsm").field("token", &self.inner.token_label).field("kcv", &self.inner.kcv).finish()
    }
}

impl Hsm {
    /// Reaches the token, logs in, finds and checks the root key, computes its KCV and starts the
    /// session pool. Blocking: call it at start-up or from `spawn_blocking`.
    ///
    /// # Errors
    /// Module or token not found, wrong PIN, root key missing, ambiguous or unsafe (extractable or
    /// not sensitive), or a failing PKCS#11 call.
    pub fn open(config: &HsmConfig) -> Result<Hsm, HsmError> {
        check_fault(config.fault_file.as_deref())?;
        let token = Token::find(config)?;
        let first = token.session()?;
        let root = match find_root(&first, &config.root_key_label)?.as_slice() {
            [] => {
                return Err(HsmError::RootKeyMissing {
                    label: config.root_key_label.clone(),
                    token: token.label.clone(),
                })
            }
            [one] => *one,
            many => return Err(HsmError::RootKeyAmbiguous { label: config.root_key_label.clone(), count: many.len() }),
        };
        check_root(&first, root, &config.root_key_label)?;
        let kcv = kcv_with(&first, root)?;

        let mut sessions = vec![first];
        for _ in 1..config.sessions.max(1) {
            sessions.push(token.session()?);
        }
        let (tx, rx) = mpsc::sync_channel::<Job>(JOB_QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        let workers = sessions
            .into_iter()
            .enumerate()
            .map(|(i, session)| {
                let rx = Arc::clone(&rx);
                std::thread::Builder::new()
                    .name(format!("coffer-hsm-{i}"))
                    .spawn(move || worker(&session, root, &rx))
                    .map_err(|_| HsmError::PoolStopped)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let fault_file = config.fault_file.clone();
        Ok(Hsm { inner: Arc::new(Inner { jobs: Some(tx), workers, kcv, token_label: token.label, fault_file }) })
    }

    /// The root key's key check value, computed at open.
    pub fn kcv(&self) -> &Kcv {
        &self.inner.kcv
    }

    /// Wraps a key with the root key (CKM_AES_KEY_WRAP_PAD, RFC 5649).
    ///
    /// # Errors
    /// A failing PKCS#11 call, or a stopped pool.
    pub async fn wrap(&self, key: &Key256) -> Result<Vec<u8>, HsmError> {
        let mut copy = *key.expose_secret();
        let key = Key256::from_array(&mut copy);
        self.run(move |session, root| wrap_with(session, root, key.expose_secret())).await
    }

    /// Unwraps a key wrapped by [`Hsm::wrap`].
    ///
    /// # Errors
    /// [`HsmError::Integrity`] when the blob was altered or wrapped under another root key.
    pub async fn unwrap(&self, wrapped: &[u8]) -> Result<Key256, HsmError> {
        let wrapped = wrapped.to_vec();
        self.run(move |session, root| unwrap_with(session, root, &wrapped)).await
    }

    /// Recomputes the KCV through the token: a cheap liveness probe of the HSM.
    ///
    /// # Errors
    /// A failing PKCS#11 call, or a stopped pool.
    pub async fn probe(&self) -> Result<Kcv, HsmError> {
        self.run(kcv_with).await
    }

    async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Session, ObjectHandle) -> Result<R, HsmError> + Send + 'static,
    ) -> Result<R, HsmError> {
        check_fault(self.inner.fault_file.as_deref())?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |session, root| {
            let _ = tx.send(f(session, root));
        });
        self.inner.jobs.as_ref().ok_or(HsmError::PoolStopped)?.try_send(job).map_err(|e| match e {
            mpsc::TrySendError::Full(_) => HsmError::Busy { capacity: JOB_QUEUE },
            mpsc::TrySendError::Disconnected(_) => HsmError::PoolStopped,
        })?;
        rx.await.map_err(|_| HsmError::PoolStopped)?
    }
}

/// Fails while the drill's fault file exists (see [`HsmConfig::fault_file`]).
fn check_fault(fault_file: Option<&std::path::Path>) -> Result<(), HsmError> {
    match fault_file {
        Some(path) if path.exists() => {
            Err(HsmError::Unavailable { reason: format!("fault injected ({} exists)", path.display()) })
        }
        _ => Ok(()),
    }
}

fn worker(session: &Session, root: ObjectHandle, jobs: &Mutex<mpsc::Receiver<Job>>) {
    loop {
        // The lock is held only while waiting for the next job, never while running one.
        let job = match jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner).recv() {
            Ok(job) => job,
            Err(mpsc::RecvError) => return,
        };
        job(session, root);
    }
}

/// The DER encoding of the P-256 curve's OID (1.2.840.10045.3.1.7), as `CKA_EC_PARAMS` wants it.
const P256_PARAMS: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// An ECDSA P-256 key pair held by the HSM, for signing audit checkpoints: the private half is
/// sensitive and never leaves the token; the public half is what a verifier pins.
#[derive(Debug, Clone)]
pub struct SigningKey {
    private: ObjectHandle,
    /// The public key, as an uncompressed point (65 bytes, `04 ‖ X ‖ Y`).
    pub public: Vec<u8>,
}

/// The uncompressed point in a `CKA_EC_POINT` value: PKCS#11 says it is a DER OCTET STRING, and
/// some tokens give the bare point.
fn ec_point(value: &[u8]) -> Option<Vec<u8>> {
    match value {
        [0x04, 0x41, point @ ..] if point.len() == 65 => Some(point.to_vec()),
        point if point.len() == 65 && point[0] == 0x04 => Some(point.to_vec()),
        _ => None,
    }
}

/// Held while finding or creating a signing key: nodes served in one process (tests) share a
/// token, and two creating the same label at once would make two pairs.
static SIGNING_KEYS: Mutex<()> = Mutex::new(());

fn signing_key_with(session: &Session, label: &str) -> Result<SigningKey, HsmError> {
    let _creating = SIGNING_KEYS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let labelled = |class| vec![Attribute::Class(class), Attribute::Label(label.as_bytes().to_vec())];
    let mut private = session.find_objects(&labelled(ObjectClass::PRIVATE_KEY))?;
    if private.is_empty() {
        // The pair shares a random CKA_ID: the public half is found by it, never by position.
        let mut id = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
            .map_err(|_| HsmError::Unavailable { reason: "no randomness for a key id".into() })?;
        let public_template = [
            Attribute::Token(true),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.to_vec()),
            Attribute::EcParams(P256_PARAMS.to_vec()),
            Attribute::Verify(true),
        ];
        let private_template = [
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.to_vec()),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
        ];
        let (_, created) = session.generate_key_pair(&Mechanism::EccKeyPairGen, &public_template, &private_template)?;
        private = vec![created];
    }
    // Two processes sharing a token may each have created a pair under one label: the lowest
    // handle is used, with the public half of its own pair.
    private.sort_by_key(|h| h.handle());
    let private = private[0];
    let id = session.get_attributes(private, &[AttributeType::Id])?.into_iter().find_map(|a| match a {
        Attribute::Id(id) => Some(id),
        _ => None,
    });
    let mut query = labelled(ObjectClass::PUBLIC_KEY);
    query.extend(id.map(Attribute::Id));
    let missing = || HsmError::Unavailable { reason: format!("the key pair {label:?} has no P-256 public half") };
    let public = *session.find_objects(&query)?.first().ok_or_else(missing)?;
    let point = session
        .get_attributes(public, &[AttributeType::EcPoint])?
        .into_iter()
        .find_map(|a| match a {
            Attribute::EcPoint(value) => ec_point(&value),
            _ => None,
        })
        .ok_or_else(missing)?;
    Ok(SigningKey { private, public: point })
}

impl Hsm {
    /// The ECDSA P-256 key pair labelled `label`, created in the token (private half sensitive,
    /// not extractable) the first time it is asked for.
    ///
    /// # Errors
    /// A failing PKCS#11 call (a token without EC support among them), or a stopped pool.
    pub async fn signing_key(&self, label: &str) -> Result<SigningKey, HsmError> {
        let label = label.to_owned();
        self.run(move |session, _| signing_key_with(session, &label)).await
    }

    /// Signs `message` with `key` (ECDSA P-256 over its SHA-256, computed here): 64 bytes,
    /// `r ‖ s`, as `ring::signature::ECDSA_P256_SHA256_FIXED` verifies them.
    ///
    /// # Errors
    /// A failing PKCS#11 call, or a stopped pool.
    pub async fn sign(&self, key: &SigningKey, message: &[u8]) -> Result<Vec<u8>, HsmError> {
        let digest = ring::digest::digest(&ring::digest::SHA256, message).as_ref().to_vec();
        let private = key.private;
        self.run(move |session, _| Ok(session.sign(&Mechanism::Ecdsa, private, &digest)?)).await
    }
}
