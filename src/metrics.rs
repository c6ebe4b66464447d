//! Prometheus metrics: every metric of every role, the functions that record them, the HTTP
//! middleware of `serve`, and the small exporter the other roles run on `metrics.bind`.
//!
//! One process-wide registry. Each process exposes what it recorded itself: `serve` its HTTP
//! requests and payment outcomes, `relay` its publishes, `consume` its messages and webhooks,
//! `dlq-watch` the dead letters it recorded. The outbox gauges are database-wide facts, not a
//! process's, so they are only exposed where the scrape can refresh them from the database
//! (`serve`'s `/metrics`, and an exporter given a pool): a stale or zero value never shows.
//!
//! Names carry the `async_pay_` prefix; durations are in seconds (Prometheus convention).

use std::net::{SocketAddr, TcpListener};
use std::sync::LazyLock;
use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::dev::{ServerHandle, ServiceRequest, ServiceResponse};
use actix_web::http::Method;
use actix_web::middleware::Next;
use actix_web::{App, HttpResponse, HttpServer, web};
use anyhow::Context;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};

use crate::api::AppState;
use crate::db::{self, Pool};

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
/// How long a scrape may wait for the outbox query before it answers without the outbox gauges.
const OUTBOX_QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// The route label of requests that matched no route: never the raw path, which would let any
/// client create a new time series per URL.
pub const UNMATCHED_ROUTE: &str = "unmatched";
/// `Content-Type` of the text exposition format.
pub const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

/// Every metric of async-pay.
pub struct Metrics {
    registry: Registry,
    /// The outbox gauges, gathered only by a scrape that refreshed them.
    outbox_registry: Registry,
    http_requests: IntCounterVec,
    http_duration: HistogramVec,
    payments: IntCounterVec,
    outbox_unpublished: IntGauge,
    outbox_oldest_age: Gauge,
    relay_messages: IntCounterVec,
    relay_confirm: Histogram,
    consumer_in_flight: IntGauge,
    consumer_messages: IntCounterVec,
    consumer_duration: Histogram,
    consumer_redeliveries: IntCounter,
    dead_letters: IntCounterVec,
    webhook_attempts: IntCounterVec,
    webhook_duration: Histogram,
    gateway_calls: IntCounterVec,
    gateway_duration: HistogramVec,
    gateway_paused: IntGauge,
    payments_unknown: IntGauge,
    payments_stuck: IntGauge,
    reconcile_passes: IntCounterVec,
    payments_finalised: IntCounterVec,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process-wide metrics.
pub fn get() -> &'static Metrics {
    &METRICS
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
    fn new() -> Metrics {
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

/// One HTTP request answered.
pub fn http_request(method: &Method, route: &str, status: u16, took: Duration) {
    let m = get();
    let method = method_label(method);
    let status = status.to_string();
    let labels = [method, route, status.as_str()];
    m.http_requests.with_label_values(&labels).inc();
    m.http_duration
        .with_label_values(&labels)
        .observe(took.as_secs_f64());
}

/// Methods outside the standard set share one label value (clients choose the method).
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
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
const DEAD_LETTER_REASONS: &[&str] =
    &["rejected", "expired", "maxlen", "delivery_limit", "unknown"];
/// The label of any other reason (a hand-made `x-death` header): the label set stays bounded.
const OTHER_DEAD_LETTER_REASON: &str = "other";

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

// ---------------------------------------------------------------------------------------------
// Exposing

/// Reads the outbox backlog into the gauges; false (and the gauges left out of the scrape) when
/// the database does not answer in time.
pub async fn refresh_outbox(pool: &Pool, limit: Duration) -> bool {
    let read = db::with_timeout(limit, async {
        let mut conn = db::conn(pool).await?;
        Ok(crate::db::outbox::backlog(&mut conn).await?)
    })
    .await;
    match read {
        Ok((n, age)) => {
            outbox_backlog(n, age);
            true
        }
        Err(e) => {
            log::warn!("metrics: cannot read the outbox backlog ({e}); left out of this scrape");
            false
        }
    }
}

fn exposition(body: String) -> HttpResponse {
    HttpResponse::Ok().content_type(CONTENT_TYPE).body(body)
}

/// Prometheus metrics
///
/// `GET /metrics` of `serve`: every metric in the Prometheus text format, with the outbox
/// gauges read from the database at scrape time.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus text exposition format", content_type = "text/plain"))
)]
pub async fn scrape(state: web::Data<AppState>) -> HttpResponse {
    let outbox = refresh_outbox(&state.pool, state.db_deadline.min(OUTBOX_QUERY_TIMEOUT)).await;
    exposition(get().render(outbox))
}

/// HTTP metrics middleware for `serve`: `App::new().wrap(from_fn(metrics::track_http))`. The route
/// label is the matched route pattern (`/api/v1/payments/{id}`), never the raw path.
pub async fn track_http(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = std::time::Instant::now();
    let method = req.method().clone();
    let res = next.call(req).await;
    // The route is read from the request the router has marked (an index walk). Asking before
    // the call would match the path against the route patterns a second time (regexes: 4 % of
    // serve's CPU per GET); keeping a clone of the request across the call would make routing
    // panic, as it needs the only reference. Handlers' errors arrive here as responses; an `Err`
    // comes only from a middleware and has no route.
    let (status, route) = match &res {
        Ok(r) => (r.status(), r.request().match_pattern()),
        Err(e) => (e.as_response_error().status_code(), None),
    };
    http_request(
        &method,
        route.as_deref().unwrap_or(UNMATCHED_ROUTE),
        status.as_u16(),
        started.elapsed(),
    );
    res
}

/// The metrics endpoint of a role other than `serve`, stopped with [`Exporter::stop`].
pub struct Exporter {
    /// The address it listens on (the real port when bound to port 0).
    pub addr: SocketAddr,
    handle: ServerHandle,
}

impl Exporter {
    /// Stops accepting scrapes and waits for the server to end.
    pub async fn stop(self) {
        self.handle.stop(true).await;
    }
}

struct ExporterState {
    outbox: Option<Pool>,
}

async fn exporter_metrics(state: web::Data<ExporterState>) -> HttpResponse {
    let outbox = match &state.outbox {
        Some(pool) => refresh_outbox(pool, OUTBOX_QUERY_TIMEOUT).await,
        None => false,
    };
    exposition(get().render(outbox))
}

async fn exporter_health() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

/// Serves `GET /metrics` (and `GET /health`, "the process is up") on `bind` for a role other
/// than `serve`, in the background; `""` means off (`Ok(None)`). With `outbox`, each scrape
/// reads the outbox gauges from that pool (the relay's exporter does). Must be called inside the
/// Tokio runtime.
pub fn serve(bind: &str, outbox: Option<Pool>) -> anyhow::Result<Option<Exporter>> {
    let bind = bind.trim();
    if bind.is_empty() {
        return Ok(None);
    }
    let listener =
        TcpListener::bind(bind).with_context(|| format!("cannot serve metrics on {bind}"))?;
    let addr = listener.local_addr()?;
    let state = web::Data::new(ExporterState { outbox });
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .route("/metrics", web::get().to(exporter_metrics))
            .route("/health", web::get().to(exporter_health))
    })
    // One thread is plenty for a scrape every few seconds.
    .workers(1)
    // The role owns SIGTERM/SIGINT and stops this server itself.
    .disable_signals()
    .shutdown_timeout(1)
    .listen(listener)
    .with_context(|| format!("cannot serve metrics on {bind}"))?
    .run();
    let handle = server.handle();
    tokio::spawn(async move {
        if let Err(e) = server.await {
            log::error!("the metrics server failed: {e}");
        }
    });
    log::info!("serving metrics on http://{addr}/metrics");
    Ok(Some(Exporter { addr, handle }))
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
            &Method::GET,
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
