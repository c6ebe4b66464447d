//! What ties the work on one payment together across processes: the request id of the POST that
//! created it (on every log line about the payment, in every role) and the W3C `traceparent` the
//! client sent with it, if any (carried to the consumer with the event). Both come from outside
//! (a client's headers, a message's headers): only values that pass these checks are kept, so
//! nothing odd ever reaches a log line, a message header or the database (whose CHECKs are the
//! same rules, migration 000007).

/// Longest request id that is kept.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// The request id and trace context of the request that created a payment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Correlation {
    pub request_id: Option<String>,
    pub traceparent: Option<String>,
}

impl Correlation {
    /// Keeps each value only if it is valid ([`request_id_ok`], [`traceparent`]).
    pub fn checked(request_id: Option<&str>, traceparent: Option<&str>) -> Correlation {
        Correlation {
            request_id: request_id.filter(|s| request_id_ok(s)).map(str::to_string),
            traceparent: traceparent.and_then(self::traceparent),
        }
    }
}

/// A request id worth keeping: 1 to [`MAX_REQUEST_ID_LEN`] visible ASCII characters (no space,
/// no control character: it is printed inside log lines).
pub fn request_id_ok(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_REQUEST_ID_LEN && id.bytes().all(|b| b.is_ascii_graphic())
}

/// A W3C Trace Context `traceparent` (<https://www.w3.org/TR/trace-context/#traceparent-header>)
/// as it is kept and passed on: `00-<trace-id>-<parent-id>-<flags>`, or `None` if the value is
/// not one. Lowercase hex only; an all-zero trace id or parent id, and version `ff`, are invalid.
/// A later version is read as the spec asks (its first four fields, followed by the end or a
/// `-`) and passed on as version `00`, the one whose layout we know.
pub fn traceparent(value: &str) -> Option<String> {
    let v = value.trim_matches([' ', '\t']);
    let b = v.as_bytes();
    let hex = |s: &[u8]| s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    let dash = |i: usize| b.get(i) == Some(&b'-');
    if b.len() < 55 || !dash(2) || !dash(35) || !dash(52) {
        return None;
    }
    let (version, trace_id, parent_id, flags) = (&b[0..2], &b[3..35], &b[36..52], &b[53..55]);
    if !hex(version) || !hex(trace_id) || !hex(parent_id) || !hex(flags) {
        return None;
    }
    if version == b"ff"
        || trace_id.iter().all(|&c| c == b'0')
        || parent_id.iter().all(|&c| c == b'0')
    {
        return None;
    }
    match (version, b.len()) {
        (b"00", 55) => Some(v.to_string()),
        (b"00", _) => None,
        (_, 55) => Some(format!("00{}", &v[2..55])),
        _ if dash(55) => Some(format!("00{}", &v[2..55])),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_is_kept_as_it_is() {
        assert_eq!(traceparent(GOOD).as_deref(), Some(GOOD));
        assert_eq!(traceparent(&format!(" {GOOD}\t")).as_deref(), Some(GOOD));
        let unsampled = GOOD.replace("-01", "-00");
        assert_eq!(traceparent(&unsampled), Some(unsampled));
    }

    #[test]
    fn a_malformed_traceparent_is_dropped() {
        for bad in [
            "",
            "00",
            "garbage",
            &GOOD.to_uppercase(),
            &GOOD.replace("4bf9", "4BF9"),
            &GOOD[..54],
            &format!("{GOOD}-extra"),
            &format!("{GOOD}0"),
            &GOOD.replace("4bf92f3577b34da6a3ce929d0e0e4736", &"0".repeat(32)),
            &GOOD.replace("00f067aa0ba902b7", &"0".repeat(16)),
            &GOOD.replacen("00", "ff", 1),
            &GOOD.replacen("00", "0g", 1),
            &GOOD.replace("-01", "-1x"),
            &GOOD.replace('-', "_"),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\n",
        ] {
            assert_eq!(traceparent(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_later_version_is_read_by_its_first_fields_and_passed_on_as_00() {
        let v1 = GOOD.replacen("00", "01", 1);
        assert_eq!(traceparent(&v1).as_deref(), Some(GOOD));
        assert_eq!(
            traceparent(&format!("{v1}-what-comes-later")).as_deref(),
            Some(GOOD)
        );
        assert_eq!(traceparent(&format!("{v1}x")), None);
    }

    #[test]
    fn request_ids_are_short_visible_ascii() {
        assert!(request_id_ok("trace-42"));
        assert!(request_id_ok(&"r".repeat(MAX_REQUEST_ID_LEN)));
        for bad in ["", "has space", "new\nline", "ünïcode", &"r".repeat(129)] {
            assert!(!request_id_ok(bad), "{bad:?}");
        }
        let c = Correlation::checked(Some("has space"), Some(GOOD));
        assert_eq!(c.request_id, None);
        assert_eq!(c.traceparent.as_deref(), Some(GOOD));
    }
}
