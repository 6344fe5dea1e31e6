//! Serde helpers for the human-friendly units used in config files:
//! durations written as `"40s"` or `"1m30s"`, sizes written as `"64KiB"`.

use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

/// `Duration` as a humantime string (`"40s"`, `"1m30s"`, `"500ms"`).
pub mod duration {
    use super::*;

    pub fn serialize<S: Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*value))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map_err(D::Error::custom)
    }

    /// Parses a humantime duration, with an error message saying what is expected.
    ///
    /// # Errors
    /// When `text` is not a number followed by a unit.
    pub fn parse(text: &str) -> Result<Duration, String> {
        humantime::parse_duration(text.trim()).map_err(|_| {
            format!(
                "invalid duration {text:?}: expected a number with a unit, \
                 such as \"40s\", \"1m30s\" or \"500ms\""
            )
        })
    }
}

/// A socket address, with an error message saying what is expected.
pub mod socket_addr {
    use std::net::SocketAddr;

    use super::*;

    pub fn serialize<S: Serializer>(value: &SocketAddr, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(value)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
        let text = String::deserialize(d)?;
        text.trim().parse().map_err(|_| {
            D::Error::custom(format!(
                "invalid address {text:?}: expected IP:PORT, such as \"127.0.0.1:55555\" \
                 or \"[::]:55555\" (host names are not resolved)"
            ))
        })
    }
}

/// An optional [`socket_addr`]: absent means off.
pub mod optional_socket_addr {
    use std::net::SocketAddr;

    use super::*;

    pub fn serialize<S: Serializer>(value: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(addr) => s.collect_str(addr),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        super::socket_addr::deserialize(d).map(Some)
    }
}

/// An optional [`size`]: absent means unset.
pub mod optional_size {
    use super::*;

    pub fn serialize<S: Serializer>(value: &Option<ByteSize>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(size) => super::size::serialize(size, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ByteSize>, D::Error> {
        super::size::deserialize(d).map(Some)
    }
}

/// A byte size as `"64KiB"`, `"10MiB"` or a plain number of bytes.
pub mod size {
    use super::*;

    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;
    const GIB: u64 = 1024 * MIB;

    pub fn serialize<S: Serializer>(value: &ByteSize, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format(*value))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => Ok(ByteSize(n)),
            Raw::Text(text) => parse(&text).map_err(D::Error::custom),
        }
    }

    /// Parses `"64KiB"`, `"1.5MB"` or `"123"` exactly; a size beyond
    /// 2^64 - 1 bytes is an error, not a saturated value.
    ///
    /// # Errors
    /// A malformed size, an unknown unit, or one that overflows.
    pub fn parse(text: &str) -> Result<ByteSize, String> {
        let expected = "expected a number of bytes or a number with a unit, \
                        such as \"64KiB\", \"10MiB\" or \"1GiB\"";
        let trimmed = text.trim();
        let split = trimmed
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(trimmed.len());
        let (number, unit) = trimmed.split_at(split);
        let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1000,
            "ki" | "kib" => 1 << 10,
            "m" | "mb" => 1000u64.pow(2),
            "mi" | "mib" => 1 << 20,
            "g" | "gb" => 1000u64.pow(3),
            "gi" | "gib" => 1 << 30,
            "t" | "tb" => 1000u64.pow(4),
            "ti" | "tib" => 1 << 40,
            "p" | "pb" => 1000u64.pow(5),
            "pi" | "pib" => 1 << 50,
            "e" | "eb" => 1000u64.pow(6),
            "ei" | "eib" => 1 << 60,
            _ => return Err(format!("invalid size {text:?} (unknown unit): {expected}")),
        };
        let too_large =
            || format!("size {text:?} is too large: at most 16EiB (and far less is sensible)");
        let bytes = if number.contains('.') {
            let value: f64 = number
                .parse()
                .map_err(|_| format!("invalid size {text:?}: {expected}"))?;
            let bytes = (value * multiplier as f64).round();
            // 2^64 as f64: anything at or above it does not fit.
            if bytes.is_nan() || bytes >= 18_446_744_073_709_551_616.0 {
                return Err(too_large());
            }
            bytes as u64
        } else {
            let value: u64 = number.parse().map_err(|e: std::num::ParseIntError| {
                if matches!(e.kind(), std::num::IntErrorKind::PosOverflow) {
                    too_large()
                } else {
                    format!("invalid size {text:?}: {expected}")
                }
            })?;
            value.checked_mul(multiplier).ok_or_else(too_large)?
        };
        Ok(ByteSize(bytes))
    }

    /// Formats a size exactly, in the largest binary unit that divides it.
    pub fn format(value: ByteSize) -> String {
        let n = value.as_u64();
        match n {
            0 => "0B".to_owned(),
            n if n % GIB == 0 => format!("{}GiB", n / GIB),
            n if n % MIB == 0 => format!("{}MiB", n / MIB),
            n if n % KIB == 0 => format!("{}KiB", n / KIB),
            n => format!("{n}B"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_format_exactly() {
        assert_eq!(size::format(ByteSize::kib(64)), "64KiB");
        assert_eq!(size::format(ByteSize::mib(10)), "10MiB");
        assert_eq!(size::format(ByteSize(1500)), "1500B");
        assert_eq!("64KiB".parse::<ByteSize>().unwrap(), ByteSize::kib(64));
    }

    #[test]
    fn sizes_that_overflow_are_errors_not_saturated() {
        assert_eq!(size::parse("10MiB").unwrap(), ByteSize::mib(10));
        assert_eq!(size::parse("1.5 KiB").unwrap(), ByteSize(1536));
        assert_eq!(size::parse("7").unwrap(), ByteSize(7));
        assert!(size::parse("16EiB").unwrap_err().contains("too large"));
        for bad in [
            "99999EiB",
            "99999999999999999999",
            "1e30B",
            "1.0e30",
            "20000000000GB",
        ] {
            assert!(size::parse(bad).is_err(), "{bad}");
        }
        assert!(size::parse("99999EiB").unwrap_err().contains("too large"));
        assert!(
            size::parse("4 parsecs")
                .unwrap_err()
                .contains("unknown unit")
        );
        assert!(size::parse("").is_err());
    }

    #[test]
    fn durations_parse_and_explain() {
        assert_eq!(duration::parse("1m30s").unwrap(), Duration::from_secs(90));
        let err = duration::parse("4x").unwrap_err();
        assert!(err.contains("\"40s\""), "{err}");
    }
}
