//! A webhook delivery, written in the transaction that finalises the payment (so a final payment
//! is always followed by its webhook, whatever crashes after the commit) or by a resend.

use crate::db::payments::Payment;
use crate::db::webhooks as webhooks_db;
use crate::domain;
use crate::domain::events::webhook_event_type;

/// The webhook body for a final payment. `payment_id`, `status` and `processed_at` are the
/// original service's fields, with the same values `GET` shows.
pub fn payload(p: &Payment) -> serde_json::Value {
    let status = p.status;
    let processed_at = p.processed_at.and_then(|t| {
        t.format(&time::format_description::well_known::Rfc3339)
            .ok()
    });
    serde_json::json!({
        "type": webhook_event_type(status),
        "payment_id": p.id,
        "status": p.status,
        "processed_at": processed_at,
        "amount": domain::format_amount(p.amount),
        "currency": p.currency,
        "metadata": p.metadata,
        "charge_id": p.charge_id,
        "failure_code": p.failure_code,
        "failure_message": p.failure_message,
    })
}

/// The host part of a webhook URL (for per-host limits).
pub fn host_of(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_default()
}

/// Writes a delivery of the payment's final status to its webhook_url, due now. Call in the
/// transaction that finalises the payment (so the webhook cannot be lost) or for a resend, which
/// passes the `message_id` of the original so merchants can deduplicate. Returns the delivery
/// id and its message id, or `None` for a payment without webhook_url.
pub async fn schedule(
    conn: &mut diesel_async::AsyncPgConnection,
    p: &Payment,
    message_id: Option<&str>,
) -> diesel::QueryResult<Option<(uuid::Uuid, String)>> {
    let Some(url) = &p.webhook_url else {
        return Ok(None);
    };
    let id = uuid::Uuid::now_v7();
    let message_id = message_id.map_or_else(|| format!("msg_{}", id.simple()), str::to_string);
    let status = p.status;
    let payload = payload(p);
    webhooks_db::insert(
        conn,
        &webhooks_db::NewDelivery {
            id,
            message_id: &message_id,
            payment_id: p.id,
            merchant: &p.merchant,
            event_type: webhook_event_type(status),
            url,
            host: &host_of(url),
            payload: &payload,
            // The payment's, so the sender's lines about this delivery name the POST's id (a
            // resend too: it is about the same payment).
            request_id: p.request_id.as_deref(),
        },
    )
    .await?;
    Ok(Some((id, message_id)))
}
