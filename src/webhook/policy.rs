//! What a sender does after an attempt: delivered (2xx), given up (410, or the schedule
//! exhausted), or retried after the next `webhook.retry_delays` entry, with jitter.

use std::time::Duration;

use time::OffsetDateTime;

use crate::db::webhooks::AfterAttempt;

/// What the sender decides after an attempt. A retry time past what a timestamp can hold (a
/// delay of millennia) gives up, as an exhausted schedule does.
pub fn after_attempt(
    attempt: i32,
    status: Option<u16>,
    delays: &[Duration],
    now: OffsetDateTime,
) -> AfterAttempt {
    match status {
        Some(s) if (200..300).contains(&s) => AfterAttempt::Delivered,
        Some(410) => AfterAttempt::Failed,
        _ => match usize::try_from(attempt.saturating_sub(1))
            .ok()
            .and_then(|i| delays.get(i))
            .and_then(|d| now.checked_add(time::Duration::try_from(jitter(*d)).ok()?))
        {
            Some(at) => AfterAttempt::RetryAt(at),
            None => AfterAttempt::Failed,
        },
    }
}

/// +-20 % so that many deliveries failing together do not retry together.
pub fn jitter(d: Duration) -> Duration {
    Duration::try_from_secs_f64(d.as_secs_f64() * (0.8 + 0.4 * fastrand::f64())).unwrap_or(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_delay_past_any_date_gives_up_instead_of_panicking() {
        let now = OffsetDateTime::now_utc();
        for d in [Duration::MAX, Duration::from_secs(u64::MAX / 4)] {
            assert_eq!(after_attempt(1, Some(500), &[d], now), AfterAttempt::Failed);
        }
        let AfterAttempt::RetryAt(at) = after_attempt(1, None, &[Duration::from_secs(10)], now)
        else {
            panic!("a 10 s delay is a retry");
        };
        assert!(at >= now + Duration::from_secs(8) && at <= now + Duration::from_secs(12));
        assert_eq!(
            after_attempt(i32::MIN, None, &[Duration::from_secs(1)], now),
            AfterAttempt::Failed
        );
    }
}
