//! One claimed payment's gateway call and what it leaves behind: the provider's final answer
//! (the payment finalised with its webhook row), an unknown outcome (recorded, with the next
//! status check scheduled), or a refusal of our configuration (the claim given back).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use diesel_async::AsyncConnection;
use futures_util::FutureExt;
use uuid::Uuid;

use super::pause::Permit;
use super::{Failure, Outcome, Processor, RECORD_PATIENCE, Step, panic_message};
use crate::db;
use crate::db::payments::{self as payments_db, Claimed, Payment};
use crate::domain::{self, PaymentStatus};
use crate::gateway::{self, Answer, ChargeRequest, Operation};
use crate::webhook;

impl Processor {
    /// [`Processor::call_and_record`], and if it fails or panics, the payment is left as an
    /// unknown outcome: whatever the provider did is not on record, so it is asked about before
    /// any new charge, and the claim is given up so a retry need not wait for it.
    pub(super) async fn call_guarded(
        self: Arc<Self>,
        claimed: Claimed,
        token: Uuid,
        permit: Permit,
    ) -> Result<Step, Failure> {
        let (id, checks) = (claimed.payment.id, claimed.gateway_checks);
        let call = AssertUnwindSafe(self.clone().call_and_record(claimed, token, permit));
        let failure = match call.catch_unwind().await {
            Ok(Err(Failure::LostClaim)) => return Err(Failure::LostClaim),
            Ok(result) => match result {
                Ok(step) => return Ok(step),
                Err(e) => e,
            },
            Err(panic) => Failure::Crashed(format!("panicked: {}", panic_message(panic.as_ref()))),
        };
        let reason = failure.to_string();
        log::error!("payment {id}: {reason}");
        let _ = self.record_unknown(id, token, &reason, checks).await;
        Err(failure)
    }

    async fn call_and_record(
        self: Arc<Self>,
        claimed: Claimed,
        token: Uuid,
        permit: Permit,
    ) -> Result<Step, Failure> {
        let p = &claimed.payment;
        let answer = match claimed.prior_gateway_state.as_deref() {
            // No request was ever sent: charge.
            None => self.charge(p).await,
            // One may have been (a claim abandoned mid-call, an unknown answer): ask first.
            Some(state) => {
                let answer =
                    gateway::bounded(Operation::Status, self.timeout, self.gateway.status(p.id))
                        .await;
                log::info!(
                    "payment {}: gateway state was {state}; the provider's status: {}",
                    p.id,
                    answer.label()
                );
                match answer {
                    // Never received: charge it now, with the same key, under a claim renewed
                    // for this second call (so no call outlives the claim).
                    Answer::NotFound => {
                        if !self.renew_claim(p.id, token).await? {
                            return self.lost_claim(p.id).await.map(Step::Done);
                        }
                        self.charge(p).await
                    }
                    other => other,
                }
            }
        };
        let refused = match &answer {
            Answer::Misconfigured { reason } => Some(reason.as_str()),
            _ => None,
        };
        self.pause.answered(permit, refused);
        let id = p.id;
        match answer {
            Answer::Succeeded { charge_id } => {
                let outcome = payments_db::Outcome {
                    status: PaymentStatus::Succeeded,
                    charge_id: Some(&charge_id),
                    failure: None,
                };
                self.finalise(p, token, outcome).await.map(Step::Done)
            }
            Answer::Declined { code, message } => {
                let outcome = payments_db::Outcome {
                    status: PaymentStatus::Failed,
                    charge_id: None,
                    failure: Some((&code, &message)),
                };
                self.finalise(p, token, outcome).await.map(Step::Done)
            }
            Answer::Unknown { reason } => self
                .record_unknown(id, token, &reason, claimed.gateway_checks)
                .await
                .map(Step::Done),
            // A charge is never answered "not found"; a provider that does is not keeping the
            // contract, and what it did is unknown.
            Answer::NotFound => self
                .record_unknown(
                    id,
                    token,
                    "the provider answered a charge with 404",
                    claimed.gateway_checks,
                )
                .await
                .map(Step::Done),
            Answer::Misconfigured { .. } => {
                // Nothing was charged: give the claim up so the retry can take it at once.
                self.release_claim(id, token).await?;
                Ok(Step::Refused)
            }
        }
    }

    /// Charges a payment (its id as idempotency key), bounded by `gateway.timeout`.
    async fn charge(&self, p: &Payment) -> Answer {
        let request = ChargeRequest {
            payment_id: p.id,
            merchant: p.merchant.clone(),
            amount: p.amount,
            currency: p.currency,
            description: p.description.clone(),
            metadata: p.metadata.clone(),
            idempotency_key: ChargeRequest::key_for(p.id),
        };
        gateway::bounded(
            Operation::Charge,
            self.timeout,
            self.gateway.charge(&request),
        )
        .await
    }

    /// Writes the provider's final answer and the webhook delivery, in one transaction.
    async fn finalise(
        &self,
        p: &Payment,
        token: Uuid,
        outcome: payments_db::Outcome<'_>,
    ) -> Result<Outcome, Failure> {
        let id = p.id;
        let finalised = self
            .db(
                "finalise the payment",
                id,
                Some(RECORD_PATIENCE),
                || async {
                    let mut c = db::conn(&self.pool).await?;
                    Ok(c.transaction::<_, diesel::result::Error, _>(async |tx| {
                        let Some(p) = payments_db::finalise(tx, id, token, outcome).await? else {
                            return Ok(None);
                        };
                        webhook::schedule(tx, &p, None).await?;
                        Ok(Some(p))
                    })
                    .await?)
                },
            )
            .await?;
        let Some(p) = finalised else {
            return self.lost_claim(id).await;
        };
        let status = outcome.status;
        crate::metrics::payment_finalised(status.as_str());
        match outcome.failure {
            Some((code, message)) => log::info!(
                "payment {id} {status}: {code} ({message}) ({} {}, merchant {})",
                domain::format_amount(p.amount),
                p.currency,
                p.merchant
            ),
            None => log::info!(
                "payment {id} {status} ({} {}, merchant {}, charge {})",
                domain::format_amount(p.amount),
                p.currency,
                p.merchant,
                outcome.charge_id.unwrap_or("-")
            ),
        }
        if p.webhook_url.is_some() {
            self.webhook_wake.notify_one();
        }
        Ok(Outcome::Finalised(id, status))
    }

    /// Gives our claim up (no call is under way).
    pub(super) async fn release_claim(&self, id: Uuid, token: Uuid) -> Result<(), Failure> {
        self.db("release the claim", id, Some(RECORD_PATIENCE), || async {
            let mut c = db::conn(&self.pool).await?;
            Ok(payments_db::release_claims(&mut c, &[(id, token)]).await?)
        })
        .await
        .map(|_| ())
    }

    /// Extends our claim before another call; `false` if it is no longer ours.
    pub(super) async fn renew_claim(&self, id: Uuid, token: Uuid) -> Result<bool, Failure> {
        self.db("renew the claim", id, Some(RECORD_PATIENCE), || async {
            let mut c = db::conn(&self.pool).await?;
            Ok(payments_db::renew_claim(&mut c, id, token, self.lease).await?)
        })
        .await
    }

    /// Keeps the payment pending with the reason, and schedules the next status check.
    async fn record_unknown(
        &self,
        id: Uuid,
        token: Uuid,
        reason: &str,
        checks: i32,
    ) -> Result<Outcome, Failure> {
        let wait =
            crate::webhook::jitter(recheck_delay(self.recheck_min, self.recheck_max, checks));
        let recorded = self
            .db(
                "record the unknown outcome",
                id,
                Some(RECORD_PATIENCE),
                || async {
                    let mut c = db::conn(&self.pool).await?;
                    Ok(payments_db::record_unknown(&mut c, id, token, reason, wait).await?)
                },
            )
            .await?;
        if !recorded {
            return self.lost_claim(id).await;
        }
        log::warn!(
            "payment {id}: the provider's answer is unknown ({reason}); it stays pending and the \
             provider is asked again in {wait:.1?} (unknown answers so far: {})",
            checks + 1
        );
        Ok(Outcome::AwaitingProvider(id))
    }

    /// Our claim lapsed and someone else took the payment over: if they finished it, their
    /// outcome stands; if it is still pending, the caller tries again later.
    async fn lost_claim(&self, id: Uuid) -> Result<Outcome, Failure> {
        let state = self
            .db("read the payment", id, Some(RECORD_PATIENCE), || async {
                let mut c = db::conn(&self.pool).await?;
                Ok(payments_db::claim_state(&mut c, id).await?)
            })
            .await?;
        if state.is_some_and(|s| s.status == PaymentStatus::Pending) {
            return Err(Failure::LostClaim);
        }
        log::warn!(
            "payment {id}: lost the claim before recording; the other holder's outcome stands"
        );
        Ok(Outcome::AlreadyFinal(id))
    }
}

/// How long after `checks` unknown answers in a row the provider is asked again: `min`, then
/// twice as long each time, at most `max`.
pub fn recheck_delay(min: Duration, max: Duration, checks: i32) -> Duration {
    let doublings = u32::try_from(checks).unwrap_or(0).min(30);
    min.saturating_mul(1u32 << doublings).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rechecks_back_off_to_the_maximum() {
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(300));
        let delays: Vec<u64> = (0..12)
            .map(|n| recheck_delay(min, max, n).as_secs())
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(recheck_delay(min, max, i32::MAX), max);
    }
}
