//! The payment gateway, behind a trait so a real provider's client can replace the simulation.

use std::time::Duration;

use async_trait::async_trait;

use crate::config::GatewaySettings;
use crate::db::payments::Payment;
use crate::domain::PaymentStatus;

/// The gateway could not give an answer (outage, 5xx): the payment is retried later. A decline
/// is not an error; it is `Ok(PaymentStatus::Failed)`.
#[derive(Debug, thiserror::Error)]
#[error("gateway error: {0}")]
pub struct GatewayError(pub String);

#[async_trait]
pub trait Gateway: Send + Sync + 'static {
    /// Charges the payment and answers its final status. Called with the payment id as the
    /// provider's idempotency key, so asking twice about one payment charges once.
    async fn charge(&self, payment: &Payment) -> Result<PaymentStatus, GatewayError>;
}

/// The original service's simulation: a delay drawn from `min_delay..max_delay`, success with
/// probability `success_rate`. Both draws are seeded by the payment id, so a retry of the same
/// payment gets the same answer, as from a real gateway's idempotency key.
pub struct SimulatedGateway {
    min: Duration,
    max: Duration,
    success_rate: f64,
}

impl SimulatedGateway {
    pub fn new(s: &GatewaySettings) -> Self {
        SimulatedGateway {
            min: s.min_delay,
            max: s.max_delay,
            success_rate: s.success_rate,
        }
    }

    /// The delay and the verdict this gateway gives for a payment id.
    pub fn decide(&self, id: uuid::Uuid) -> (Duration, PaymentStatus) {
        let v = id.as_u128();
        let mut rng = fastrand::Rng::with_seed((v as u64) ^ ((v >> 64) as u64));
        let delay = self.min + (self.max.saturating_sub(self.min)).mul_f64(rng.f64());
        let status = if rng.f64() < self.success_rate {
            PaymentStatus::Succeeded
        } else {
            PaymentStatus::Failed
        };
        (delay, status)
    }
}

#[async_trait]
impl Gateway for SimulatedGateway {
    async fn charge(&self, payment: &Payment) -> Result<PaymentStatus, GatewayError> {
        let (delay, status) = self.decide(payment.id);
        tokio::time::sleep(delay).await;
        Ok(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_payment_same_answer_and_rates_roughly_hold() {
        let g = SimulatedGateway {
            min: Duration::from_millis(10),
            max: Duration::from_millis(20),
            success_rate: 0.9,
        };
        let id = uuid::Uuid::now_v7();
        assert_eq!(g.decide(id), g.decide(id));
        let mut ok = 0;
        for _ in 0..2000 {
            let (d, s) = g.decide(uuid::Uuid::new_v4());
            assert!(d >= Duration::from_millis(10) && d <= Duration::from_millis(20));
            ok += usize::from(s == PaymentStatus::Succeeded);
        }
        assert!((1700..=1900).contains(&ok), "{ok} of 2000 succeeded");
    }
}
