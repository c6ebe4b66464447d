//! A payment's correlation ([`Correlation`]: the request id of its POST, the client's
//! `traceparent`) as AMQP message headers: the relay writes them from the outbox row, the
//! consumer and dlq-watch read them (a dead letter keeps its headers, so `dlq replay` carries
//! them on). Read values are checked again: anyone with access to the broker can publish.

use amqprs::{BasicProperties, FieldTable, FieldValue};

use super::{field_name, header};
use crate::domain::correlation::Correlation;

/// The header with the request id. Not an `x-` name: those are the broker's own (`x-death`,
/// `x-delivery-count`).
pub const REQUEST_ID: &str = "request-id";
/// The header with the W3C trace context, named as the W3C's AMQP binding names it.
pub const TRACEPARENT: &str = "traceparent";

/// The headers of a message about a payment with this correlation; `None` when it has none.
pub fn headers(c: &Correlation) -> Option<FieldTable> {
    let mut t = FieldTable::new();
    for (name, value) in [(REQUEST_ID, &c.request_id), (TRACEPARENT, &c.traceparent)] {
        if let Some(v) = value {
            t.insert(field_name(name), FieldValue::from(v.as_str()));
        }
    }
    (!t.as_ref().is_empty()).then_some(t)
}

/// The correlation a message carries (only valid values).
pub fn of_message(props: Option<&BasicProperties>) -> Correlation {
    Correlation::checked(header(props, REQUEST_ID), header(props, TRACEPARENT))
}

/// The correlation in a dead letter's recorded headers (see [`super::table_to_json`]).
pub fn of_json(headers: &serde_json::Value) -> Correlation {
    Correlation::checked(headers[REQUEST_ID].as_str(), headers[TRACEPARENT].as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn headers_written_are_read_back_and_bad_ones_are_dropped() {
        let c = Correlation::checked(Some("req-1"), Some(TP));
        let props = BasicProperties::default()
            .with_headers(headers(&c).unwrap())
            .finish();
        assert_eq!(of_message(Some(&props)), c);
        assert_eq!(
            of_json(&super::super::table_to_json(props.headers().unwrap())),
            c
        );
        assert_eq!(headers(&Correlation::default()), None);
        assert_eq!(of_message(None), Correlation::default());

        let mut odd = FieldTable::new();
        odd.insert(field_name(REQUEST_ID), FieldValue::from("new\nline"));
        odd.insert(field_name(TRACEPARENT), FieldValue::from("00-zz"));
        let props = BasicProperties::default().with_headers(odd).finish();
        assert_eq!(of_message(Some(&props)), Correlation::default());
    }
}
