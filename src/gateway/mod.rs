//! The payment provider (PSP) boundary: what async-pay asks a gateway, and the answers it can get.
//!
//! A charge has three outcomes, not two: it succeeded, it was declined, or the answer does not
//! say (a timeout or a 5xx after the request left, "processing"): [`Answer::Unknown`]. An unknown
//! outcome is never guessed: the payment stays pending and the provider is asked about it with
//! [`Gateway::status`] until it gives a final answer. Every call carries the payment id as its
//! idempotency key, so asking again, from any process, never charges twice.
//!
//! Implementations: [`simulated::SimulatedGateway`] (the original service's 2-5 s, 90 %
//! simulation, the default) and [`http::HttpGateway`] (a real provider behind the HTTP contract
//! in README.md). Callers bound every call with `gateway.timeout` ([`bounded`]).

pub mod http;
pub mod simulated;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rust_decimal::Decimal;
use uuid::Uuid;

use crate::config::{GatewayKind, GatewaySettings};
use crate::domain::Currency;

/// What a charge asks for: the payment as the provider needs it, not a database row.
#[derive(Debug, Clone, PartialEq)]
pub struct ChargeRequest {
    pub payment_id: Uuid,
    pub merchant: String,
    pub amount: Decimal,
    pub currency: Currency,
    pub description: Option<String>,
    pub metadata: serde_json::Value,
    /// The same for every call about one payment, from every process, for ever: the payment id.
    pub idempotency_key: String,
}

impl ChargeRequest {
    /// The idempotency key of a payment: its id, so that every process derives the same key.
    pub fn key_for(payment_id: Uuid) -> String {
        payment_id.to_string()
    }
}

/// A provider's answer to a charge or a status question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Charged. `charge_id` is the provider's reference.
    Succeeded { charge_id: String },
    /// Refused for good: the payment fails with this code and message. A request the provider
    /// refuses as malformed (400/422) is a decline with code `gateway_rejected`.
    Declined { code: String, message: String },
    /// The provider may or may not have charged (timeout, connection error, 5xx, 429, 409 "in
    /// progress", "processing", a body that is not the contract's). Ask again later.
    Unknown { reason: String },
    /// `status` only: the provider never received a charge for this payment, so charging it
    /// (with the same key) is safe.
    NotFound,
    /// The provider refused our credentials or our address (401/403, a POST answered 404/405):
    /// nothing was charged, and no payment may fail because of it. Processing pauses and retries
    /// until an operator fixes the configuration.
    Misconfigured { reason: String },
}

impl Answer {
    /// The metric label of this answer.
    pub fn label(&self) -> &'static str {
        match self {
            Answer::Succeeded { .. } => "succeeded",
            Answer::Declined { .. } => "declined",
            Answer::Unknown { .. } => "unknown",
            Answer::NotFound => "not_found",
            Answer::Misconfigured { .. } => "unauthorized",
        }
    }
}

/// The two calls a gateway answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Charge,
    Status,
}

impl Operation {
    pub fn label(self) -> &'static str {
        match self {
            Operation::Charge => "charge",
            Operation::Status => "status",
        }
    }
}

#[async_trait]
pub trait Gateway: Send + Sync + 'static {
    /// Charges the payment, with `request.idempotency_key` as the provider's idempotency key:
    /// asking twice about one payment charges once.
    async fn charge(&self, request: &ChargeRequest) -> Answer;

    /// What became of the charge of this payment: a final answer, [`Answer::NotFound`] if the
    /// provider never received it, or [`Answer::Unknown`] (still processing, or no answer).
    async fn status(&self, payment_id: Uuid) -> Answer;
}

/// The gateway `gateway.kind` names.
pub fn from_settings(settings: &GatewaySettings) -> anyhow::Result<Arc<dyn Gateway>> {
    Ok(match settings.kind {
        GatewayKind::Simulated => Arc::new(simulated::SimulatedGateway::new(settings)),
        GatewayKind::Http => Arc::new(http::HttpGateway::new(settings)?),
    })
}

/// Runs one gateway call, bounded by `limit` (`gateway.timeout`): past it the answer is
/// [`Answer::Unknown`], since the request may have reached the provider. Records the call's
/// metrics.
pub async fn bounded(
    operation: Operation,
    limit: Duration,
    call: impl Future<Output = Answer>,
) -> Answer {
    let started = std::time::Instant::now();
    let answer = match tokio::time::timeout(limit, call).await {
        Ok(a) => a,
        Err(_) => Answer::Unknown {
            reason: format!("no answer within {limit:?}"),
        },
    };
    crate::metrics::gateway_call(operation.label(), answer.label(), started.elapsed());
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_call_past_the_timeout_is_unknown_not_an_error() {
        let slow = async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Answer::Succeeded {
                charge_id: "late".into(),
            }
        };
        let a = bounded(Operation::Charge, Duration::from_millis(20), slow).await;
        assert!(matches!(a, Answer::Unknown { .. }), "{a:?}");
    }
}
