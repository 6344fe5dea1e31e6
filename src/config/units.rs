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
            Raw::Text(text) => text.trim().parse::<ByteSize>().map_err(|e| {
                D::Error::custom(format!(
                    "invalid size {text:?} ({e}): expected a number of bytes or a number \
                     with a unit, such as \"64KiB\", \"10MiB\" or \"1GiB\""
                ))
            }),
        }
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
    fn durations_parse_and_explain() {
        assert_eq!(duration::parse("1m30s").unwrap(), Duration::from_secs(90));
        let err = duration::parse("4x").unwrap_err();
        assert!(err.contains("\"40s\""), "{err}");
    }
}
