//! The definition of every metric: name, help, labels, buckets, and the label values that start
//! at 0.

use super::{DEAD_LETTER_REASONS, OTHER_DEAD_LETTER_REASON};
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};

/// Latency buckets for work that takes milliseconds to a few seconds (HTTP requests, confirms,
/// webhook POSTs): 1 ms … 10 s.
const FAST_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Payment processing includes the gateway (the simulated one takes 2–5 s) and waiting for a
/// claim held elsewhere: 10 ms … 60 s.
const SLOW_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0,
];
/// Every metric of async-pay.
pub struct Metrics {
    pub(super) registry: Registry,
    /// The outbox gauges, gathered only by a scrape that refreshed them.
    pub(super) outbox_registry: Registry,
    pub(super) http_requests: IntCounterVec,
    pub(super) http_duration: HistogramVec,
    pub(super) payments: IntCounterVec,
    pub(super) outbox_unpublished: IntGauge,
    pub(super) outbox_oldest_age: Gauge,
    pub(super) relay_messages: IntCounterVec,
    pub(super) relay_confirm: Histogram,
    pub(super) consumer_in_flight: IntGauge,
    pub(super) consumer_messages: IntCounterVec,
    pub(super) consumer_duration: Histogram,
    pub(super) consumer_redeliveries: IntCounter,
    pub(super) dead_letters: IntCounterVec,
    pub(super) webhook_attempts: IntCounterVec,
    pub(super) webhook_duration: Histogram,
    pub(super) gateway_calls: IntCounterVec,
    pub(super) gateway_duration: HistogramVec,
    pub(super) gateway_paused: IntGauge,
    pub(super) payments_unknown: IntGauge,
    pub(super) payments_stuck: IntGauge,
    pub(super) reconcile_passes: IntCounterVec,
    pub(super) payments_finalised: IntCounterVec,
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(r, IntCounterVec::new(Opts::new(name, help), labels))
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    register(
        r,
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec())),
    )
}

#[expect(
    clippy::expect_used,
    reason = "metric names, labels and buckets are constants: they either always register or \
              never do, and the unit test `every_metric_registers` builds them all"
)]
fn register<M: prometheus::core::Collector + Clone + 'static>(
    r: &Registry,
    metric: prometheus::Result<M>,
) -> M {
    let metric = metric.expect("a valid metric definition");
    r.register(Box::new(metric.clone()))
        .expect("metric names are unique");
    metric
}

impl Metrics {
    pub(super) fn new() -> Metrics {
        let r = Registry::new();
        let o = Registry::new();
        let m = Metrics {
            http_requests: counter_vec(
                &r,
                "async_pay_http_requests_total",
                "HTTP requests answered, by method, route pattern and status code.",
                &["method", "route", "status"],
            ),
            http_duration: register(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "async_pay_http_request_duration_seconds",
                        "Time from receiving an HTTP request to its response, by method, route \
                         pattern and status code.",
                    )
                    .buckets(FAST_BUCKETS.to_vec()),
                    &["method", "route", "status"],
                ),
            ),
            payments: counter_vec(
                &r,
                "async_pay_payments_total",
                "POST /api/v1/payments outcomes: created (a new payment), replayed (the same \
                 Idempotency-Key with the same request), conflicted (the same key with another \
                 request, 409).",
                &["result"],
            ),
            outbox_unpublished: register(
                &o,
                IntGauge::new(
                    "async_pay_outbox_unpublished",
                    "Outbox events not yet confirmed by RabbitMQ (read from the database at scrape \
                     time).",
                ),
            ),
            outbox_oldest_age: register(
                &o,
                Gauge::new(
                    "async_pay_outbox_oldest_unpublished_age_seconds",
                    "Age of the oldest unpublished outbox event, 0 when there is none (read from \
                     the database at scrape time).",
                ),
            ),
            relay_messages: counter_vec(
                &r,
                "async_pay_relay_messages_total",
                "Outbox events the relay published: confirmed (RabbitMQ stored and routed them, \
                 marked published) or not_confirmed (nack, unroutable, timeout or channel failure; \
                 they stay unpublished and are sent again).",
                &["result"],
            ),
            relay_confirm: histogram(
                &r,
                "async_pay_relay_confirm_seconds",
                "Time from publishing a batch of outbox events to the last publisher confirm.",
                FAST_BUCKETS,
            ),
            consumer_in_flight: register(
                &r,
                IntGauge::new(
                    "async_pay_consumer_in_flight",
                    "Payment messages this consumer holds now (processing, or waiting to be \
                     handed back).",
                ),
            ),
            consumer_messages: counter_vec(
                &r,
                "async_pay_consumer_messages_total",
                "Payment messages handled, by outcome: succeeded / failed (finalised now with \
                 that status), already_final (a duplicate), unknown_payment, malformed, retry \
                 (requeued), dead_letter (given up).",
                &["outcome"],
            ),
            consumer_duration: histogram(
                &r,
                "async_pay_consumer_processing_seconds",
                "Time to handle one payment message: claim, gateway, finalise.",
                SLOW_BUCKETS,
            ),
            consumer_redeliveries: register(
                &r,
                IntCounter::new(
                    "async_pay_consumer_redeliveries_total",
                    "Payment messages received that had been delivered before (x-delivery-count \
                     > 0).",
                ),
            ),
            dead_letters: counter_vec(
                &r,
                "async_pay_dead_letters_total",
                "Dead letters recorded in the dead_letters table, by the x-death reason.",
                &["reason"],
            ),
            webhook_attempts: counter_vec(
                &r,
                "async_pay_webhook_attempts_total",
                "Webhook POST attempts, by result: delivered (2xx), rejected (another HTTP \
                 status) or error (timeout, connection error, refused address).",
                &["result"],
            ),
            webhook_duration: histogram(
                &r,
                "async_pay_webhook_attempt_duration_seconds",
                "Duration of one webhook POST attempt, from sending to the response (or the \
                 error).",
                FAST_BUCKETS,
            ),
            gateway_calls: counter_vec(
                &r,
                "async_pay_gateway_calls_total",
                "Calls to the payment gateway, by operation (charge, status) and outcome: \
                 succeeded, declined, unknown (the provider may or may not have charged: \
                 reconciled later), not_found (status: never received), unauthorized (the \
                 provider refused our configuration).",
                &["operation", "outcome"],
            ),
            gateway_duration: register(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "async_pay_gateway_call_duration_seconds",
                        "Duration of one payment gateway call, by operation, up to gateway.timeout.",
                    )
                    .buckets(SLOW_BUCKETS.to_vec()),
                    &["operation"],
                ),
            ),
            gateway_paused: register(
                &r,
                IntGauge::new(
                    "async_pay_gateway_paused",
                    "1 while gateway calls are paused because the provider refuses our \
                     configuration (401/403), else 0.",
                ),
            ),
            payments_unknown: register(
                &r,
                IntGauge::new(
                    "async_pay_payments_unknown_outcome",
                    "Pending payments whose gateway outcome is unknown and is being reconciled \
                     (refreshed every few seconds by consume's sweep).",
                ),
            ),
            payments_stuck: register(
                &r,
                IntGauge::new(
                    "async_pay_payments_stuck",
                    "Payments pending for longer than gateway.stuck_after (refreshed every few \
                     seconds by consume's sweep).",
                ),
            ),
            payments_finalised: counter_vec(
                &r,
                "async_pay_payments_finalised_total",
                "Payments finalised by this process with the gateway's answer, by status \
                 (succeeded, failed), whether from a message or from reconciliation.",
                &["status"],
            ),
            reconcile_passes: counter_vec(
                &r,
                "async_pay_reconcile_passes_total",
                "Reconciliation passes (status checks of payments with unknown outcomes), by \
                 result: ok or error.",
                &["result"],
            ),
            registry: r,
            outbox_registry: o,
        };
        // Known label values start at 0, so rate() and alerts work before the first event.
        for result in ["created", "replayed", "conflicted"] {
            m.payments.with_label_values(&[result]);
        }
        for result in ["confirmed", "not_confirmed"] {
            m.relay_messages.with_label_values(&[result]);
        }
        for result in ["ok", "error"] {
            m.reconcile_passes.with_label_values(&[result]);
        }
        for status in ["succeeded", "failed"] {
            m.payments_finalised.with_label_values(&[status]);
        }
        // Every answer of every call, so the first unknown or refused call is an increase.
        for operation in ["charge", "status"] {
            for outcome in [
                "succeeded",
                "declined",
                "unknown",
                "not_found",
                "unauthorized",
            ] {
                m.gateway_calls.with_label_values(&[operation, outcome]);
            }
        }
        // A dead letter is rare: the first one after a start must be an increase from 0, or
        // `increase()` (and so the dead-letter alert) never sees it.
        for reason in DEAD_LETTER_REASONS
            .iter()
            .chain(&[OTHER_DEAD_LETTER_REASON])
        {
            m.dead_letters.with_label_values(&[reason]);
        }
        m
    }

    /// The text exposition of every metric; with `outbox`, the outbox gauges too.
    pub fn render(&self, outbox: bool) -> String {
        let mut families = self.registry.gather();
        if outbox {
            families.extend(self.outbox_registry.gather());
        }
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&families, &mut buf) {
            log::warn!("cannot encode the metrics: {e}");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}
