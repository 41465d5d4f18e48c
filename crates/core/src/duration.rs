//! Durations in configuration and on the wire are human strings ("250ms",
//! "30s", "2m"), read and written with humantime.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

/// Parses a human duration, with an error that shows how to write one.
pub fn parse(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| {
        format!("invalid duration \"{s}\" ({e}); write e.g. \"250ms\", \"30s\", \"2m\"")
    })
}

/// `#[serde(with = "berth_core::duration::human")]`
pub mod human {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map_err(serde::de::Error::custom)
    }
}

/// `#[serde(default, with = "berth_core::duration::opt_human")]`
pub mod opt_human {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.collect_str(&humantime::format_duration(*d)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map(Some).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_and_explains() {
        assert_eq!(super::parse("250ms").unwrap().as_millis(), 250);
        assert_eq!(super::parse(" 2m ").unwrap().as_secs(), 120);
        let e = super::parse("-1s").unwrap_err();
        assert!(e.contains("\"-1s\"") && e.contains("e.g."), "{e}");
    }
}
