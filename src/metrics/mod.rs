//! Prometheus metrics: every metric of every role ([`registry`]) and the functions that record
//! them. A leaf: everything may record, and nothing here knows the rest of async-pay. `serve`
//! exposes them with `api::metrics` (its HTTP middleware and `/metrics`), the other roles with
//! `roles::exporter` on `metrics.bind`.
//!
//! One process-wide registry. Each process exposes what it recorded itself: `serve` its HTTP
//! requests and payment outcomes, `relay` its publishes, `consume` its messages and webhooks,
//! `dlq-watch` the dead letters it recorded. The outbox gauges are database-wide facts, not a
//! process's, so they are only exposed where the scrape can refresh them from the database
//! (`serve`'s `/metrics`, and an exporter given a pool): a stale or zero value never shows.
//!
//! Names carry the `async_pay_` prefix; durations are in seconds (Prometheus convention).

mod registry;

use std::sync::LazyLock;
use std::time::Duration;

pub use registry::Metrics;

/// `Content-Type` of the text exposition format.
pub const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process-wide metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

// ---------------------------------------------------------------------------------------------
// Recording

/// `POST /api/v1/payments` stored a new payment.
pub fn payment_created() {
    get().payments.with_label_values(&["created"]).inc();
}

/// `POST /api/v1/payments` answered an existing payment for a repeated Idempotency-Key.
pub fn payment_replayed() {
    get().payments.with_label_values(&["replayed"]).inc();
}

/// `POST /api/v1/payments` refused a reused Idempotency-Key (409).
pub fn payment_conflicted() {
    get().payments.with_label_values(&["conflicted"]).inc();
}

/// One HTTP request answered: method (a fixed set, see `api::metrics`), route pattern, status.
pub fn http_request(method: &str, route: &str, status: u16, took: Duration) {
    let m = get();
    let status = status.to_string();
    let labels = [method, route, status.as_str()];
    m.http_requests.with_label_values(&labels).inc();
    m.http_duration
        .with_label_values(&labels)
        .observe(took.as_secs_f64());
}

/// The outbox as the database sees it now.
pub fn outbox_backlog(unpublished: i64, oldest_age: Option<Duration>) {
    let m = get();
    m.outbox_unpublished.set(unpublished);
    m.outbox_oldest_age
        .set(oldest_age.map(|d| d.as_secs_f64()).unwrap_or(0.0));
}

/// One relay batch: how many the broker confirmed, how many not, and how long the confirms took.
pub fn relay_batch(confirmed: usize, not_confirmed: usize, took: Duration) {
    let m = get();
    m.relay_messages
        .with_label_values(&["confirmed"])
        .inc_by(confirmed as u64);
    m.relay_messages
        .with_label_values(&["not_confirmed"])
        .inc_by(not_confirmed as u64);
    m.relay_confirm.observe(took.as_secs_f64());
}

/// Counts a consumer's message as in flight until the returned guard is dropped (also when the
/// task holding it is aborted).
pub fn consumer_in_flight() -> InFlight {
    get().consumer_in_flight.inc();
    InFlight(())
}

/// See [`consumer_in_flight`].
#[must_use = "the message counts as in flight until this is dropped"]
pub struct InFlight(());

impl Drop for InFlight {
    fn drop(&mut self) {
        get().consumer_in_flight.dec();
    }
}

/// One payment message handled: its outcome label, how often it was delivered before, how long
/// it took.
pub fn message_handled(outcome: &str, previous: u32, took: Duration) {
    let m = get();
    m.consumer_messages.with_label_values(&[outcome]).inc();
    m.consumer_duration.observe(took.as_secs_f64());
    if previous > 0 {
        m.consumer_redeliveries.inc();
    }
}

/// One payment gateway call: `operation` (charge, status), its outcome label, its duration.
pub fn gateway_call(operation: &str, outcome: &str, took: Duration) {
    let m = get();
    m.gateway_calls
        .with_label_values(&[operation, outcome])
        .inc();
    m.gateway_duration
        .with_label_values(&[operation])
        .observe(took.as_secs_f64());
}

/// Whether gateway calls are paused (the provider refuses our configuration).
pub fn gateway_paused(paused: bool) {
    get().gateway_paused.set(i64::from(paused));
}

/// Pending payments with an unknown gateway outcome, and pending longer than stuck_after.
pub fn pending_health(unknown: i64, stuck: i64) {
    let m = get();
    m.payments_unknown.set(unknown);
    m.payments_stuck.set(stuck);
}

/// A payment finalised with the gateway's answer.
pub fn payment_finalised(status: &str) {
    get().payments_finalised.with_label_values(&[status]).inc();
}

/// One reconciliation pass ended.
pub fn reconcile_pass(ok: bool) {
    get()
        .reconcile_passes
        .with_label_values(&[if ok { "ok" } else { "error" }])
        .inc();
}

/// The `reason` label values of dead letters: RabbitMQ's `x-death` reasons, and `unknown` for a
/// message without that header.
pub(crate) const DEAD_LETTER_REASONS: &[&str] =
    &["rejected", "expired", "maxlen", "delivery_limit", "unknown"];
/// The label of any other reason (a hand-made `x-death` header): the label set stays bounded.
pub(crate) const OTHER_DEAD_LETTER_REASON: &str = "other";

/// A dead letter recorded for the first time. RabbitMQ's reasons are a small fixed set; anything
/// else (a hand-made `x-death` header) is counted as `other`.
pub fn dead_letter(reason: &str) {
    let reason = if DEAD_LETTER_REASONS.contains(&reason) {
        reason
    } else {
        OTHER_DEAD_LETTER_REASON
    };
    get().dead_letters.with_label_values(&[reason]).inc();
}

/// One webhook attempt: the HTTP status it got (None: no response) and how long it took.
pub fn webhook_attempt(status: Option<u16>, took: Duration) {
    let m = get();
    let result = match status {
        Some(s) if (200..300).contains(&s) => "delivered",
        Some(_) => "rejected",
        None => "error",
    };
    m.webhook_attempts.with_label_values(&[result]).inc();
    m.webhook_duration.observe(took.as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_registers() {
        let text = get().render(true);
        for name in [
            "async_pay_payments_total",
            "async_pay_outbox_unpublished",
            "async_pay_outbox_oldest_unpublished_age_seconds",
            "async_pay_relay_messages_total",
            "async_pay_relay_confirm_seconds",
            "async_pay_consumer_in_flight",
            "async_pay_consumer_processing_seconds",
            "async_pay_consumer_redeliveries_total",
            "async_pay_webhook_attempt_duration_seconds",
        ] {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
        }
        assert!(!get().render(false).contains("async_pay_outbox_unpublished"));
    }

    #[test]
    fn dead_letter_counters_start_at_zero_for_every_reason() {
        let text = get().render(false);
        for reason in [
            "rejected",
            "expired",
            "maxlen",
            "delivery_limit",
            "unknown",
            "other",
        ] {
            let series = format!(r#"async_pay_dead_letters_total{{reason="{reason}"}} 0"#);
            assert!(text.contains(&series), "{series} missing");
        }
    }

    #[test]
    fn recording_shows_in_the_exposition() {
        http_request(
            "GET",
            "/api/v1/payments/{id}",
            404,
            Duration::from_millis(3),
        );
        webhook_attempt(Some(503), Duration::from_millis(20));
        dead_letter("made-up");
        {
            let _a = consumer_in_flight();
            assert!(
                get()
                    .render(false)
                    .contains("async_pay_consumer_in_flight 1")
            );
        }
        let text = get().render(false);
        assert!(text.contains(
            r#"async_pay_http_requests_total{method="GET",route="/api/v1/payments/{id}",status="404"} 1"#
        ));
        assert!(text.contains(r#"async_pay_webhook_attempts_total{result="rejected"} 1"#));
        assert!(text.contains(r#"async_pay_dead_letters_total{reason="other"} 1"#));
        assert!(text.contains("async_pay_consumer_in_flight 0"));
    }
}
