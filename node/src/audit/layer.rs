// Hot path: every public call, when audit is on.
//! One audit record per call: a tower layer around the public services.
//!
//! The layer puts an [`AuditSlot`] into the request; authentication and authorisation fill it
//! (who, what, which capability, allowed or not). When the service answers, the layer writes the
//! record to the spool and only then lets the response leave: a call whose record cannot be
//! written fails closed with `UNAVAILABLE`. A Keys batch or stream is one call, one record.
//!
//! The status is read from the response head: an error answered before any message carries
//! `grpc-status` in its headers; a response without it is recorded as `OK` (for a stream: as
//! opened).

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
    /// The caller's address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
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
    method: &'a str,
    #[serde(flatten)]
    info: AuditInfo,
    status: &'a str,
    latency_us: u64,
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
    match code.map(tonic::Code::from_i32) {
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
        let audit = self.audit.clone();
        let slot = AuditSlot::default();
        request.extensions_mut().insert(slot.clone());
        let method = request.uri().path().to_owned();
        let started = Instant::now();
        Box::pin(async move {
            let response = inner.call(request).await?;
            let status = status_name(response.headers());
            let mut info = slot.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
            // A refusal decided past the first check (a batch item, a put's create-or-update)
            // shows in the status.
            info.decision = match (status, info.decision) {
                ("PERMISSION_DENIED", _) => Some("denied"),
                ("UNAUTHENTICATED", _) => Some("unauthenticated"),
                (_, None) if info.principal.is_some() => Some("allowed"),
                (_, decision) => decision,
            };
            let record = Record {
                time_ms: crate::node::now_ms(),
                node: audit.node,
                method: &method,
                info,
                status,
                latency_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            };
            let json = serde_json::to_string(&record).unwrap_or_default();
            match audit.spool.append(json).await {
                Ok(_) => Ok(response),
                // Fail closed: the answer does not leave without its record.
                Err(e) => Ok(tonic::Status::unavailable(e.to_string()).into_http()),
            }
        })
    }
}
