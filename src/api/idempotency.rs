//! Request fingerprints for idempotency: the same request, however it is spelled, must give the
//! same fingerprint, so that a retry with the same `Idempotency-Key` is recognised as the same
//! request and anything else as a conflict (409).

use serde_json::Value;

/// The request's metadata (or any JSON) with object keys sorted and every number in one exact
/// spelling, so that two values with the same meaning give the same text: `1e3`, `1000.0` and
/// `1000` are one number, as they are to PostgreSQL's jsonb (which stores `1e3` as `1000`).
pub fn canonical_json(v: &Value) -> String {
    let mut out = String::new();
    write_canonical_json(v, &mut out);
    out
}

pub fn write_canonical_json(v: &Value, out: &mut String) {
    match v {
        Value::Object(o) => {
            let mut entries: Vec<_> = o.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical_json(v, out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, v) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical_json(v, out);
            }
            out.push(']');
        }
        Value::Number(n) => out.push_str(&canonical_number(&n.to_string())),
        other => out.push_str(&other.to_string()),
    }
}

/// Where the value is `0.DIGITS x 10^point`, the points [`canonical_number`] writes out in full:
/// enough for every `Decimal` (at most 29 digits before the point and 28 after it), few enough
/// that `1e1000` in metadata does not become a thousand characters to hash.
const POSITIONAL_PLACES: std::ops::RangeInclusive<i64> = -28..=29;

/// A JSON number's text in one exact spelling per value: `1e3`, `1000.0` and `01000` give `1000`;
/// `-0.0` gives `0`; `2.50E-1` gives `0.25`. Exact for every magnitude (no float, no 28-digit
/// limit). Numbers within `POSITIONAL_PLACES` of the decimal point are written out in full —
/// every number a `Decimal` holds is, and gets what `Decimal::normalize` prints, so fingerprints
/// stored before this function existed still match; others are written `0.DIGITSe<N>`
/// (`1e1000` gives `0.1e1001`), so the text never grows beyond the digits given. Text that is
/// not a JSON number is returned unchanged.
fn canonical_number(text: &str) -> String {
    let (negative, rest) = match text.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, text),
    };
    let (mantissa, exponent) = match rest.split_once(['e', 'E']) {
        Some((m, e)) => match e.trim_start_matches('+').parse::<i64>() {
            Ok(e) => (m, e),
            Err(_) => return text.to_string(),
        },
        None => (rest, 0),
    };
    let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int_part.is_empty()
        || !(int_part.bytes().chain(frac_part.bytes())).all(|b| b.is_ascii_digit())
    {
        return text.to_string();
    }
    // value = 0.DIGITS x 10^point, with DIGITS free of leading and trailing zeros
    let all: String = format!("{int_part}{frac_part}");
    let leading = all.bytes().take_while(|&b| b == b'0').count();
    let digits = all[leading..].trim_end_matches('0');
    if digits.is_empty() {
        return "0".to_string();
    }
    let point = (int_part.len() as i64 - leading as i64).saturating_add(exponent);
    let sign = if negative { "-" } else { "" };
    if !POSITIONAL_PLACES.contains(&point) {
        return format!("{sign}0.{digits}e{point}");
    }
    let mut out = String::with_capacity(digits.len() + point.unsigned_abs() as usize + 3);
    out.push_str(sign);
    if point <= 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', point.unsigned_abs() as usize));
        out.push_str(digits);
    } else if point as usize >= digits.len() {
        out.push_str(digits);
        out.extend(std::iter::repeat_n('0', point as usize - digits.len()));
    } else {
        out.push_str(&digits[..point as usize]);
        out.push('.');
        out.push_str(&digits[point as usize..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal::Decimal;

    #[test]
    fn numbers_have_one_canonical_spelling() {
        for (a, b) in [
            ("1e3", "1000"),
            ("1000.0", "1000"),
            ("10E2", "1000"),
            ("1E+3", "1000"),
            ("-0", "0"),
            ("-0.0e5", "0"),
            ("0", "0"),
            ("2.50E-1", "0.25"),
            ("-12.3400", "-12.34"),
            ("0.001", "0.001"),
            ("1e-3", "0.001"),
            ("123.456e1", "1234.56"),
            ("123.456e-5", "0.00123456"),
        ] {
            assert_eq!(canonical_number(a), b, "{a}");
        }
        // PostgreSQL's jsonb prints a large exponent out in full; both spellings mean one number.
        let written = "-4.6258100558555635e+228";
        let stored = format!("-46258100558555635{}", "0".repeat(212));
        assert_eq!(canonical_number(written), "-0.46258100558555635e229");
        assert_eq!(canonical_number(&stored), "-0.46258100558555635e229");
        assert_eq!(canonical_number("0.000123e-40"), "0.123e-43");
        assert_eq!(canonical_number("1e999999999999"), "0.1e1000000000000");
        // The edges of the positional range: a Decimal's largest and smallest magnitudes.
        assert_eq!(canonical_number("7.9e28"), format!("79{}", "0".repeat(27)));
        assert_eq!(canonical_number("1e-28"), format!("0.{}1", "0".repeat(27)));
        assert_eq!(canonical_number("1e29"), "0.1e30");
    }

    proptest::proptest! {
        #[test]
        fn canonical_numbers_match_decimal_where_decimal_is_exact(
            int in "-?(0|[1-9][0-9]{0,12})",
            frac in proptest::option::of("[0-9]{1,12}"),
            exp in proptest::option::of(-14i32..14),
        ) {
            let mut text = int.clone();
            if let Some(f) = &frac {
                text.push('.');
                text.push_str(f);
            }
            if let Some(e) = exp {
                text.push_str(&format!("e{e}"));
            }
            let decimal = Decimal::from_scientific(&text)
                .or_else(|_| Decimal::from_str_exact(&text))
                .unwrap()
                .normalize()
                .to_string();
            proptest::prop_assert_eq!(canonical_number(&text), decimal, "{}", text);
        }
    }
}
