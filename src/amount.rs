//! Money as an exact decimal: an amount is parsed from the JSON number's own text, stored as
//! NUMERIC(20,4) and sent on as decimal text, so no float ever rounds it.

use bigdecimal::{BigDecimal, Signed};
use std::{fmt, str::FromStr};

/// Digits allowed before the decimal point (NUMERIC(20,4) leaves 16).
pub const MAX_INTEGER_DIGITS: i64 = 16;
/// Digits allowed after the decimal point.
pub const MAX_FRACTION_DIGITS: i64 = 4;

/// A positive amount in major currency units that fits NUMERIC(20,4) without rounding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Amount(BigDecimal);

/// Why a JSON number is not an acceptable amount.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("must be a JSON number, got {0}")]
    /// Not a JSON number (a string, say).
    NotANumber(String),
    #[error("must be greater than zero, got {0}")]
    /// Zero or negative.
    NotPositive(String),
    #[error("must have at most {MAX_INTEGER_DIGITS} digits before the decimal point, got {0}")]
    /// More than 16 digits before the point.
    TooLarge(String),
    #[error("must have at most {MAX_FRACTION_DIGITS} digits after the decimal point, got {0}")]
    /// More than 4 significant digits after the point.
    TooPrecise(String),
}

impl Amount {
    /// Parses the text of a JSON number (as it stood in the message) into an exact amount.
    pub fn from_json_number(text: &str) -> Result<Self, AmountError> {
        let shown = abbreviate(text);
        let looks_numeric = text.starts_with(|c: char| c == '-' || c.is_ascii_digit());
        if !looks_numeric {
            return Err(AmountError::NotANumber(shown));
        }
        // The shape is checked on the text first, in time linear in its length and with checked
        // arithmetic: an exponent such as 1e-9223372036854775808 never reaches the decimal type,
        // which would try to build a power of ten that large.
        let shape = Shape::of(text).ok_or_else(|| AmountError::NotANumber(shown.clone()))?;
        if shape.negative || shape.significant == 0 {
            return Err(AmountError::NotPositive(shown));
        }
        if shape.integer_digits > MAX_INTEGER_DIGITS {
            return Err(AmountError::TooLarge(shown));
        }
        if shape.fraction_digits > MAX_FRACTION_DIGITS {
            return Err(AmountError::TooPrecise(shown));
        }
        let value =
            BigDecimal::from_str(text).map_err(|_| AmountError::NotANumber(shown.clone()))?;
        if !value.is_positive() {
            return Err(AmountError::NotPositive(shown));
        }
        // Trailing zeros say nothing about the value: 7.50000 is 7.5 and fits.
        let normalized = value.normalized();
        let fraction_digits = normalized.fractional_digit_count().max(0);
        let integer_digits = normalized.digits() as i64 - normalized.fractional_digit_count();
        if integer_digits > MAX_INTEGER_DIGITS {
            return Err(AmountError::TooLarge(shown));
        }
        if fraction_digits > MAX_FRACTION_DIGITS {
            return Err(AmountError::TooPrecise(shown));
        }
        // Keep the scale the sender used (7.50 stays 7.50) unless it is beyond what we store.
        let value = if value.fractional_digit_count() > MAX_FRACTION_DIGITS {
            normalized
        } else if value.fractional_digit_count() < 0 {
            value.with_scale(0)
        } else {
            value
        };
        Ok(Self(value))
    }

    /// Wraps a value read back from the database, which already has the stored shape.
    pub fn from_stored(value: BigDecimal) -> Self {
        Self(value)
    }

    /// The exact value.
    pub fn value(&self) -> &BigDecimal {
        &self.0
    }

    /// Plain decimal text, never scientific notation; valid as a JSON number.
    pub fn to_json_number(&self) -> String {
        self.0.to_plain_string()
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_json_number())
    }
}

/// What the text of a JSON number says about its value, read without building it.
#[derive(Debug, PartialEq, Eq)]
struct Shape {
    negative: bool,
    /// Significant digits (leading and trailing zeros left out); 0 for the value zero.
    significant: i64,
    /// Digits before the decimal point once written out without an exponent.
    integer_digits: i64,
    /// Digits after the decimal point once written out without an exponent (trailing zeros
    /// left out).
    fraction_digits: i64,
}

impl Shape {
    /// The shape of a JSON number's text, `None` when the text is not one. An exponent too large
    /// for an `i64` saturates: the value is then far outside NUMERIC(20,4) either way.
    fn of(text: &str) -> Option<Self> {
        let (negative, rest) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (mantissa, exponent) = match rest.find(['e', 'E']) {
            Some(at) => (&rest[..at], Some(&rest[at + 1..])),
            None => (rest, None),
        };
        let (integer, fraction) = match mantissa.split_once('.') {
            Some((i, f)) => (i, Some(f)),
            None => (mantissa, None),
        };
        let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !all_digits(integer) || fraction.is_some_and(|f| !all_digits(f)) {
            return None;
        }
        let exponent = match exponent {
            None => 0,
            Some(e) => {
                let (sign, digits) = match e.as_bytes().first() {
                    Some(b'-') => (-1i64, &e[1..]),
                    Some(b'+') => (1, &e[1..]),
                    _ => (1, e),
                };
                if !all_digits(digits) {
                    return None;
                }
                let magnitude = digits.trim_start_matches('0').parse::<i64>().unwrap_or(
                    if digits.trim_start_matches('0').is_empty() {
                        0
                    } else {
                        i64::MAX
                    },
                );
                sign * magnitude
            }
        };
        let fraction = fraction.unwrap_or("");
        let digits = integer.bytes().chain(fraction.bytes());
        let leading = digits.clone().take_while(|b| *b == b'0').count() as i64;
        let total = (integer.len() + fraction.len()) as i64;
        let trailing = digits.rev().take_while(|b| *b == b'0').count() as i64;
        if leading == total {
            return Some(Self {
                negative,
                significant: 0,
                integer_digits: 0,
                fraction_digits: 0,
            });
        }
        let significant = total - leading - trailing;
        // Where the decimal point stands, counted from the first significant digit.
        let point = (integer.len() as i64 - leading).saturating_add(exponent);
        Some(Self {
            negative,
            significant,
            integer_digits: point.max(0),
            fraction_digits: significant.saturating_sub(point).max(0),
        })
    }
}

/// Keeps error messages short when a sender puts something huge in the amount.
fn abbreviate(text: &str) -> String {
    crate::headers::excerpt(text, 40)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_exact_value_and_scale() {
        for (input, expected) in [
            ("9999999999999999.99", "9999999999999999.99"),
            ("9999999999999999.9999", "9999999999999999.9999"),
            ("7.50", "7.50"),
            ("0.0001", "0.0001"),
            ("12", "12"),
            ("1e2", "100"),
            ("1.5E1", "15"),
            ("7.500000", "7.5"),
            ("0.00012e1", "0.0012"),
            ("000012.3400e-2", "0.1234"),
            ("1E+3", "1000"),
            ("12345678901234560000e-4", "1234567890123456.0000"),
        ] {
            let amount = Amount::from_json_number(input).unwrap();
            assert_eq!(amount.to_json_number(), expected, "{input}");
        }
    }

    #[test]
    fn rejects_what_numeric_20_4_cannot_hold() {
        use AmountError::*;
        type Expected = fn(String) -> AmountError;
        let cases: [(&str, Expected); 17] = [
            ("0", NotPositive),
            ("0.10000000000000000555", TooPrecise),
            ("-1.00", NotPositive),
            ("0.00001", TooPrecise),
            ("1.23456", TooPrecise),
            ("10000000000000000", TooLarge),
            ("1e16", TooLarge),
            ("1e999999999", TooLarge),
            ("\"7.50\"", NotANumber),
            ("1e9223372036854775807", TooLarge),
            ("1e99999999999999999999999", TooLarge),
            ("1e-9223372036854775808", TooPrecise),
            ("1e-99999999999999999999999", TooPrecise),
            ("0e99999999999999999999999", NotPositive),
            ("-1e-99999999999999999999999", NotPositive),
            ("1.", NotANumber),
            ("1e", NotANumber),
        ];
        for (input, kind) in cases {
            let err = Amount::from_json_number(input).unwrap_err();
            assert_eq!(err, kind(abbreviate(input)), "{input}");
        }
    }
}
