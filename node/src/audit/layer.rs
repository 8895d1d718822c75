// Hot path: every public call, when audit is on.
//! One audit record per call: a tower layer around the public services.
//!
//! The layer puts an [`AuditSlot`] into the request; authentication, authorisation and the
//! services fill it (who, what, which capability and rule, allowed or not, versions, value
//! HMACs, per-key counts). When the service answers, the layer writes the record to the spool
//! and only then lets the response leave: a call whose record cannot be written fails closed
//! with `UNAVAILABLE`.
//!
//! A Keys batch is one call and one record, with counts per key, operation and outcome. A Keys
//! stream is one call too: its record is written when the stream ends, with the counts of every
//! item and the final status, before that status leaves (a node killed mid-stream loses that
//! stream's record; a spool that has failed refuses the stream at its start).
//!
//! Every call gets a request id: the client's `x-request-id` (up to 128 printable characters),
//! else one the node makes; the answer carries it back in `x-request-id`. A W3C `traceparent`
//! header's trace id is recorded too.
//!
//! The status is read from the response head: an error answered before any message carries
//! `grpc-status` in its headers; a response without it is recorded as `OK`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use serde::Serialize;

use super::Audit;

/// What authentication and authorisation learned about a call.
#[derive(Debug, Default, Clone, Serialize)]
pub struct AuditInfo {
    /// Who: a token accessor, a certificate's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    /// The path checked (`secret/…`, `key/…`, `sys/…`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The capability checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capability: Option<&'static str>,
    /// `allowed`, `denied` or `unauthenticated`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<&'static str>,
    /// The rule that decided: `root`, `<policy>#<rule>`, `default-deny`, `operator-certificate`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// A token's accessor (never the token).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accessor: Option<String>,
    /// A certificate's identity (login name, or operator name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// SHA-256 of the client certificate (DER), hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_sha256: Option<String>,
    /// The caller's address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// The version read or written, or the key version used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// A keyed HMAC of the value written or read (`coffer audit hash` computes the same).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value_hmac: Option<String>,
    /// A batch or stream: per key, per operation, per outcome, how many items.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counts: Option<BTreeMap<String, Counts>>,
    /// Work the node did on its own (a rotation step): why it failed, in words. Never a value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A key's items in a batch or stream: per operation, per outcome (a gRPC code name), how many.
pub type Counts = BTreeMap<&'static str, BTreeMap<&'static str, u64>>;

impl AuditInfo {
    /// Counts one item of a batch or stream.
    pub fn count(&mut self, key: &str, operation: &'static str, outcome: &'static str) {
        self.count_n(key, operation, outcome, 1);
    }

    /// Counts `n` items of a batch or stream alike.
    pub fn count_n(&mut self, key: &str, operation: &'static str, outcome: &'static str, n: u64) {
        *self
            .counts
            .get_or_insert_with(BTreeMap::new)
            .entry(key.to_owned())
            .or_default()
            .entry(operation)
            .or_default()
            .entry(outcome)
            .or_default() += n;
    }
}

tokio::task_local! {
    /// The slot of the call this task serves: where a refusal decided deep in a use case (a
    /// token's subset rule, a policy admin's limits) writes its path, capability and rule.
    pub static CURRENT: AuditSlot;
}

/// Notes a policy check in the current call's record (if the task serves an audited call): the
/// first check names the path, capability and rule (what an admin call changed), and a refusal
/// from anywhere names what was refused, unless an earlier refusal already does.
pub fn note_check(path: &str, capability: &'static str, allowed: bool, rule: impl FnOnce() -> String) {
    let _ = CURRENT.try_with(|slot| {
        slot.update(|info| {
            let first = info.path.is_none();
            let first_refusal = !allowed && (info.decision != Some("denied") || info.rule.is_none());
            if first || first_refusal {
                info.path = Some(path.to_owned());
                info.capability = Some(capability);
                info.rule = Some(rule());
            }
            if first_refusal {
                info.decision = Some("denied");
            }
        });
    });
}

/// The slot a call's [`AuditInfo`] is written into.
#[derive(Debug, Clone, Default)]
pub struct AuditSlot(pub Arc<Mutex<AuditInfo>>);

impl AuditSlot {
    /// Changes the call's audit information.
    pub fn update(&self, f: impl FnOnce(&mut AuditInfo)) {
        f(&mut self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    }
}

/// One call, as written to the spool. Never a value, a plaintext, a ciphertext or a token.
#[derive(Debug, Serialize)]
struct Record<'a> {
    time_ms: u64,
    node: u64,
    request_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace_id: Option<&'a str>,
    method: &'a str,
    #[serde(flatten)]
    info: AuditInfo,
    status: &'a str,
    latency_us: u64,
}

impl Audit {
    /// Records work the node does on its own, not a call: a rotation step's end. `request_id`
    /// names the work (`rotation:<path>#<id>/<step>/<attempt>`); `status` is a gRPC code name.
    ///
    /// # Errors
    /// The spool refused the record (failing or busy).
    pub async fn record_work(
        &self,
        request_id: &str,
        method: &str,
        info: AuditInfo,
        status: &'static str,
    ) -> Result<u64, super::spool::SpoolError> {
        let record = Record {
            time_ms: crate::node::now_ms(),
            node: self.node,
            request_id,
            trace_id: None,
            method,
            info,
            status,
            latency_us: 0,
        };
        self.spool.append(serde_json::to_string(&record).unwrap_or_default()).await
    }
}

/// The layer: wraps the public router's services.
#[derive(Clone)]
pub struct AuditLayer {
    audit: Arc<Audit>,
}

impl AuditLayer {
    /// Records every call of the services it wraps to `audit`'s spool.
    pub fn new(audit: Arc<Audit>) -> AuditLayer {
        AuditLayer { audit }
    }
}

impl<S> tower::Layer<S> for AuditLayer {
    type Service = Audited<S>;
    fn layer(&self, inner: S) -> Audited<S> {
        Audited { inner, audit: self.audit.clone() }
    }
}

/// A service whose calls are audited.
#[derive(Clone)]
pub struct Audited<S> {
    inner: S,
    audit: Arc<Audit>,
}

type BoxFuture<T, E> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, E>> + Send>>;

/// The gRPC status name of a response head (`OK` when it carries none: a success, or a stream
/// that opened).
fn status_name(headers: &http::HeaderMap) -> &'static str {
    let code = headers.get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<i32>().ok());
    code.map_or("OK", |code| code_name(tonic::Code::from_i32(code)))
}

/// A gRPC code's name, as records and counts write it.
pub fn code_name(code: tonic::Code) -> &'static str {
    match Some(code) {
        None | Some(tonic::Code::Ok) => "OK",
        Some(tonic::Code::Cancelled) => "CANCELLED",
        Some(tonic::Code::Unknown) => "UNKNOWN",
        Some(tonic::Code::InvalidArgument) => "INVALID_ARGUMENT",
        Some(tonic::Code::DeadlineExceeded) => "DEADLINE_EXCEEDED",
        Some(tonic::Code::NotFound) => "NOT_FOUND",
        Some(tonic::Code::AlreadyExists) => "ALREADY_EXISTS",
        Some(tonic::Code::PermissionDenied) => "PERMISSION_DENIED",
        Some(tonic::Code::ResourceExhausted) => "RESOURCE_EXHAUSTED",
        Some(tonic::Code::FailedPrecondition) => "FAILED_PRECONDITION",
        Some(tonic::Code::Aborted) => "ABORTED",
        Some(tonic::Code::OutOfRange) => "OUT_OF_RANGE",
        Some(tonic::Code::Unimplemented) => "UNIMPLEMENTED",
        Some(tonic::Code::Internal) => "INTERNAL",
        Some(tonic::Code::Unavailable) => "UNAVAILABLE",
        Some(tonic::Code::DataLoss) => "DATA_LOSS",
        Some(tonic::Code::Unauthenticated) => "UNAUTHENTICATED",
    }
}

impl<S, B> tower::Service<http::Request<B>> for Audited<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The ready service answers this call; a fresh clone waits for the next (tower's rule).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        // Node-to-node calls (only on this router when `tls = "off"`) are not client calls.
        if request.uri().path().starts_with("/coffer.raft.v1.") {
            return Box::pin(inner.call(request));
        }
        let audit = self.audit.clone();
        let slot = AuditSlot::default();
        request.extensions_mut().insert(slot.clone());
        let method = request.uri().path().to_owned();
        let request_id = request_id(request.headers(), audit.node);
        let trace_id = trace_id(request.headers());
        let started = Instant::now();
        // Its own task: a client that gives up (a cancel, its deadline) drops the future that
        // waits for the answer, not the call, which runs on and is recorded as it ended.
        let call = tokio::spawn(async move {
            let pending = Pending { audit, slot, method, request_id, trace_id, started };
            // A spool known to fail (or too far behind to take one more record) refuses the call
            // before it runs, so the refusal changes nothing; the refusal's own record is a
            // write attempt, which finds out when the spool recovers. (A spool that fails while
            // the call runs refuses its answer only: like a timeout, UNAVAILABLE then does not
            // say whether a write happened.)
            let reserved = match pending.audit.spool.failure() {
                Some(why) => Err(format!(
                    "the audit spool cannot be written ({why}): this node refuses calls it cannot audit; call another node"
                )),
                None => pending.audit.spool.reserve().map_err(|e| e.to_string()),
            };
            let _reservation = match reserved {
                Ok(reservation) => reservation,
                Err(why) => return Ok(pending.finish(tonic::Status::unavailable(why).into_http()).await),
            };
            let mut response = CURRENT.scope(pending.slot.clone(), inner.call(request)).await?;
            pending.echo_id(response.headers_mut());
            // A stream that opened is recorded when it ends; anything else now.
            if STREAMS.contains(&pending.method.as_str()) && !response.headers().contains_key("grpc-status") {
                let (parts, body) = response.into_parts();
                let body = AuditedBody { inner: body, pending: Some(pending), writing: None };
                return Ok(http::Response::from_parts(parts, tonic::body::Body::new(body)));
            }
            Ok(pending.finish(response).await)
        });
        Box::pin(async move {
            match call.await {
                Ok(answer) => answer,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(_) => Ok(tonic::Status::unavailable("the node is shutting down").into_http()),
            }
        })
    }
}

/// The streaming methods: recorded when they end (a Watch usually when its client goes).
const STREAMS: [&str; 2] = ["/coffer.v1.Keys/Stream", "/coffer.v1.Secrets/Watch"];

/// The client's request id when it is sane, else one made here: `<node>-<start ms>-<n>`.
fn request_id(headers: &http::HeaderMap, node: u64) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static STARTED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    if let Some(id) = headers.get("x-request-id").and_then(|v| v.to_str().ok()) {
        if !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()) {
            return id.to_owned();
        }
    }
    let started = STARTED.get_or_init(crate::node::now_ms);
    format!("{node}-{started:x}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The trace id of a W3C `traceparent` header (`00-<32 hex>-<16 hex>-<2 hex>`).
fn trace_id(headers: &http::HeaderMap) -> Option<String> {
    let value = headers.get("traceparent")?.to_str().ok()?;
    let mut parts = value.split('-');
    let (_version, trace) = (parts.next()?, parts.next()?);
    (trace.len() == 32 && trace.bytes().all(|b| b.is_ascii_hexdigit())).then(|| trace.to_ascii_lowercase())
}

/// A call on its way: what its record needs once the status is known.
struct Pending {
    audit: Arc<Audit>,
    slot: AuditSlot,
    method: String,
    request_id: String,
    trace_id: Option<String>,
    started: Instant,
}

impl Pending {
    /// Puts the request id on the answer.
    fn echo_id(&self, headers: &mut http::HeaderMap) {
        if let Ok(value) = http::HeaderValue::from_str(&self.request_id) {
            headers.insert("x-request-id", value);
        }
    }

    /// The record's JSON for a call that ended with `status` (taken once: a call has one record).
    fn record(&self, status: &'static str) -> String {
        let mut info = std::mem::take(&mut *self.slot.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        // A refusal decided past the first check (a put's create-or-update) shows in the status.
        info.decision = match (status, info.decision) {
            ("PERMISSION_DENIED", _) => Some("denied"),
            ("UNAUTHENTICATED", _) => Some("unauthenticated"),
            ("OK", None) if info.principal.is_some() => Some("allowed"),
            // A check passed (it named its rule) and the call ended otherwise: a cancelled Watch.
            (_, None) if info.principal.is_some() && info.rule.is_some() => Some("allowed"),
            (_, decision) => decision,
        };
        let record = Record {
            time_ms: crate::node::now_ms(),
            node: self.audit.node,
            request_id: &self.request_id,
            trace_id: self.trace_id.as_deref(),
            method: &self.method,
            info,
            status,
            latency_us: u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX),
        };
        serde_json::to_string(&record).unwrap_or_default()
    }

    /// Writes the record of a unary call (or a stream refused at its start), then lets the
    /// answer go; fails closed.
    async fn finish(self, response: http::Response<tonic::body::Body>) -> http::Response<tonic::body::Body> {
        let json = self.record(status_name(response.headers()));
        match self.audit.spool.append(json).await {
            Ok(_) => response,
            Err(e) => tonic::Status::unavailable(e.to_string()).into_http(),
        }
    }
}

type Append = std::pin::Pin<Box<dyn std::future::Future<Output = Result<u64, super::spool::SpoolError>> + Send>>;
type Frame = Option<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>;

/// A stream's body: passes messages through, and writes the record when the stream ends
/// (trailers, an error, or the end), before that end leaves.
struct AuditedBody {
    inner: tonic::body::Body,
    pending: Option<Pending>,
    writing: Option<(Append, Frame)>,
}

impl http_body::Body for AuditedBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Frame> {
        let this = &mut *self;
        if let Some((append, _)) = &mut this.writing {
            let written = std::task::ready!(append.as_mut().poll(cx));
            let (_, end) = this.writing.take().expect("set above");
            return Poll::Ready(match written {
                Ok(_) => end,
                // Fail closed: the stream ends UNAVAILABLE, not with the status it had.
                Err(e) => Some(Err(tonic::Status::unavailable(e.to_string()))),
            });
        }
        let frame = std::task::ready!(std::pin::Pin::new(&mut this.inner).poll_frame(cx));
        let Some(pending) = this.pending.take() else { return Poll::Ready(frame) };
        let status = match &frame {
            Some(Ok(f)) if f.is_trailers() => f.trailers_ref().map_or("OK", status_name),
            Some(Ok(_)) => {
                this.pending = Some(pending);
                return Poll::Ready(frame);
            }
            Some(Err(e)) => code_name(e.code()),
            None => "OK",
        };
        let json = pending.record(status);
        let audit = pending.audit;
        this.writing = Some((Box::pin(async move { audit.spool.append(json).await }), frame));
        self.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_none() && self.writing.is_none() && self.inner.is_end_stream()
    }
}

impl Drop for AuditedBody {
    /// A stream the client cancelled (or whose connection broke) ends here without trailers:
    /// its record is written all the same, as `CANCELLED`, with the counts of its items so far.
    fn drop(&mut self) {
        let Some(pending) = self.pending.take() else { return };
        let json = pending.record("CANCELLED");
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = pending.audit.spool.append(json).await {
                    tracing::error!(error = %e, "cannot record a cancelled stream");
                }
            });
        }
    }
}
