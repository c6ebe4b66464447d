//! Reconciliation: payments whose gateway outcome is unknown, or whose claim was abandoned in
//! the middle of a call (a consumer that died), are asked about with the provider's `status`
//! when their check is due (`payments.next_check_at`), until the provider gives a final answer;
//! on "not found" they are charged, with the same idempotency key. The schedule lives in the
//! database, so it survives every crash and needs no message: a payment whose message was
//! dead-lettered or lost is still reconciled.
//!
//! Each check is logged under the request id of the POST that created the payment (kept on the
//! payment row), as the consumer logs its message.
//!
//! `consume` runs [`Processor::sweep`] beside its message loop (several consumers share the
//! work: claims skip rows another one holds); `async-pay reconcile` runs one
//! [`Processor::reconcile_due`] pass.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use uuid::Uuid;

use super::{Failure, Outcome, Processor, Step};
use crate::db::payments::{self as payments_db, Claimed, PendingHealth};
use crate::db::{self, DbError};
use crate::domain::PaymentStatus;
use crate::shutdown::{MAX_BACKOFF, backoff};

/// Payments claimed per round trip of a pass (and asked about at once).
pub const BATCH: i64 = 100;
/// How often the sweep refreshes the "unknown" and "stuck" gauges.
const HEALTH_EVERY: Duration = Duration::from_secs(10);
/// At most one ERROR line about stuck payments this often.
const STUCK_LOG_EVERY: Duration = Duration::from_secs(60);

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Payments whose check was due and that this pass claimed.
    pub checked: usize,
    pub succeeded: usize,
    pub failed: usize,
    /// The provider still does not say: asked again later.
    pub still_unknown: usize,
    /// Finished by someone else meanwhile.
    pub already_final: usize,
    /// The provider refused our configuration (401/403): the pass stopped.
    pub refused: bool,
    /// Could not be settled now (database errors, a lost claim): they stay due.
    pub errors: usize,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "checked {} payment(s) with the provider: {} succeeded, {} failed, {} still unknown, \
             {} already final, {} error(s)",
            self.checked,
            self.succeeded,
            self.failed,
            self.still_unknown,
            self.already_final,
            self.errors
        )?;
        if self.refused {
            f.write_str("; stopped: the provider refuses our configuration (gateway.api_key?)")?;
        }
        Ok(())
    }
}

impl Processor {
    /// One pass: claims the payments due now, [`BATCH`] at a time, asks the provider about each
    /// (all of a batch at once) and settles them; returns when none is due any more.
    pub async fn reconcile_due(self: &Arc<Self>) -> Result<Summary, DbError> {
        let mut summary = Summary::default();
        let result = self.reconcile_batches(&mut summary).await;
        crate::metrics::reconcile_pass(result.is_ok());
        result.map(|()| summary)
    }

    async fn reconcile_batches(self: &Arc<Self>, summary: &mut Summary) -> Result<(), DbError> {
        while !self.shutdown.is_triggered() {
            if self.pause.is_paused() {
                summary.refused = true;
                return Ok(());
            }
            let token = Uuid::new_v4();
            let claimed = db::with_timeout(self.db_deadline, async {
                let mut c = db::conn(&self.pool).await?;
                Ok(payments_db::claim_due_checks(&mut c, token, self.lease, BATCH).await?)
            })
            .await?;
            let n = claimed.len();
            summary.checked += n;
            let mut calls = JoinSet::new();
            for c in claimed {
                let me = self.clone();
                // Under the request id of the POST that created the payment.
                let request_id = c.payment.request_id.clone();
                calls.spawn(crate::logging::scope(request_id, async move {
                    let id = c.payment.id;
                    let result = me.check(c, token).await;
                    if let Err(e) = &result
                        && !matches!(e, Failure::ShuttingDown)
                    {
                        log::warn!("reconciliation of payment {id}: {e}; it stays due");
                    }
                    result
                }));
            }
            while let Some(done) = calls.join_next().await {
                match done {
                    Ok(Ok(Step::Done(Outcome::Finalised(_, PaymentStatus::Succeeded)))) => {
                        summary.succeeded += 1
                    }
                    Ok(Ok(Step::Done(Outcome::Finalised(_, _)))) => summary.failed += 1,
                    Ok(Ok(Step::Done(Outcome::AwaitingProvider(_)))) => summary.still_unknown += 1,
                    Ok(Ok(Step::Done(_))) => summary.already_final += 1,
                    Ok(Ok(Step::Refused)) => summary.refused = true,
                    Ok(Err(Failure::ShuttingDown)) => {}
                    Ok(Err(_)) => summary.errors += 1,
                    Err(e) => {
                        log::error!("reconciliation: a check failed: {e}");
                        summary.errors += 1;
                    }
                }
            }
            if n < BATCH as usize {
                break;
            }
        }
        Ok(())
    }

    /// Checks one payment claimed for the pass (under `token`): waits at a pause, renews the
    /// claim, asks the provider and settles the payment.
    async fn check(self: Arc<Self>, c: Claimed, token: Uuid) -> Result<Step, Failure> {
        let id = c.payment.id;
        let Some(permit) = self.pause.clone().enter(&self.shutdown).await else {
            // Stopping: give the claim back instead of leaving it for a lease.
            let _ = self.release_claim(id, token).await;
            return Err(Failure::ShuttingDown);
        };
        // The wait at a pause may have been long: the claim must cover the call.
        if !self.renew_claim(id, token).await? {
            return Err(Failure::LostClaim);
        }
        self.call_detached(c, token, permit).await
    }

    /// The gauges of payments awaiting the provider and of payments stuck pending.
    pub async fn pending_health(&self, stuck_after: Duration) -> Result<PendingHealth, DbError> {
        let h = db::with_timeout(self.db_deadline, async {
            let mut c = db::conn(&self.pool).await?;
            Ok(payments_db::pending_health(&mut c, stuck_after).await?)
        })
        .await?;
        crate::metrics::pending_health(h.unknown, h.stuck);
        Ok(h)
    }

    /// `consume`'s background sweep: a [`Processor::reconcile_due`] pass every `interval`, and
    /// the health gauges every few seconds (an ERROR line while payments are stuck), until
    /// shutdown.
    pub async fn sweep(self: Arc<Self>, interval: Duration, stuck_after: Duration) {
        let mut failures = 0;
        let mut health_due = Instant::now();
        let mut stuck_logged: Option<Instant> = None;
        loop {
            let mut wait = interval;
            match self.reconcile_due().await {
                Ok(s) if s.checked > 0 => {
                    failures = 0;
                    log::info!("reconciliation: {s}");
                }
                Ok(_) => failures = 0,
                Err(e) => {
                    wait = backoff(failures, MAX_BACKOFF);
                    failures += 1;
                    log::warn!("reconciliation: {e}; trying again in {wait:?}");
                }
            }
            if Instant::now() >= health_due {
                health_due = Instant::now() + HEALTH_EVERY;
                match self.pending_health(stuck_after).await {
                    Ok(h) if h.stuck > 0 => {
                        if stuck_logged.is_none_or(|t| t.elapsed() >= STUCK_LOG_EVERY) {
                            stuck_logged = Some(Instant::now());
                            log::error!("{}", stuck_message(&h, stuck_after));
                        }
                    }
                    Ok(_) => stuck_logged = None,
                    Err(e) => log::warn!("cannot count pending payments: {e}"),
                }
            }
            if self.shutdown.sleep(wait).await {
                break;
            }
        }
    }
}

/// The ERROR line (and `reconcile`'s report) about payments stuck pending.
pub fn stuck_message(h: &PendingHealth, stuck_after: Duration) -> String {
    format!(
        "{} payment(s) pending for longer than {} (oldest: {}): their message may have been \
         dead-lettered before any charge; see `async-pay dlq list` and `async-pay dlq replay`",
        h.stuck,
        humantime::format_duration(stuck_after),
        h.oldest_stuck
            .map(|id| id.to_string())
            .unwrap_or_else(|| "-".into())
    )
}
