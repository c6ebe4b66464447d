//! The pause a misconfigured gateway puts on every call (401/403: the provider refuses our
//! credentials). No payment fails because of it: calls wait, one probe call goes through after a
//! backoff, and the first answer that is not a refusal lets everyone through again.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::Notify;

use crate::shutdown::{MAX_BACKOFF, Shutdown, backoff};

#[derive(Debug, Default)]
struct State {
    /// While paused: when the next probe may go.
    until: Option<Instant>,
    /// A probe call is running; the others wait for its answer.
    probing: bool,
    /// Refusals in a row (the backoff grows with them).
    strikes: u32,
}

impl State {
    fn paused(&self) -> bool {
        self.until.is_some()
    }
}

#[derive(Debug, Default)]
pub struct Pause {
    state: Mutex<State>,
    changed: Notify,
}

/// Leave to make one gateway call. Tell the pause what came back with [`Pause::answered`]; a
/// probe dropped without an answer (its task was cancelled) lets the next waiter probe.
pub struct Permit {
    pause: Arc<Pause>,
    probe: bool,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.probe {
            self.pause.lock().probing = false;
            self.pause.changed.notify_waiters();
        }
    }
}

impl Pause {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_paused(&self) -> bool {
        self.lock().paused()
    }

    /// Waits until a call may go; `None` if shutdown came first.
    pub async fn enter(self: Arc<Self>, shutdown: &Shutdown) -> Option<Permit> {
        loop {
            // Register for a change before looking, so one between the look and the wait is not
            // missed.
            let changed = self.changed.notified();
            let wait = {
                let mut s = self.lock();
                if !s.paused() {
                    return Some(Permit {
                        pause: self.clone(),
                        probe: false,
                    });
                }
                let now = Instant::now();
                match s.until {
                    Some(until) if now < until => Some(until - now),
                    _ if s.probing => None,
                    _ => {
                        s.probing = true;
                        return Some(Permit {
                            pause: self.clone(),
                            probe: true,
                        });
                    }
                }
            };
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep(wait.unwrap_or(MAX_BACKOFF)) => {}
                _ = shutdown.wait() => return None,
            }
        }
    }

    /// Records what a call answered: `Some(reason)` if the provider refused our configuration.
    pub fn answered(&self, mut permit: Permit, refused: Option<&str>) {
        let mut s = self.lock();
        let probe = std::mem::replace(&mut permit.probe, false);
        match refused {
            // The first refusal, or a failed probe: pause (again), longer each time. Calls that
            // were already under way when the pause began change nothing.
            Some(reason) if !s.paused() || probe => {
                let wait = backoff(s.strikes, MAX_BACKOFF);
                s.strikes = s.strikes.saturating_add(1);
                log::error!(
                    "payment gateway refuses our configuration: {reason}; no payment fails \
                     because of it: gateway calls are paused, next try in {wait:?} (check \
                     gateway.url and gateway.api_key)"
                );
                s.until = Some(Instant::now() + wait);
            }
            // A refusal of a call that was under way when the pause began.
            Some(_) => {}
            // Only a probe's answer ends a pause: an answer to a call sent before it says
            // nothing about our configuration now.
            None if s.paused() && probe => {
                log::info!("payment gateway accepts our configuration again: calls resume");
                *s = State::default();
            }
            None => {}
        }
        s.probing = false;
        crate::metrics::gateway_paused(s.paused());
        drop(s);
        self.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_refusal_pauses_everyone_until_a_probe_gets_through() {
        let p = Arc::new(Pause::default());
        let sd = Shutdown::new();
        let permit = p.clone().enter(&sd).await.unwrap();
        p.answered(permit, Some("HTTP 401"));
        assert!(p.is_paused());
        // While paused, nobody may call before the backoff (1 s) is over.
        let early = tokio::time::timeout(Duration::from_millis(300), p.clone().enter(&sd)).await;
        assert!(early.is_err(), "a call went through a fresh pause");
        // After it, one probe goes; a second caller waits for the probe's answer.
        let probe = p.clone().enter(&sd).await.unwrap();
        assert!(probe.probe);
        let second = tokio::time::timeout(Duration::from_millis(300), p.clone().enter(&sd)).await;
        assert!(second.is_err(), "a second call went beside the probe");
        p.answered(probe, None);
        assert!(!p.is_paused());
        assert!(p.clone().enter(&sd).await.is_some_and(|q| !q.probe));
    }

    #[tokio::test]
    async fn a_cancelled_probe_lets_the_next_one_probe() {
        let p = Arc::new(Pause::default());
        let sd = Shutdown::new();
        let permit = p.clone().enter(&sd).await.unwrap();
        p.answered(permit, Some("HTTP 403"));
        let probe = p.clone().enter(&sd).await.unwrap();
        drop(probe);
        let next = tokio::time::timeout(Duration::from_millis(300), p.clone().enter(&sd)).await;
        assert!(next.is_ok_and(|q| q.is_some_and(|q| q.probe)));
        sd.trigger();
    }
}
