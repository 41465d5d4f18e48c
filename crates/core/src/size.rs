//! Byte sizes as people write them in configuration and requests: `512MiB`,
//! `1GiB`, `64KiB`, `100MB`, or a plain number of bytes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A number of bytes, written and read as `512MiB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

const UNITS: &[(&str, u64)] = &[
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
    ("TiB", 1 << 40),
    ("kB", 1_000),
    ("KB", 1_000),
    ("MB", 1_000_000),
    ("GB", 1_000_000_000),
    ("TB", 1_000_000_000_000),
    ("B", 1),
];

/// Why a size cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a size: write a number of bytes or one with a unit, e.g. 512MiB, 1GiB, 64KiB"
)]
pub struct InvalidSize(pub String);

impl ByteSize {
    pub fn bytes(self) -> u64 {
        self.0
    }

    pub const fn mib(n: u64) -> ByteSize {
        ByteSize(n << 20)
    }
}

impl FromStr for ByteSize {
    type Err = InvalidSize;
    fn from_str(s: &str) -> Result<Self, InvalidSize> {
        let bad = || InvalidSize(s.chars().take(40).collect());
        let t = s.trim();
        let (num, mult) = UNITS
            .iter()
            .find_map(|(u, m)| t.strip_suffix(u).map(|n| (n.trim(), *m)))
            .unwrap_or((t, 1));
        if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let n: u64 = num.parse().map_err(|_| bad())?;
        n.checked_mul(mult).map(ByteSize).ok_or_else(bad)
    }
}

impl fmt::Display for ByteSize {
    /// The largest binary unit that divides the size exactly.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (u, m) in [
            ("TiB", 1u64 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ] {
            if self.0 >= m && self.0.is_multiple_of(m) {
                return write!(f, "{}{u}", self.0 / m);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    /// A string with a unit, or a plain number of bytes.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(SizeVisitor)
    }
}

struct SizeVisitor;

impl serde::de::Visitor<'_> for SizeVisitor {
    type Value = ByteSize;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a size such as \"512MiB\" or a whole number of bytes")
    }

    fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<ByteSize, E> {
        Ok(ByteSize(n))
    }

    fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<ByteSize, E> {
        u64::try_from(n)
            .map(ByteSize)
            .map_err(|_| E::custom(format!("{n} is negative; a size is 0 or more bytes")))
    }

    fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<ByteSize, E> {
        // `512.0` is the whole number JSON Schema's `integer` allows; exact
        // below 2^53.
        if n.fract() == 0.0 && (0.0..=9_007_199_254_740_992.0).contains(&n) {
            return Ok(ByteSize(n as u64));
        }
        Err(E::custom(format!(
            "{n} is not a whole number of bytes; write e.g. \"512MiB\""
        )))
    }

    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<ByteSize, E> {
        s.parse().map_err(E::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::ByteSize;

    #[test]
    fn sizes_read_and_write_back() {
        for (s, n) in [
            ("512MiB", 512u64 << 20),
            ("1GiB", 1 << 30),
            ("64KiB", 64 << 10),
            ("100MB", 100_000_000),
            ("2048", 2048),
            ("7B", 7),
        ] {
            assert_eq!(s.parse::<ByteSize>(), Ok(ByteSize(n)), "{s}");
        }
        assert_eq!(ByteSize(512 << 20).to_string(), "512MiB");
        assert_eq!(ByteSize(1000).to_string(), "1000B");
        for bad in [
            "",
            "MiB",
            "-1MiB",
            "1.5GiB",
            "12 parsecs",
            "99999999999999TiB",
        ] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad}");
        }
    }
}
