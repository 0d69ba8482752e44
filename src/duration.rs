//! Human durations in config files ("90s", "15m", "7d") and their serde glue.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A duration written the way people write them: a number and a unit
/// (`ms`, `s`, `m`, `h`, `d`, `w`), e.g. `"15m"` or `"7d"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

/// Why a duration did not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid duration '{input}': expected a number and a unit (ms, s, m, h, d, w), e.g. \"15m\""
)]
pub struct DurationError {
    input: String,
}

impl HumanDuration {
    pub fn parse(input: &str) -> Result<Self, DurationError> {
        let err = || DurationError {
            input: input.to_string(),
        };
        let text = input.trim();
        let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
        let (number, unit) = text.split_at(split);
        let number: u64 = number.parse().map_err(|_| err())?;
        let millis_per_unit: u64 = match unit.trim() {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "w" => 7 * 86_400_000,
            _ => return Err(err()),
        };
        Ok(Self(Duration::from_millis(
            number.checked_mul(millis_per_unit).ok_or_else(err)?,
        )))
    }

    pub fn as_chrono(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.0).unwrap_or(chrono::Duration::MAX)
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        for (unit, size) in [
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1_000),
        ] {
            if ms > 0 && ms % size == 0 {
                return write!(f, "{}{unit}", ms / size);
            }
        }
        write!(f, "{ms}ms")
    }
}

impl std::str::FromStr for HumanDuration {
    type Err = DurationError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        HumanDuration::parse(text)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        HumanDuration::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit_and_rejects_nonsense() {
        assert_eq!(
            HumanDuration::parse("15m").unwrap().0,
            Duration::from_secs(900)
        );
        assert_eq!(
            HumanDuration::parse("7d").unwrap().0,
            Duration::from_secs(604_800)
        );
        assert_eq!(
            HumanDuration::parse("250ms").unwrap().0,
            Duration::from_millis(250)
        );
        assert!(HumanDuration::parse("15").is_err());
        assert!(HumanDuration::parse("m15").is_err());
        assert!(HumanDuration::parse("15 parsecs").is_err());
        assert_eq!(HumanDuration::parse("2h").unwrap().to_string(), "2h");
    }
}
