//! Pure domain types: money, currencies, payment statuses and their allowed transitions.
//! Nothing here touches the database or the network.

pub mod correlation;
pub mod events;

use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// Largest number of digits before the decimal point: the column is NUMERIC(18,2).
pub const MAX_INTEGER_DIGITS: u32 = 16;
/// Amounts are in major units with at most this many decimal places (kopecks, cents).
pub const MAX_SCALE: u32 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Currency {
    Rub,
    Usd,
    Eur,
}

impl Currency {
    pub const ALL: [Currency; 3] = [Currency::Rub, Currency::Usd, Currency::Eur];

    pub fn as_str(self) -> &'static str {
        match self {
            Currency::Rub => "RUB",
            Currency::Usd => "USD",
            Currency::Eur => "EUR",
        }
    }
}

impl FromStr for Currency {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Currency::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or(())
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PaymentStatus {
    Pending,
    Succeeded,
    Failed,
}

impl PaymentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            PaymentStatus::Pending => "pending",
            PaymentStatus::Succeeded => "succeeded",
            PaymentStatus::Failed => "failed",
        }
    }

    pub fn is_final(self) -> bool {
        self != PaymentStatus::Pending
    }

    /// The only transitions there are: pending -> succeeded and pending -> failed. A final
    /// status never changes again.
    pub fn can_become(self, next: PaymentStatus) -> bool {
        self == PaymentStatus::Pending && next.is_final()
    }
}

impl FromStr for PaymentStatus {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "pending" => Ok(PaymentStatus::Pending),
            "succeeded" => Ok(PaymentStatus::Succeeded),
            "failed" => Ok(PaymentStatus::Failed),
            _ => Err(()),
        }
    }
}

impl fmt::Display for PaymentStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an amount was refused, phrased for the API client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AmountError {
    NotANumber,
    NotPositive,
    TooPrecise,
    TooLarge,
}

impl fmt::Display for AmountError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AmountError::NotANumber => "must be a decimal number such as \"100.50\"",
            AmountError::NotPositive => "must be greater than 0",
            AmountError::TooPrecise => "must have at most 2 decimal places",
            AmountError::TooLarge => "must have at most 16 digits before the decimal point",
        })
    }
}

/// Parses an amount written in decimal ("100.5", "100.50", "1e2"), exactly: no float on the way.
/// Trailing zeros do not count as precision ("100.500" is 100.50); the result has scale 2.
pub fn parse_amount(text: &str) -> Result<Decimal, AmountError> {
    if !is_decimal_literal(text) {
        return Err(AmountError::NotANumber);
    }
    let parsed = if text.contains(['e', 'E']) {
        Decimal::from_scientific(text)
    } else {
        Decimal::from_str_exact(text)
    };
    // rust_decimal holds 28 digits: a well-formed number that does not fit is far beyond
    // NUMERIC(18,2).
    validate_amount(parsed.map_err(|_| AmountError::TooLarge)?)
}

/// `-?digits(.digits)?([eE][+-]?digits)?`
fn is_decimal_literal(text: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let text = text.strip_prefix('-').unwrap_or(text);
    let (mantissa, exponent) = match text.split_once(['e', 'E']) {
        Some((m, e)) => (m, Some(e.strip_prefix(['+', '-']).unwrap_or(e))),
        None => (text, None),
    };
    let mantissa_ok = match mantissa.split_once('.') {
        Some((i, f)) => digits(i) && digits(f),
        None => digits(mantissa),
    };
    mantissa_ok && exponent.is_none_or(digits)
}

/// The rules every amount obeys: > 0, at most 2 decimals, at most 16 integer digits.
pub fn validate_amount(value: Decimal) -> Result<Decimal, AmountError> {
    let normalized = value.normalize();
    if normalized <= Decimal::ZERO {
        return Err(AmountError::NotPositive);
    }
    if normalized.scale() > MAX_SCALE {
        return Err(AmountError::TooPrecise);
    }
    let limit = Decimal::from(10u64.pow(MAX_INTEGER_DIGITS));
    if normalized >= limit {
        return Err(AmountError::TooLarge);
    }
    let mut two = normalized;
    two.rescale(MAX_SCALE);
    Ok(two)
}

/// An amount as the API prints it: always two decimals, "100.50".
pub fn format_amount(value: Decimal) -> String {
    let mut v = value;
    v.rescale(MAX_SCALE);
    v.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_parse_exactly() {
        assert_eq!(format_amount(parse_amount("100.5").unwrap()), "100.50");
        assert_eq!(format_amount(parse_amount("100.50").unwrap()), "100.50");
        assert_eq!(format_amount(parse_amount("100.500").unwrap()), "100.50");
        assert_eq!(format_amount(parse_amount("1e2").unwrap()), "100.00");
        assert_eq!(format_amount(parse_amount("0.01").unwrap()), "0.01");
        assert_eq!(
            format_amount(parse_amount("9999999999999999.99").unwrap()),
            "9999999999999999.99"
        );
        assert_eq!(
            format_amount(parse_amount("1234567890123456.78").unwrap()),
            "1234567890123456.78",
            "no f64 rounding"
        );
    }

    #[test]
    fn amounts_are_refused_with_the_reason() {
        assert_eq!(parse_amount("0"), Err(AmountError::NotPositive));
        assert_eq!(parse_amount("0.00"), Err(AmountError::NotPositive));
        assert_eq!(parse_amount("-1"), Err(AmountError::NotPositive));
        assert_eq!(parse_amount("1.001"), Err(AmountError::TooPrecise));
        assert_eq!(
            parse_amount("10000000000000000"),
            Err(AmountError::TooLarge)
        );
        assert_eq!(parse_amount("1e300"), Err(AmountError::TooLarge));
        assert_eq!(
            parse_amount("123456789012345678901234567890"),
            Err(AmountError::TooLarge)
        );
        for bad in ["", "abc", "1,5", " 1", "1 ", "0x10", "NaN", "1.2.3", "--1"] {
            assert_eq!(parse_amount(bad), Err(AmountError::NotANumber), "{bad:?}");
        }
    }

    #[test]
    fn only_pending_moves_and_only_to_a_final_status() {
        use PaymentStatus::*;
        assert!(Pending.can_become(Succeeded));
        assert!(Pending.can_become(Failed));
        assert!(!Pending.can_become(Pending));
        for s in [Succeeded, Failed] {
            for n in [Pending, Succeeded, Failed] {
                assert!(!s.can_become(n));
            }
        }
    }

    #[test]
    fn currencies_are_exact_iso_codes() {
        assert_eq!("RUB".parse::<Currency>(), Ok(Currency::Rub));
        assert!("rub".parse::<Currency>().is_err());
        assert!("GBP".parse::<Currency>().is_err());
    }
}
