//! The envelope every message on the bus travels in (DESIGN §1), and the
//! typed-payload trait that keeps payloads Rust types with a schema version.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::clock::Timestamp;
use crate::id::{EventId, FlowId};

/// A typed event payload. `TYPE` is the dotted event name; `VERSION` is bumped
/// only for incompatible changes — additive changes keep the version because
/// consumers ignore unknown fields (never use `deny_unknown_fields` on a
/// payload), so a newer producer does not break an older consumer.
pub trait EventPayload: Serialize + DeserializeOwned {
    const TYPE: &'static str;
    const VERSION: u32 = 1;
}

/// One message on the bus.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    /// Unique and time-ordered; the dedupe key.
    pub id: EventId,
    /// Dotted name, e.g. `instance.requested`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Schema version of `payload`.
    pub version: u32,
    /// Tenant; `None` only for system events that belong to no org.
    pub org_id: Option<String>,
    /// The entity the event is about (an instance id, …).
    pub subject: Option<String>,
    /// Same for every event caused by one user action.
    pub flow_id: FlowId,
    /// The event whose handling emitted this one; `None` for the first.
    pub causation_id: Option<EventId>,
    /// Delivery attempt of this envelope for the receiving worker (1-based);
    /// 0 in the event log, where no worker is receiving it.
    pub attempt: u32,
    pub created_at: Timestamp,
    /// Not to be handled before this time.
    pub not_before: Option<Timestamp>,
    pub payload: Box<RawValue>,
}

/// Why a payload could not be read; the reason is kept in the dead letter.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("event {id} has type '{actual}', expected '{expected}'")]
    WrongType {
        id: EventId,
        expected: &'static str,
        actual: String,
    },
    #[error(
        "event {id} of type '{event_type}' has payload version {actual}, newer than the {known} this worker understands"
    )]
    NewerVersion {
        id: EventId,
        event_type: String,
        actual: u32,
        known: u32,
    },
    #[error("malformed payload for event {id} of type '{event_type}': {source}")]
    Malformed {
        id: EventId,
        event_type: String,
        #[source]
        source: serde_json::Error,
    },
}

impl Envelope {
    /// Reads the payload as `T`, checking type and version first.
    pub fn payload<T: EventPayload>(&self) -> Result<T, PayloadError> {
        if self.event_type != T::TYPE {
            return Err(PayloadError::WrongType {
                id: self.id,
                expected: T::TYPE,
                actual: self.event_type.clone(),
            });
        }
        if self.version > T::VERSION {
            return Err(PayloadError::NewerVersion {
                id: self.id,
                event_type: self.event_type.clone(),
                actual: self.version,
                known: T::VERSION,
            });
        }
        self.payload_as()
    }

    /// Reads the payload as any deserializable type, without a type check;
    /// for workers subscribed to several types that share a shape.
    pub fn payload_as<T: DeserializeOwned>(&self) -> Result<T, PayloadError> {
        serde_json::from_str(self.payload.get()).map_err(|source| PayloadError::Malformed {
            id: self.id,
            event_type: self.event_type.clone(),
            source,
        })
    }
}

/// An event to be published: what a handler emits or the API submits. The
/// framework fills in id, flow, causation and timestamps; org and subject
/// default to those of the causing event.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub event_type: String,
    pub version: u32,
    pub payload: Box<RawValue>,
    pub org_id: Option<String>,
    pub subject: Option<String>,
    pub not_before: Option<Timestamp>,
}

impl NewEvent {
    pub fn of<T: EventPayload>(payload: &T) -> Result<Self, serde_json::Error> {
        Self::with_type(T::TYPE, T::VERSION, payload)
    }

    /// For event types known only at run time (the configured failure events).
    pub fn with_type<T: Serialize>(
        event_type: impl Into<String>,
        version: u32,
        payload: &T,
    ) -> Result<Self, serde_json::Error> {
        Ok(NewEvent {
            event_type: event_type.into(),
            version,
            payload: serde_json::value::to_raw_value(payload)?,
            org_id: None,
            subject: None,
            not_before: None,
        })
    }

    pub fn org(mut self, org: impl Into<String>) -> Self {
        self.org_id = Some(org.into());
        self
    }

    pub fn subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }

    pub fn not_before(mut self, t: Timestamp) -> Self {
        self.not_before = Some(t);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::IdGen;
    use std::sync::Arc;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct V1 {
        name: String,
    }
    impl EventPayload for V1 {
        const TYPE: &'static str = "thing.made";
    }

    fn env(event_type: &str, version: u32, payload: &str) -> Envelope {
        let ids = IdGen::new(
            Arc::new(crate::SystemClock),
            Arc::new(crate::SeededRng::new(3)),
        );
        Envelope {
            id: ids.event_id(),
            event_type: event_type.into(),
            version,
            org_id: Some("org".into()),
            subject: None,
            flow_id: ids.flow_id(),
            causation_id: None,
            attempt: 1,
            created_at: Timestamp::from_micros(1),
            not_before: None,
            payload: RawValue::from_string(payload.into()).unwrap(),
        }
    }

    #[test]
    fn unknown_fields_are_tolerated() {
        let e = env("thing.made", 1, r#"{"name":"a","added_later":42}"#);
        assert_eq!(e.payload::<V1>().unwrap(), V1 { name: "a".into() });
    }

    #[test]
    fn wrong_type_newer_version_and_malformed_are_reported() {
        let e = env("other.thing", 1, r#"{"name":"a"}"#);
        assert!(matches!(
            e.payload::<V1>(),
            Err(PayloadError::WrongType { .. })
        ));
        let e = env("thing.made", 2, r#"{"name":"a"}"#);
        let err = e.payload::<V1>().unwrap_err();
        assert!(err.to_string().contains("version 2"), "{err}");
        let e = env("thing.made", 1, r#"{"nom":"a"}"#);
        let err = e.payload::<V1>().unwrap_err();
        assert!(err.to_string().contains("missing field `name`"), "{err}");
    }

    #[test]
    fn envelope_roundtrips_with_raw_payload() {
        let e = env("thing.made", 1, r#"{"name":"x"}"#);
        let json = serde_json::to_string(&e).unwrap();
        assert!(json.contains(r#""type":"thing.made""#));
        let back: Envelope = serde_json::from_str(&json).unwrap();
        assert_eq!(back.id, e.id);
        assert_eq!(back.payload.get(), r#"{"name":"x"}"#);
    }
}
