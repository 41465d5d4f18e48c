//! What a handler sees and returns. A handler is a plain async function
//! `async fn(Ctx) -> HandlerResult`: it reads the envelope, does its work,
//! optionally writes through the transaction the framework lends it, emits
//! events, and returns `ctx.done()` or an error saying whether to retry. It
//! never sleeps, loops on errors, or asks why it was called: delivery,
//! timeouts, back-off, dead letters and acknowledgement belong to the
//! framework.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use berth_core::{Envelope, ErrorInfo, EventPayload, NewEvent};
use berth_store::writes::Write;
use berth_store::{Store, Tx};

/// The result of one attempt.
pub type HandlerResult = Result<Done, HandlerError>;

/// The delivery being handled, with the means to write and emit.
pub struct Ctx {
    pub(crate) env: std::sync::Arc<Envelope>,
    pub(crate) worker: Arc<str>,
    pub(crate) store: Store,
    pub(crate) tx: Option<Tx>,
    pub(crate) emitted: Vec<NewEvent>,
    pub(crate) writes: Vec<Write>,
}

impl fmt::Debug for Ctx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ctx")
            .field("worker", &self.worker)
            .field("event", &self.env.id)
            .field("type", &self.env.event_type)
            .field("attempt", &self.env.attempt)
            .finish_non_exhaustive()
    }
}

impl Ctx {
    pub fn envelope(&self) -> &Envelope {
        &self.env
    }

    /// This delivery's attempt number for this worker, from 1.
    pub fn attempt(&self) -> u32 {
        self.env.attempt
    }

    pub fn worker(&self) -> &str {
        &self.worker
    }

    /// The store, for reads outside the handler's transaction.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The typed payload. A payload that cannot be read is a fatal error
    /// (retrying cannot fix it): the delivery is dead-lettered with the reason.
    pub fn payload<T: EventPayload>(&self) -> Result<T, HandlerError> {
        self.env.payload::<T>().map_err(HandlerError::malformed)
    }

    /// The transaction in which the handler's writes, its emitted events and
    /// the acknowledgement commit together. Opened on first use; handlers
    /// that write nothing never open one and are group-committed instead.
    ///
    /// On SQLite this holds the database's single write lock until the
    /// handler returns: do slow outside work (engine calls) first, then open
    /// the transaction to record the result.
    pub async fn tx(&mut self) -> Result<&mut Tx, HandlerError> {
        if self.tx.is_none() {
            let tx = self.store.begin().await.map_err(HandlerError::retryable)?;
            self.tx = Some(tx);
        }
        match self.tx.as_mut() {
            Some(tx) => Ok(tx),
            // Unreachable: set just above. Kept as an error, not a panic.
            None => Err(HandlerError::retryable(anyhow::anyhow!(
                "transaction vanished"
            ))),
        }
    }

    /// Declares a write, applied with the acknowledgement in the dispatcher's
    /// group commit (or in the handler's own transaction, if it opened one).
    /// A guarded write whose guard fails makes the attempt a retryable
    /// failure, with none of its writes or events applied. This is the fast
    /// path: prefer it to [`Ctx::tx`] for the writes it can express.
    pub fn write(&mut self, w: Write) {
        self.writes.push(w);
    }

    /// Emits an event; it is published only if the attempt succeeds.
    pub fn emit(&mut self, event: NewEvent) {
        self.emitted.push(event);
    }

    /// Emits a typed event about the same org and subject.
    pub fn emit_payload<T: EventPayload>(&mut self, payload: &T) -> Result<(), HandlerError> {
        let ev = NewEvent::of(payload).map_err(HandlerError::fatal)?;
        self.emitted.push(ev);
        Ok(())
    }

    /// Ends the attempt successfully.
    pub fn done(self) -> Done {
        Done {
            tx: self.tx,
            emitted: self.emitted,
            writes: self.writes,
        }
    }
}

/// A successful attempt: what to commit. Only [`Ctx::done`] makes one, so an
/// error return always drops the transaction and the emitted events with it.
pub struct Done {
    pub(crate) tx: Option<Tx>,
    pub(crate) emitted: Vec<NewEvent>,
    pub(crate) writes: Vec<Write>,
}

impl fmt::Debug for Done {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Done")
            .field("emitted", &self.emitted.len())
            .field("tx", &self.tx.is_some())
            .finish()
    }
}

/// How a failed attempt should be treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Try again after the policy's back-off.
    Retryable,
    /// Try again after this delay (capped by the policy's `backoff.max`).
    RetryAfter(Duration),
    /// Do not retry: dead-letter now.
    Fatal,
    /// The payload could not be read: dead-letter now.
    Malformed,
}

/// A failed attempt. Any error converts into a *retryable* one with `?`:
/// unknown failures are assumed transient, and `max_attempts` bounds the cost
/// of being wrong. Say `fatal(e)` when retrying cannot help.
pub struct HandlerError {
    pub kind: FailureKind,
    pub error: anyhow::Error,
    /// Stable, documented code for users (`image_not_found`); defaults by kind.
    pub code: Option<String>,
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {:#}", self.kind, self.error)
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#}", self.error)
    }
}

impl<E: Into<anyhow::Error>> From<E> for HandlerError {
    fn from(e: E) -> Self {
        HandlerError::retryable(e)
    }
}

impl HandlerError {
    pub fn retryable(e: impl Into<anyhow::Error>) -> Self {
        HandlerError {
            kind: FailureKind::Retryable,
            error: e.into(),
            code: None,
        }
    }

    pub fn retry_after(e: impl Into<anyhow::Error>, after: Duration) -> Self {
        HandlerError {
            kind: FailureKind::RetryAfter(after),
            error: e.into(),
            code: None,
        }
    }

    pub fn fatal(e: impl Into<anyhow::Error>) -> Self {
        HandlerError {
            kind: FailureKind::Fatal,
            error: e.into(),
            code: None,
        }
    }

    pub fn malformed(e: impl Into<anyhow::Error>) -> Self {
        HandlerError {
            kind: FailureKind::Malformed,
            error: e.into(),
            code: Some("malformed_payload".into()),
        }
    }

    /// Attaches a stable error code.
    pub fn with_code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    /// The error as recorded: code, message and cause chain.
    pub fn info(&self) -> ErrorInfo {
        let code = self.code.clone().unwrap_or_else(|| {
            match self.kind {
                FailureKind::Retryable | FailureKind::RetryAfter(_) => "handler_error",
                FailureKind::Fatal => "handler_fatal",
                FailureKind::Malformed => "malformed_payload",
            }
            .to_owned()
        });
        ErrorInfo {
            code,
            message: self.error.to_string(),
            chain: self.error.chain().skip(1).map(|c| c.to_string()).collect(),
        }
    }
}

/// Shorthand constructors, for `return Err(fatal(e))`.
pub fn retryable(e: impl Into<anyhow::Error>) -> HandlerError {
    HandlerError::retryable(e)
}

pub fn retry_after(e: impl Into<anyhow::Error>, after: Duration) -> HandlerError {
    HandlerError::retry_after(e, after)
}

pub fn fatal(e: impl Into<anyhow::Error>) -> HandlerError {
    HandlerError::fatal(e)
}

pub(crate) type BoxFuture = Pin<Box<dyn Future<Output = HandlerResult> + Send + 'static>>;

/// A registered handler. Implemented for every `Fn(Ctx) -> impl Future`.
pub trait Handler: Send + Sync + 'static {
    fn call(&self, ctx: Ctx) -> BoxFuture;
}

impl<F, Fut> Handler for F
where
    F: Fn(Ctx) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    fn call(&self, ctx: Ctx) -> BoxFuture {
        Box::pin(self(ctx))
    }
}
