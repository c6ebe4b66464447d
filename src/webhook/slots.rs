//! A sender's attempts in flight: how many per host (for `per_host_concurrency`) and the claims
//! its heartbeat keeps alive. A place is taken before an attempt is spawned and given back when
//! its task ends, however it ends (finished, panicked, aborted).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use time::OffsetDateTime;
use tokio::task::JoinSet;

use crate::db::webhooks::Delivery;

/// The attempts a sender has in flight: how many per host (for `per_host_concurrency`) and the
/// claims its heartbeat keeps alive (delivery id -> attempt number and the lease end last
/// written). Entries are added and removed only through [`Slot`].
#[derive(Debug, Default)]
pub(super) struct InFlight {
    pub(super) per_host: HashMap<String, usize>,
    pub(super) claims: HashMap<uuid::Uuid, (i32, OffsetDateTime)>,
}

pub(super) fn lock(state: &Mutex<InFlight>) -> MutexGuard<'_, InFlight> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// One attempt's place in [`InFlight`]: taken before the attempt is spawned, given back when the
/// attempt task ends, however it ends (finished, panicked, aborted), because the task owns it
/// and dropping it gives the place back.
pub(super) struct Slot {
    state: Arc<Mutex<InFlight>>,
    host: String,
    id: uuid::Uuid,
}

impl Slot {
    pub(super) fn take(state: &Arc<Mutex<InFlight>>, d: &Delivery) -> Slot {
        let mut st = lock(state);
        *st.per_host.entry(d.host.clone()).or_default() += 1;
        st.claims.insert(d.id, (d.attempts, d.next_attempt_at));
        Slot {
            state: state.clone(),
            host: d.host.clone(),
            id: d.id,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut st = lock(&self.state);
        if let Some(n) = st.per_host.get_mut(&self.host) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                st.per_host.remove(&self.host);
            }
        }
        st.claims.remove(&self.id);
    }
}

/// Runs `work` as a task that holds `slot` until it ends.
pub(super) fn spawn_holding(
    tasks: &mut JoinSet<()>,
    slot: Slot,
    work: impl Future<Output = ()> + Send + 'static,
) {
    tasks.spawn(async move {
        let _slot = slot;
        work.await;
    });
}

/// Logs an attempt task that did not end normally (its slot is already given back).
pub(super) fn reap(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done
        && e.is_panic()
    {
        log::error!(
            "a webhook attempt panicked; its delivery is attempted again once its claim lapses"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(host: &str) -> Delivery {
        let now = OffsetDateTime::now_utc();
        Delivery {
            id: uuid::Uuid::now_v7(),
            message_id: "msg_test".into(),
            payment_id: uuid::Uuid::now_v7(),
            merchant: "m".into(),
            event_type: "payment.succeeded".into(),
            url: format!("http://{host}/"),
            host: host.into(),
            payload: serde_json::json!({}),
            status: "pending".into(),
            attempts: 1,
            next_attempt_at: now,
            last_attempt_at: Some(now),
            last_status_code: None,
            created_at: now,
            finished_at: None,
            request_id: None,
        }
    }

    /// A JoinSet hands back a panicked task as a JoinError without its result, so the host of
    /// the attempt must not come from the task's return value: the slot gives it back.
    #[tokio::test]
    async fn a_panicking_attempt_gives_back_its_host_slot_and_its_claim() {
        let state = Arc::new(Mutex::new(InFlight::default()));
        let mut tasks = JoinSet::new();
        let (a, b) = (delivery("a.example"), delivery("a.example"));
        spawn_holding(&mut tasks, Slot::take(&state, &a), async {
            panic!("an attempt that panics");
        });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        spawn_holding(&mut tasks, Slot::take(&state, &b), async {
            let _ = rx.await;
        });
        let done = tasks.join_next().await.unwrap();
        assert!(done.unwrap_err().is_panic());
        {
            let st = lock(&state);
            assert_eq!(
                st.per_host.get("a.example"),
                Some(&1),
                "only b holds a slot"
            );
            assert!(!st.claims.contains_key(&a.id) && st.claims.contains_key(&b.id));
        }
        let _ = tx.send(());
        tasks.join_next().await.unwrap().unwrap();
        let st = lock(&state);
        assert!(st.per_host.is_empty() && st.claims.is_empty(), "{st:?}");
    }
}
