//! Fuzzes the payment request parser (`POST /api/v1/payments` bodies): it must never panic, and
//! whatever it accepts must parse again, written back out, to the same request.
#![no_main]

use async_pay::api::payments::PaymentRequest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = PaymentRequest::parse(data) {
        let again = serde_json::json!({
            "amount": async_pay::domain::format_amount(req.amount),
            "currency": req.currency,
            "description": req.description,
            "metadata": req.metadata,
            "webhook_url": req.webhook_url,
        });
        let req2 = PaymentRequest::parse(again.to_string().as_bytes()).expect("accepted output reparses");
        assert_eq!(req2, req);
        assert_eq!(req2.fingerprint(), req.fingerprint());
    }
});
