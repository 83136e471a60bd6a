//! Typed sizes and durations for flags and config files, and human-readable size output.
//!
//! Sizes are bytes with an optional binary suffix (`K`, `M`, `G`, `T`, `P`, optionally
//! followed by `i` and/or `B`; all mean powers of 1024, as `df -h` does). Durations use
//! humantime syntax (`500ms`, `5s`, `2m`).

use serde::{Deserialize, Deserializer};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A size in bytes parsed from `4096`, `512M`, `10GiB`, `1.5T`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

/// Why a size or duration did not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseValueError {
    #[error("invalid size {0:?}: expected a number with an optional K/M/G/T/P suffix")]
    Size(String),
    #[error("invalid duration {0:?}: expected e.g. 500ms, 5s, 2m")]
    Duration(String),
}

impl FromStr for ByteSize {
    type Err = ParseValueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseValueError::Size(s.to_string());
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let unit = unit.trim();
        let unit = unit.strip_suffix(['B', 'b']).unwrap_or(unit);
        let unit = unit.strip_suffix('i').unwrap_or(unit);
        let shift = match unit.to_ascii_uppercase().as_str() {
            "" => 0,
            "K" => 10,
            "M" => 20,
            "G" => 30,
            "T" => 40,
            "P" => 50,
            _ => return Err(err()),
        };
        if num.is_empty() {
            return Err(err());
        }
        if let Ok(n) = num.parse::<u64>() {
            return n.checked_mul(1u64 << shift).map(ByteSize).ok_or_else(err);
        }
        let f: f64 = num.parse().map_err(|_| err())?;
        let bytes = f * (1u64 << shift) as f64;
        if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
            return Err(err());
        }
        Ok(ByteSize(bytes as u64))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Accept both `capacity = 1073741824` and `capacity = "1G"`.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Str(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A duration parsed from humantime syntax (`5s`, `500ms`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl FromStr for Dur {
    type Err = ParseValueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        humantime::parse_duration(s.trim())
            .map(Dur)
            .map_err(|_| ParseValueError::Duration(s.to_string()))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Formats bytes the way `df -h` does: `0 B`, `512 B`, `1.5 KiB`, `20.0 GiB`.
pub struct Human(pub u64);

impl fmt::Display for Human {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
        if self.0 < 1024 {
            return write!(f, "{} B", self.0);
        }
        let mut v = self.0 as f64 / 1024.0;
        let mut i = 0;
        while v >= 1024.0 && i + 1 < UNITS.len() {
            v /= 1024.0;
            i += 1;
        }
        write!(f, "{v:.1} {}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!("4096".parse(), Ok(ByteSize(4096)));
        assert_eq!("1K".parse(), Ok(ByteSize(1024)));
        assert_eq!("512M".parse(), Ok(ByteSize(512 << 20)));
        assert_eq!("10GiB".parse(), Ok(ByteSize(10 << 30)));
        assert_eq!("2 TB".parse(), Ok(ByteSize(2 << 40)));
        assert_eq!("1.5G".parse(), Ok(ByteSize(3 << 29)));
    }

    #[test]
    fn bad_sizes_are_refused() {
        for s in [
            "",
            "G",
            "12X",
            "-1",
            "1.2.3M",
            "99999999999999999999",
            "20000000P",
        ] {
            assert!(s.parse::<ByteSize>().is_err(), "{s} should not parse");
        }
    }

    #[test]
    fn durations_parse() {
        assert_eq!("5s".parse(), Ok(Dur(Duration::from_secs(5))));
        assert_eq!("250ms".parse(), Ok(Dur(Duration::from_millis(250))));
        assert!("soon".parse::<Dur>().is_err());
    }

    #[test]
    fn human_sizes_read_like_df() {
        assert_eq!(Human(0).to_string(), "0 B");
        assert_eq!(Human(1536).to_string(), "1.5 KiB");
        assert_eq!(Human(20 << 30).to_string(), "20.0 GiB");
    }
}
