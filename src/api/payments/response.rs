//! What the payment routes answer: the DTOs of the OpenAPI document.

use serde::Serialize;
use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::db::payments::{Payment, PaymentView};
use crate::domain::{self, Currency, PaymentStatus};

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CreatedOut {
    pub payment_id: Uuid,
    pub status: PaymentStatus,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PaymentOut {
    pub id: Uuid,
    /// Always two decimals, as a string: `"100.50"`.
    #[schema(example = "100.50")]
    pub amount: String,
    pub currency: Currency,
    pub description: Option<String>,
    #[schema(value_type = Object)]
    pub metadata: Value,
    pub status: PaymentStatus,
    pub idempotency_key: String,
    pub webhook_url: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub processed_at: Option<OffsetDateTime>,
    /// The payment provider's reference of the charge, once final (`null` before).
    pub charge_id: Option<String>,
    /// Why a `failed` payment failed: the provider's decline code (`card_declined`,
    /// `insufficient_funds`, …, or `gateway_rejected` when the provider refused the request
    /// itself); `null` otherwise.
    pub failure_code: Option<String>,
    /// The provider's human-readable reason for `failure_code`; `null` otherwise.
    pub failure_message: Option<String>,
    pub webhook: WebhookOut,
}

/// Where the payment's webhook stands (its newest delivery).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WebhookOut {
    /// `none` (no webhook_url), `pending`, `delivered` or `failed`.
    #[schema(pattern = "^(none|pending|delivered|failed)$")]
    pub status: String,
    pub attempts: i32,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_attempt_at: Option<OffsetDateTime>,
    pub last_status_code: Option<i32>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub next_attempt_at: Option<OffsetDateTime>,
}

impl From<PaymentView> for PaymentOut {
    fn from(v: PaymentView) -> Self {
        let webhook = match (&v.payment.webhook_url, v.webhook_status) {
            (None, _) => WebhookOut {
                status: "none".into(),
                attempts: 0,
                last_attempt_at: None,
                last_status_code: None,
                next_attempt_at: None,
            },
            // Not final yet: the webhook will be due once it is.
            (Some(_), None) => WebhookOut {
                status: "pending".into(),
                attempts: 0,
                last_attempt_at: None,
                last_status_code: None,
                next_attempt_at: None,
            },
            (Some(_), Some(status)) => WebhookOut {
                next_attempt_at: v.webhook_next_attempt_at.filter(|_| status == "pending"),
                status,
                attempts: v.webhook_attempts.unwrap_or(0),
                last_attempt_at: v.webhook_last_attempt_at,
                last_status_code: v.webhook_last_status_code,
            },
        };
        PaymentOut {
            webhook,
            ..PaymentOut::from_payment(v.payment)
        }
    }
}

impl PaymentOut {
    fn from_payment(p: Payment) -> Self {
        PaymentOut {
            id: p.id,
            amount: domain::format_amount(p.amount),
            currency: p.currency,
            description: p.description,
            metadata: p.metadata,
            status: p.status,
            idempotency_key: p.idempotency_key,
            webhook_url: p.webhook_url,
            created_at: p.created_at,
            processed_at: p.processed_at,
            charge_id: p.charge_id,
            failure_code: p.failure_code,
            failure_message: p.failure_message,
            webhook: WebhookOut {
                status: "none".into(),
                attempts: 0,
                last_attempt_at: None,
                last_status_code: None,
                next_attempt_at: None,
            },
        }
    }
}
