//! A payment provider on localhost that speaks the HTTP gateway contract (README.md), scriptable
//! per payment, and that counts every charge it executes, per payment and per idempotency key.
//!
//! Like a real provider it honours idempotency keys, whatever they are: a repeated POST with a
//! key it has charged answers the recorded result without charging again, and a POST whose key
//! is being processed answers 409. A POST with a new key is a new charge, even for a payment it
//! has charged before, and counts as such: a client that changed keys would show here as two
//! charges for one payment. A charge is executed (recorded) the moment its request arrives; the
//! answer may come later, or never, as scripted. The script of a payment is chosen by its
//! `metadata.psp` value (see [`Script::from_name`]), else the provider's default; it applies to
//! the payment's first POST only.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use serde_json::{Value, json};

pub const API_KEY: &str = "psp-test-key";

/// How the provider treats a payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Script {
    /// Charges and answers `succeeded` (after the provider's latency).
    Succeed,
    /// Declines with `insufficient_funds`.
    Decline,
    /// Refuses the request itself: 422 (nothing charged).
    Reject,
    /// Charges at once, answers only after this long (past the caller's timeout).
    ChargeThenSlow(Duration),
    /// Charges, then answers 500.
    ChargeThen500,
    /// Answers 500 without charging ("the provider had an outage before it charged").
    FailBeforeCharge,
    /// Accepts the charge as `processing`; it completes (succeeded) this long after the first
    /// request; until then POST and GET answer `processing`.
    Processing(Duration),
}

impl Script {
    pub fn from_name(name: &str) -> Option<Script> {
        Some(match name {
            "succeed" => Script::Succeed,
            "decline" => Script::Decline,
            "reject" => Script::Reject,
            "slow" => Script::ChargeThenSlow(Duration::from_secs(8)),
            "charge_then_500" => Script::ChargeThen500,
            "fail_before_charge" => Script::FailBeforeCharge,
            "processing" => Script::Processing(Duration::from_secs(6)),
            _ => return None,
        })
    }
}

/// A charge the provider executed.
#[derive(Debug, Clone)]
pub struct Charge {
    pub succeeded: bool,
    pub charge_id: String,
    /// `Processing`: completes at this instant.
    pub completes_at: Option<Instant>,
}

/// A request the provider saw: method, path, Idempotency-Key, Authorization, JSON body, when.
pub type Seen = (
    String,
    String,
    Option<String>,
    Option<String>,
    Value,
    Instant,
);

#[derive(Default)]
struct State {
    /// By idempotency key: what a repeated key is answered.
    by_key: HashMap<String, Charge>,
    /// By payment id (from the body), the latest: what GET answers.
    charges: HashMap<String, Charge>,
    /// Charges executed, per payment and per key: what must never exceed 1.
    executions_by_payment: HashMap<String, u32>,
    executions_by_key: HashMap<String, u32>,
    /// Keys whose POST is being answered right now.
    in_progress: HashSet<String>,
    /// Payments POSTed at least once: a script applies to a payment's first POST only (a retry
    /// after "not found" is charged normally).
    attempted: HashSet<String>,
    /// Every request seen: (method, path, idempotency key, authorization, body).
    requests: Vec<Seen>,
    default_script: Option<Script>,
    /// Answer every request with 401 while set (a rotated key).
    refuse_all: bool,
    /// Latency of every answer: uniform in this range.
    latency: (Duration, Duration),
}

/// Stops with the test's runtime.
#[derive(Clone)]
pub struct Psp {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

impl Psp {
    /// Starts the provider on a free port; `latency` is the delay of each answer.
    pub fn start(latency: (Duration, Duration)) -> Psp {
        let state = Arc::new(Mutex::new(State {
            latency,
            ..State::default()
        }));
        let data = web::Data::new(state.clone());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .app_data(web::PayloadConfig::new(1 << 20))
                .route("/v1/charges", web::post().to(charge))
                .route("/v1/charges/{id}", web::get().to(status))
        })
        .workers(2)
        .backlog(4096)
        .max_connections(100_000)
        .disable_signals()
        .shutdown_timeout(1)
        .listen(listener)
        .unwrap()
        .run();
        tokio::spawn(server);
        Psp { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_default(&self, script: Script) {
        self.state.lock().unwrap().default_script = Some(script);
    }

    pub fn refuse_all(&self, on: bool) {
        self.state.lock().unwrap().refuse_all = on;
    }

    /// Completes every `processing` charge now.
    pub fn complete_all(&self) {
        let mut guard = self.state.lock().unwrap();
        let s = &mut *guard;
        let now = Instant::now();
        for c in s.by_key.values_mut().chain(s.charges.values_mut()) {
            c.completes_at = c.completes_at.map(|t| t.min(now));
        }
    }

    /// The charge recorded for a payment.
    pub fn charge(&self, payment_id: &str) -> Option<Charge> {
        self.state.lock().unwrap().charges.get(payment_id).cloned()
    }

    /// Charges executed for a payment (must never exceed 1).
    pub fn executions(&self, payment_id: &str) -> u32 {
        let s = self.state.lock().unwrap();
        s.executions_by_payment
            .get(payment_id)
            .copied()
            .unwrap_or(0)
    }

    /// The most charges executed for any one payment, and for any one key.
    pub fn max_executions(&self) -> (u32, u32) {
        let s = self.state.lock().unwrap();
        (
            s.executions_by_payment.values().copied().max().unwrap_or(0),
            s.executions_by_key.values().copied().max().unwrap_or(0),
        )
    }

    /// POSTs the provider has answered or is answering now.
    pub fn charge_requests(&self) -> usize {
        let s = self.state.lock().unwrap();
        s.requests.iter().filter(|r| r.0 == "POST").count()
    }

    /// Status questions (GETs) the provider was asked.
    pub fn status_requests(&self) -> usize {
        let s = self.state.lock().unwrap();
        s.requests.iter().filter(|r| r.0 == "GET").count()
    }

    /// POSTs being answered right now.
    pub fn in_progress(&self) -> usize {
        self.state.lock().unwrap().in_progress.len()
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.state.lock().unwrap().requests.clone()
    }
}

fn header(req: &HttpRequest, name: &str) -> Option<String> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn execute(
    s: &mut State,
    payment_id: &str,
    key: &str,
    succeeded: bool,
    completes_at: Option<Instant>,
) -> Charge {
    *s.executions_by_payment
        .entry(payment_id.to_string())
        .or_default() += 1;
    *s.executions_by_key.entry(key.to_string()).or_default() += 1;
    let charge = Charge {
        succeeded,
        charge_id: format!("ch_{}", uuid::Uuid::new_v4().simple()),
        completes_at,
    };
    s.charges.insert(payment_id.to_string(), charge.clone());
    s.by_key.insert(key.to_string(), charge.clone());
    charge
}

/// The contract's answer for a recorded charge.
fn answer(c: &Charge) -> HttpResponse {
    if c.completes_at.is_some_and(|t| Instant::now() < t) {
        return HttpResponse::Ok().json(json!({"status": "processing"}));
    }
    if c.succeeded {
        HttpResponse::Ok().json(json!({"status": "succeeded", "charge_id": c.charge_id}))
    } else {
        HttpResponse::Ok().json(json!({
            "status": "declined", "decline_code": "insufficient_funds",
            "message": "The card has insufficient funds."
        }))
    }
}

fn latency(s: &State) -> Duration {
    let (min, max) = s.latency;
    min + max.saturating_sub(min).mul_f64(fastrand::f64())
}

async fn charge(
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<Arc<Mutex<State>>>,
) -> HttpResponse {
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let key = header(&req, "idempotency-key");
    let auth = header(&req, "authorization");
    let payment_id = json["payment_id"].as_str().unwrap_or_default().to_string();
    let k = key.clone().unwrap_or_default();
    // Decide under the lock, answer after the latency without it.
    let (wait, reply, release) = {
        let mut s = state.lock().unwrap();
        s.requests.push((
            "POST".into(),
            req.path().to_string(),
            key.clone(),
            auth.clone(),
            json.clone(),
            Instant::now(),
        ));
        let wait = latency(&s);
        if s.refuse_all || auth.as_deref() != Some(&format!("Bearer {API_KEY}")) {
            (
                wait,
                HttpResponse::Unauthorized().json(json!({"message": "bad key"})),
                None,
            )
        } else if k.is_empty() || payment_id.is_empty() {
            (
                wait,
                HttpResponse::BadRequest()
                    .json(json!({"message": "Idempotency-Key and payment_id are required"})),
                None,
            )
        } else if s.in_progress.contains(&k) {
            (
                wait,
                HttpResponse::Conflict().json(json!({"message": "in progress"})),
                None,
            )
        } else if let Some(c) = s.by_key.get(&k).cloned() {
            // The same key again: the recorded answer, no second charge.
            (wait, answer(&c), None)
        } else {
            let first = s.attempted.insert(payment_id.clone());
            let script = json["metadata"]["psp"]
                .as_str()
                .and_then(Script::from_name)
                .or(s.default_script)
                .filter(|_| first)
                .unwrap_or(Script::Succeed);
            s.in_progress.insert(k.clone());
            let release = Some(k.clone());
            match script {
                Script::Succeed => (
                    wait,
                    answer(&execute(&mut s, &payment_id, &k, true, None)),
                    release,
                ),
                Script::Decline => (
                    wait,
                    answer(&execute(&mut s, &payment_id, &k, false, None)),
                    release,
                ),
                Script::Reject => (
                    wait,
                    HttpResponse::UnprocessableEntity()
                        .json(json!({"message": "currency not enabled for this account"})),
                    release,
                ),
                Script::ChargeThenSlow(d) => {
                    let c = execute(&mut s, &payment_id, &k, true, None);
                    (d, answer(&c), release)
                }
                Script::ChargeThen500 => {
                    execute(&mut s, &payment_id, &k, true, None);
                    (wait, HttpResponse::InternalServerError().finish(), release)
                }
                Script::FailBeforeCharge => {
                    (wait, HttpResponse::InternalServerError().finish(), release)
                }
                Script::Processing(d) => {
                    let c = execute(&mut s, &payment_id, &k, true, Some(Instant::now() + d));
                    (wait, answer(&c), release)
                }
            }
        }
    };
    // Released also when the caller hangs up and this future is dropped.
    let _release = release.map(|id| InProgress(state.get_ref().clone(), id));
    tokio::time::sleep(wait).await;
    reply
}

/// Marks a key no longer in progress when dropped.
struct InProgress(Arc<Mutex<State>>, String);

impl Drop for InProgress {
    fn drop(&mut self) {
        if let Ok(mut s) = self.0.lock() {
            s.in_progress.remove(&self.1);
        }
    }
}

async fn status(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<Arc<Mutex<State>>>,
) -> HttpResponse {
    let auth = header(&req, "authorization");
    let (wait, reply) = {
        let mut s = state.lock().unwrap();
        s.requests.push((
            "GET".into(),
            req.path().to_string(),
            None,
            auth.clone(),
            Value::Null,
            Instant::now(),
        ));
        let wait = latency(&s);
        if s.refuse_all || auth.as_deref() != Some(&format!("Bearer {API_KEY}")) {
            (wait, HttpResponse::Unauthorized().finish())
        } else {
            match s.charges.get(path.as_str()) {
                Some(c) => (wait, answer(c)),
                None => (wait, HttpResponse::NotFound().finish()),
            }
        }
    };
    tokio::time::sleep(wait.min(Duration::from_millis(200))).await;
    reply
}
