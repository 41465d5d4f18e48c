//! What one client or one org may hold: per-org caps on concurrent event
//! streams and waits (429 `too_many_requests` past them, with
//! `Retry-After`), and the largest URI and headers a request may carry
//! (414 `uri_too_long`, 431 `headers_too_large`, in the API's error shape).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// Longest URI (path and query) accepted.
pub const MAX_URI: usize = 8 * 1024;

/// Most bytes of headers (names and values) accepted.
pub const MAX_HEADERS: usize = 32 * 1024;

/// What an org holds a slot for while it lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hold {
    /// An event stream, or logs followed.
    Stream,
    /// A request waiting for a flow's outcome.
    Wait,
}

/// How many streams and waits each org holds.
#[derive(Debug)]
pub(crate) struct OrgCaps {
    max_streams: u32,
    max_waits: u32,
    /// Org → (streams, waits); an org holding nothing has no entry.
    held: Mutex<HashMap<String, (u32, u32)>>,
}

impl OrgCaps {
    pub(crate) fn new(max_streams: u32, max_waits: u32) -> Arc<OrgCaps> {
        Arc::new(OrgCaps {
            max_streams,
            max_waits,
            held: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u32, u32)>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot of `hold` for `org`, given back when the slot is dropped (the
    /// stream or wait ended, the client left, the request was cancelled);
    /// 429 when the org holds as many as allowed.
    pub(crate) fn take(self: &Arc<Self>, org: &str, hold: Hold) -> Result<Slot, ApiError> {
        let mut held = self.lock();
        let entry = held.entry(org.to_owned()).or_default();
        let (n, max, what, key) = match hold {
            Hold::Stream => (
                &mut entry.0,
                self.max_streams,
                "event streams and log followers",
                "api.max_streams_per_org",
            ),
            Hold::Wait => (
                &mut entry.1,
                self.max_waits,
                "waiting requests",
                "api.max_waits_per_org",
            ),
        };
        // (The configuration keeps both caps at 1 or more, so a refused org
        // always holds something: its entry stays.)
        if *n >= max {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                format!(
                    "this org has {max} {what} open, the most allowed ({key}); \
                     close one or try again later"
                ),
            ));
        }
        *n += 1;
        Ok(Slot {
            caps: self.clone(),
            org: org.to_owned(),
            hold,
        })
    }

    /// What `org` holds now: (streams, waits).
    #[cfg(test)]
    fn held(&self, org: &str) -> (u32, u32) {
        self.lock().get(org).copied().unwrap_or_default()
    }
}

/// A stream or wait an org holds; dropping it gives the slot back.
#[derive(Debug)]
pub(crate) struct Slot {
    caps: Arc<OrgCaps>,
    org: String,
    hold: Hold,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.caps.lock();
        if let Some(entry) = held.get_mut(&self.org) {
            match self.hold {
                Hold::Stream => entry.0 = entry.0.saturating_sub(1),
                Hold::Wait => entry.1 = entry.1.saturating_sub(1),
            }
            if *entry == (0, 0) {
                held.remove(&self.org);
            }
        }
    }
}

/// Refuses an over-long URI (414) or over-large headers (431) before any
/// routing, so the request log never carries them either.
pub async fn check_head(req: Request, next: Next) -> Response {
    let uri = req.uri();
    let uri_len = uri.path().len() + uri.query().map_or(0, |q| q.len() + 1);
    if uri_len > MAX_URI {
        return ApiError::new(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!("the URI is {uri_len} bytes, over the limit of {MAX_URI} (8 KiB)"),
        )
        .field("uri")
        .into_response();
    }
    let header_len: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum();
    if header_len > MAX_HEADERS {
        return ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!("the headers are {header_len} bytes, over the limit of {MAX_HEADERS} (32 KiB)"),
        )
        .field("headers")
        .into_response();
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn slots_are_per_org_and_given_back_on_drop() {
        let caps = OrgCaps::new(2, 1);
        let a = caps.take("a", Hold::Stream).unwrap();
        let _b = caps.take("a", Hold::Stream).unwrap();
        let e = caps.take("a", Hold::Stream).unwrap_err();
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(e.detail.code, "too_many_requests");
        assert!(e.detail.message.contains("api.max_streams_per_org"));
        // Another org, and another kind, are not affected.
        let _c = caps.take("b", Hold::Stream).unwrap();
        let w = caps.take("a", Hold::Wait).unwrap();
        assert!(caps.take("a", Hold::Wait).is_err());
        drop(a);
        assert_eq!(caps.held("a"), (1, 1));
        let _d = caps.take("a", Hold::Stream).unwrap();
        drop(w);
        assert_eq!(caps.held("a"), (2, 0));
        assert_eq!(caps.held("nobody"), (0, 0));
        assert!(caps.take("nobody", Hold::Wait).is_ok());
        assert!(caps.lock().get("nobody").is_none(), "emptied entries go");
    }
}
