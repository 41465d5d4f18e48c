//! Fuzz target: an event envelope decoded from bytes, and its payload read
//! as each lifecycle payload type. Decoding never panics, and whatever
//! decodes survives encode → decode unchanged.
#![no_main]

use berth_core::Envelope;
use berth_core::envelope::{EventPayload, PayloadError};
use berth_core::events::{WorkerFailed, instance};
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = serde_json::from_slice::<Envelope>(data) {
        let once = encode(&env);
        let again: Envelope = match serde_json::from_str(&once) {
            Ok(e) => e,
            Err(e) => panic!("an envelope it encoded does not decode: {e}\n{once}"),
        };
        assert_eq!(once, encode(&again), "encode → decode changed the envelope");
        // What the event stream and the CLI show of one.
        let _ = env.created_at.to_string();
        let _ = env.not_before.map(|t| t.to_string());
        payloads(&env);
    }
    // The bytes as the payload of an envelope of every type: the path a
    // worker takes for a message whose envelope is well-formed.
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(raw) = RawValue::from_string(text.to_owned())
    {
        for ty in TYPES {
            payloads(&synthetic(ty, raw.clone()));
        }
    }
});

fn encode(env: &Envelope) -> String {
    match serde_json::to_string(env) {
        Ok(s) => s,
        Err(e) => panic!("a decoded envelope does not encode: {e}"),
    }
}

/// Reads `env`'s payload as every payload type; one that reads must read
/// back equal after encoding.
fn payloads(env: &Envelope) {
    macro_rules! each {
        ($($t:ty),* $(,)?) => {$(
            round_trip::<$t>(env, env.payload::<$t>());
        )*};
    }
    each!(
        instance::Requested,
        instance::HostReady,
        instance::NetworkReady,
        instance::ImageBuilt,
        instance::ContainerStarted,
        instance::ContainerAttached,
        instance::Running,
        instance::Failed,
        instance::DeleteRequested,
        instance::Deleted,
        instance::StopRequested,
        instance::Stopped,
        instance::StartRequested,
        instance::Exited,
        instance::ContainerDied,
        instance::TimedOut,
    );
    // Failure events share one shape and are read without a type check.
    round_trip::<WorkerFailed>(env, env.payload_as::<WorkerFailed>());
}

fn round_trip<T>(env: &Envelope, read: Result<T, PayloadError>)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let Ok(p) = read else { return };
    let raw = match serde_json::value::to_raw_value(&p) {
        Ok(r) => r,
        Err(e) => panic!("a decoded payload does not encode: {e}: {p:?}"),
    };
    let mut back = env.clone();
    back.payload = raw;
    match back.payload_as::<T>() {
        Ok(q) => assert_eq!(p, q, "encode → decode changed the payload"),
        Err(e) => panic!("a payload it encoded does not decode: {e}: {p:?}"),
    }
}

/// Every type a worker reads, and one no worker knows.
const TYPES: &[&str] = &[
    instance::Requested::TYPE,
    instance::HostReady::TYPE,
    instance::NetworkReady::TYPE,
    instance::ImageBuilt::TYPE,
    instance::ContainerStarted::TYPE,
    instance::ContainerAttached::TYPE,
    instance::Running::TYPE,
    instance::Failed::TYPE,
    instance::DeleteRequested::TYPE,
    instance::Deleted::TYPE,
    instance::StopRequested::TYPE,
    instance::Stopped::TYPE,
    instance::StartRequested::TYPE,
    instance::Exited::TYPE,
    instance::ContainerDied::TYPE,
    instance::TimedOut::TYPE,
    "network.attach.failed",
];

const ZERO: &str = "00000000000000000000000000";

fn synthetic(event_type: &str, payload: Box<RawValue>) -> Envelope {
    Envelope {
        id: ZERO.parse().expect("a valid event id"),
        event_type: event_type.to_owned(),
        version: 1,
        org_id: Some("org".to_owned()),
        subject: Some("inst".to_owned()),
        flow_id: ZERO.parse().expect("a valid flow id"),
        causation_id: None,
        attempt: 1,
        created_at: berth_core::Timestamp::from_micros(1),
        not_before: None,
        payload,
    }
}
