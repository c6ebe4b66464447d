//! The original service's gateway simulation (the default `gateway.kind`): a delay drawn from
//! `min_delay..max_delay`, success with probability `success_rate`.

use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

use super::{Answer, ChargeRequest, Gateway};
use crate::config::GatewaySettings;

/// Both draws are seeded by the payment id, so charging a payment again gives the same answer,
/// as a real provider does for a repeated idempotency key: it is idempotent by construction.
pub struct SimulatedGateway {
    min: Duration,
    max: Duration,
    success_rate: f64,
}

/// The decline code of a simulated decline.
pub const DECLINE_CODE: &str = "card_declined";

impl SimulatedGateway {
    pub fn new(s: &GatewaySettings) -> Self {
        SimulatedGateway {
            min: s.min_delay,
            max: s.max_delay,
            success_rate: s.success_rate,
        }
    }

    /// The delay and whether this gateway charges a payment id successfully.
    pub fn decide(&self, id: Uuid) -> (Duration, bool) {
        let v = id.as_u128();
        let mut rng = fastrand::Rng::with_seed((v as u64) ^ ((v >> 64) as u64));
        let delay = self.min + (self.max.saturating_sub(self.min)).mul_f64(rng.f64());
        (delay, rng.f64() < self.success_rate)
    }

    /// The answer it gives for a payment id.
    pub fn answer(&self, id: Uuid) -> Answer {
        if self.decide(id).1 {
            Answer::Succeeded {
                charge_id: format!("sim_{}", id.simple()),
            }
        } else {
            Answer::Declined {
                code: DECLINE_CODE.to_string(),
                message: "the simulated gateway declined the payment".to_string(),
            }
        }
    }
}

#[async_trait]
impl Gateway for SimulatedGateway {
    async fn charge(&self, request: &ChargeRequest) -> Answer {
        let (delay, _) = self.decide(request.payment_id);
        tokio::time::sleep(delay).await;
        self.answer(request.payment_id)
    }

    /// The simulation keeps no record of what it charged: it answers "never received", and
    /// charging again (same id, same draw) gives the answer the first charge gave.
    async fn status(&self, _payment_id: Uuid) -> Answer {
        Answer::NotFound
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
        let id = Uuid::now_v7();
        assert_eq!(g.decide(id), g.decide(id));
        assert_eq!(g.answer(id), g.answer(id));
        let mut ok = 0;
        for _ in 0..2000 {
            let id = Uuid::new_v4();
            let (d, charged) = g.decide(id);
            assert!(d >= Duration::from_millis(10) && d <= Duration::from_millis(20));
            assert_eq!(charged, matches!(g.answer(id), Answer::Succeeded { .. }));
            ok += usize::from(charged);
        }
        assert!((1700..=1900).contains(&ok), "{ok} of 2000 succeeded");
    }
}
