//! Notifications: one worker per provider, each with its own retry policy,
//! so a provider that is down delays no flow and fails no instance — its
//! deliveries retry, then dead-letter, on their own. The webhook provider
//! POSTs a JSON body describing the instance event and signs it with
//! HMAC-SHA256 over the exact body bytes, in the `Berth-Signature` header as
//! `sha256=<hex>`, so a receiver can check it came from this Berth.

use std::time::Duration;

use berth_core::EventPayload;
use berth_core::events::instance as ev;
use berth_worker::{Ctx, HandlerError, HandlerResult, Registry, RegistryError};
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;

/// The header carrying the body's signature.
pub const SIGNATURE_HEADER: &str = "Berth-Signature";

/// The instance events a notifier forwards.
pub const EVENTS: &[&str] = &[
    ev::Running::TYPE,
    ev::Failed::TYPE,
    ev::Exited::TYPE,
    ev::Deleted::TYPE,
];

/// One webhook provider.
#[derive(Debug, Clone)]
pub struct Webhook {
    /// Names the worker `notify.<name>` (its policy is `[workers."notify.<name>"]`).
    pub name: String,
    /// `http://` URL to POST to.
    pub url: String,
    /// Key of the HMAC-SHA256 signature.
    pub secret: String,
    /// Per-request timeout (the worker's policy timeout bounds the attempt).
    pub timeout: Duration,
}

/// The body sent for each event.
#[derive(Debug, Serialize)]
struct Body<'a> {
    event_id: String,
    #[serde(rename = "type")]
    event_type: &'a str,
    org_id: Option<&'a str>,
    instance_id: Option<&'a str>,
    flow_id: String,
    created_at: String,
    data: &'a serde_json::value::RawValue,
}

/// `sha256=<hex>` of `body` under `secret`.
pub fn sign(secret: &str, body: &[u8]) -> String {
    // HMAC accepts keys of any length; this cannot fail.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(body);
    let bytes = mac.finalize().into_bytes();
    let mut hex = String::with_capacity(7 + bytes.len() * 2);
    hex.push_str("sha256=");
    for b in bytes {
        hex.push_str(&format!("{b:02x}"));
    }
    hex
}

/// Registers worker `notify.<name>` for `hook`.
pub fn register(reg: &mut Registry, hook: Webhook) -> Result<(), RegistryError> {
    let client = reqwest::Client::builder()
        .timeout(hook.timeout)
        .build()
        .ok();
    let name = format!("notify.{}", hook.name);
    reg.register(&name, EVENTS, move |ctx| {
        deliver(ctx, hook.clone(), client.clone())
    })?;
    Ok(())
}

async fn deliver(ctx: Ctx, hook: Webhook, client: Option<reqwest::Client>) -> HandlerResult {
    let Some(client) = client else {
        return Err(HandlerError::fatal(anyhow::anyhow!(
            "cannot build an HTTP client"
        )));
    };
    let e = ctx.envelope();
    let body = serde_json::to_vec(&Body {
        event_id: e.id.to_string(),
        event_type: &e.event_type,
        org_id: e.org_id.as_deref(),
        instance_id: e.subject.as_deref(),
        flow_id: e.flow_id.to_string(),
        created_at: e.created_at.to_string(),
        data: &e.payload,
    })
    .map_err(HandlerError::fatal)?;
    let signature = sign(&hook.secret, &body);
    let response = client
        .post(&hook.url)
        .header("content-type", "application/json")
        .header(SIGNATURE_HEADER, signature)
        .header("Berth-Event", e.event_type.as_str())
        .header("Berth-Delivery", e.id.to_string())
        .body(body)
        .send()
        .await
        .map_err(|err| HandlerError::retryable(err).with_code("webhook_unreachable"))?;
    let status = response.status();
    if status.is_success() {
        return Ok(ctx.done());
    }
    let err = anyhow::anyhow!("webhook {} answered {status}", hook.url);
    // A client error other than timeouts and rate limits will not change by
    // retrying the same request.
    if status.is_client_error() && status.as_u16() != 408 && status.as_u16() != 429 {
        Err(HandlerError::fatal(err).with_code("webhook_rejected"))
    } else {
        Err(HandlerError::retryable(err).with_code("webhook_failed"))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn signature_matches_a_known_vector() {
        // RFC 4231 test case 2.
        assert_eq!(
            super::sign("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
