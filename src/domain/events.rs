//! The events async-pay writes and reads: what the relay publishes for a new payment (and
//! `dlq replay` republishes), and the types of the webhooks merchants receive.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::PaymentStatus;

/// Event type of the outbox row written with every new payment (and by `dlq replay`): what the
/// consumer reads.
pub const PAYMENT_CREATED: &str = "payment.created";

/// The message body of a `payment.created` event: `{"payment_id": "…"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentEvent {
    pub payment_id: Uuid,
}

/// The `type` of the webhook that tells a merchant a payment reached `status`.
pub fn webhook_event_type(status: PaymentStatus) -> &'static str {
    match status {
        PaymentStatus::Succeeded => "payment.succeeded",
        PaymentStatus::Failed => "payment.failed",
        PaymentStatus::Pending => "payment.pending",
    }
}
