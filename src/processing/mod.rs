//! Payment processing, independent of RabbitMQ: claim the payment, ask the gateway, and settle
//! it once: finalise it (with its webhook delivery row, in one transaction) or, when the
//! provider's answer does not say, record the unknown outcome and schedule a status check.
//! `consume` drives [`Processor::process`] per message; the reconciliation sweep
//! ([`reconcile`]) drives the same steps for payments whose check is due.
//!
//! The one-charge rules:
//! - Every call carries the payment id as idempotency key ([`ChargeRequest::key_for`]).
//! - A payment is claimed (a lease in its row) before any call, and only the claim holder may
//!   finalise it. The lease is `gateway.timeout` plus a margin, and every call is bounded by
//!   `gateway.timeout`, so no call outlives its claim.
//! - The claim marks the payment `charging`: whoever takes it over later (a redelivered message,
//!   the sweep) asks the provider's status before charging, and charges (same key) only on "not
//!   found".
//! - Log lines name the request id of the task that drives the payment (`crate::logging`): the
//!   message's, or the payment's own for the sweep; the tasks below inherit it.
//! - The claim, the call and its recording run in a task of their own
//!   ([`Processor::wait_for_calls`]): a lost broker connection or the shutdown deadline never
//!   throws a claim or an awaited answer away; the outcome is committed.

mod call;
pub mod pause;
pub mod reconcile;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::config::{GatewaySettings, Settings};
use crate::db::payments::{self as payments_db, Claimed};
use crate::db::{self, DbError, Pool};
use crate::domain::PaymentStatus;
use crate::gateway::Gateway;
use crate::shutdown::{MAX_BACKOFF, Shutdown, backoff};
use pause::{Pause, Permit};

/// Longest a waiting duplicate sleeps before looking at a claimed payment again.
const CLAIM_RECHECK: Duration = Duration::from_secs(2);
/// A claim lasts `gateway.timeout` plus this: room for the database work around the call.
const LEASE_MARGIN: Duration = Duration::from_secs(10);
/// How long the outcome of a finished gateway call is retried against a database outage, also
/// while stopping. Past it the payment stays `charging` with a due check, and the sweep asks the
/// provider again: nothing is lost, nobody is charged twice.
const RECORD_PATIENCE: Duration = Duration::from_secs(30);

/// How long a claim lasts: a consumer that dies leaves its payments to others after this.
pub fn lease_for(g: &GatewaySettings) -> Duration {
    g.timeout + LEASE_MARGIN
}

/// What became of a payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Finalised now, with the provider's answer.
    Finalised(Uuid, PaymentStatus),
    /// Already final (a duplicate message, or someone else finished it).
    AlreadyFinal(Uuid),
    /// No such payment.
    UnknownPayment(Uuid),
    /// The provider's answer did not say whether it charged: recorded; the sweep asks again.
    AwaitingProvider(Uuid),
}

impl Outcome {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Finalised(_, PaymentStatus::Succeeded) => "succeeded",
            Outcome::Finalised(_, PaymentStatus::Failed) => "failed",
            Outcome::Finalised(_, PaymentStatus::Pending) => "pending",
            Outcome::AlreadyFinal(_) => "already_final",
            Outcome::UnknownPayment(_) => "unknown_payment",
            Outcome::AwaitingProvider(_) => "awaiting_provider",
        }
    }
}

/// Why processing a payment did not finish.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("database error: {0:#}")]
    Db(anyhow::Error),
    /// Stopped before it could finish (SIGTERM while waiting): not the message's fault.
    #[error("shutting down")]
    ShuttingDown,
    /// Our claim lapsed and the payment is still pending (another holder has it now).
    #[error("lost the claim while the payment is still pending")]
    LostClaim,
    /// The gateway call's task panicked or was cut (a bug): what the provider did is unknown.
    #[error("the gateway call crashed: {0}")]
    Crashed(String),
}

/// What one claimed payment's gateway call came to.
enum Step {
    Done(Outcome),
    /// The provider refused our configuration; nothing was charged. Try again once the pause
    /// lets calls through.
    Refused,
}

pub struct Processor {
    pool: Pool,
    gateway: Arc<dyn Gateway>,
    timeout: Duration,
    lease: Duration,
    recheck_min: Duration,
    recheck_max: Duration,
    /// Deadline of one unit of database work: a stalled server is an outage, not a hang.
    db_deadline: Duration,
    /// Gateway calls in flight, each in its own task.
    calls: TaskTracker,
    pause: Arc<Pause>,
    /// Wakes the webhook sender when a delivery was just written.
    webhook_wake: Arc<Notify>,
    shutdown: Shutdown,
}

impl Processor {
    pub fn new(
        settings: &Settings,
        pool: Pool,
        gateway: Arc<dyn Gateway>,
        shutdown: Shutdown,
    ) -> Arc<Self> {
        let g = &settings.gateway;
        Arc::new(Processor {
            pool,
            gateway,
            timeout: g.timeout,
            lease: lease_for(g),
            recheck_min: g.recheck_min,
            recheck_max: g.recheck_max,
            db_deadline: settings.database.acquire_timeout + settings.database.query_timeout,
            calls: TaskTracker::new(),
            pause: Arc::new(Pause::default()),
            webhook_wake: Arc::new(Notify::new()),
            shutdown,
        })
    }

    pub fn webhook_wake(&self) -> Arc<Notify> {
        self.webhook_wake.clone()
    }

    /// Waits until every gateway call in flight has ended and its outcome is recorded (each is
    /// bounded by `gateway.timeout`, its recording by [`RECORD_PATIENCE`]).
    pub async fn wait_for_calls(&self) {
        self.calls.close();
        if !self.calls.is_empty() {
            log::info!(
                "waiting for {} gateway call(s) in flight to end and be recorded",
                self.calls.len()
            );
        }
        self.calls.wait().await;
    }

    /// Processes the payment of a `payment.created` event.
    pub async fn process(self: &Arc<Self>, id: Uuid) -> Result<Outcome, Failure> {
        loop {
            let Some(permit) = self.pause.clone().enter(&self.shutdown).await else {
                return Err(Failure::ShuttingDown);
            };
            match self.claim_and_call(id, permit).await? {
                Some(Step::Done(outcome)) => return Ok(outcome),
                Some(Step::Refused) => continue,
                None => match self.not_claimed(id).await? {
                    Some(outcome) => return Ok(outcome),
                    None => continue,
                },
            }
        }
    }

    /// Claims the payment and, if that worked, calls the gateway and records the answer, all
    /// in a task of its own: dropping the returned future (a lost broker connection, the
    /// shutdown deadline) stops none of it, so no claim is taken and then forgotten, and no
    /// answer is thrown away. `None`: not claimed (final, unknown, or held elsewhere).
    async fn claim_and_call(
        self: &Arc<Self>,
        id: Uuid,
        permit: Permit,
    ) -> Result<Option<Step>, Failure> {
        let me = self.clone();
        let task = self.calls.spawn(crate::logging::inherit(async move {
            let token = Uuid::new_v4();
            let claimed = me
                .db("claim the payment", id, None, || async {
                    let mut c = db::conn(&me.pool).await?;
                    Ok(payments_db::claim(&mut c, id, token, me.lease).await?)
                })
                .await?;
            match claimed {
                Some(claimed) => me.call_guarded(claimed, token, permit).await.map(Some),
                None => Ok(None),
            }
        }));
        task.await
            .unwrap_or_else(|e| Err(Failure::Crashed(e.to_string())))
    }

    /// Why the payment could not be claimed: `Some` if there is nothing to do, `None` after
    /// waiting for another holder's claim to end (then try again).
    async fn not_claimed(&self, id: Uuid) -> Result<Option<Outcome>, Failure> {
        let state = self
            .db("read the payment", id, None, || async {
                let mut c = db::conn(&self.pool).await?;
                Ok(payments_db::claim_state(&mut c, id).await?)
            })
            .await?;
        match state {
            None => {
                log::warn!("payment {id}: no such payment; nothing to do");
                Ok(Some(Outcome::UnknownPayment(id)))
            }
            Some(s) if s.status.is_final() => {
                log::info!("payment {id}: already {}; nothing to do", s.status);
                Ok(Some(Outcome::AlreadyFinal(id)))
            }
            Some(s) => {
                // Another consumer holds it (a duplicate delivery, the sweep, or one that died
                // and whose claim has not lapsed yet): look again when its claim may be over.
                let left = Duration::from_millis(s.claim_left_ms.unwrap_or(0).max(50) as u64);
                log::debug!("payment {id}: claimed elsewhere for {left:?} more; waiting");
                if self.shutdown.sleep(left.min(CLAIM_RECHECK)).await {
                    return Err(Failure::ShuttingDown);
                }
                Ok(None)
            }
        }
    }

    /// Runs the gateway call of a claimed payment ([`Processor::call_guarded`]) in a task of
    /// its own, which owns the claim from here on (see [`Processor::claim_and_call`]).
    async fn call_detached(
        self: &Arc<Self>,
        claimed: Claimed,
        token: Uuid,
        permit: Permit,
    ) -> Result<Step, Failure> {
        let me = self.clone();
        let task = self.calls.spawn(crate::logging::inherit(async move {
            me.call_guarded(claimed, token, permit).await
        }));
        task.await
            .unwrap_or_else(|e| Err(Failure::Crashed(e.to_string())))
    }

    /// Runs `work` (which takes its own pooled connection), waiting out database outages with
    /// backoff: an outage is not the payment's fault. Each try has the deadline of
    /// `database.acquire_timeout` + `database.query_timeout`: a server that stops answering is
    /// an outage too, never a hang of the consumer or of its shutdown. (A statement that
    /// committed just before its deadline is harmless to try again: every statement here is
    /// guarded by the claim token or the status, and a lost finalise is read back.) With `patience`, it keeps trying that long
    /// even while stopping (an answer from the provider is worth writing down); without, it
    /// gives up when shutdown comes. Other errors are returned.
    async fn db<T, F, Fut>(
        &self,
        what: &str,
        id: Uuid,
        patience: Option<Duration>,
        mut work: F,
    ) -> Result<T, Failure>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, DbError>>,
    {
        let started = std::time::Instant::now();
        let mut attempt = 0;
        loop {
            match db::with_timeout(self.db_deadline, work()).await {
                Ok(v) => return Ok(v),
                Err(DbError::Unavailable(why)) => {
                    let wait = backoff(attempt, MAX_BACKOFF);
                    attempt += 1;
                    log::warn!(
                        "payment {id}: database unavailable while trying to {what} ({why}); retrying in {wait:?}"
                    );
                    let stop = match patience {
                        Some(limit) if started.elapsed() + wait > limit => {
                            return Err(Failure::Db(anyhow::anyhow!(
                                "cannot {what}: the database stayed unavailable for {limit:?}"
                            )));
                        }
                        Some(_) => {
                            tokio::time::sleep(wait).await;
                            false
                        }
                        None => self.shutdown.sleep(wait).await,
                    };
                    if stop {
                        return Err(Failure::ShuttingDown);
                    }
                }
                Err(DbError::Other(e)) => {
                    return Err(Failure::Db(e.context(format!("cannot {what}"))));
                }
            }
        }
    }
}

/// The text of a panic, for the log.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_string())
}
