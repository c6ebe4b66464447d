//! Stop signals: SIGTERM (docker stop, systemd) and SIGINT (Ctrl-C).

use tokio::sync::watch;

/// Resolves on the first SIGTERM or SIGINT.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => log::info!("SIGTERM received, shutting down"),
                    _ = tokio::signal::ctrl_c() => log::info!("SIGINT received, shutting down"),
                }
            }
            Err(e) => {
                log::warn!("cannot listen for SIGTERM ({e}); only Ctrl-C stops this process");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A stop switch that many tasks can wait on: `trigger` once, every `wait` returns.
#[derive(Clone)]
pub struct Shutdown {
    tx: watch::Sender<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Self {
        Shutdown {
            tx: watch::channel(false).0,
        }
    }

    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    pub fn is_triggered(&self) -> bool {
        *self.tx.borrow()
    }

    pub async fn wait(&self) {
        let mut rx = self.tx.subscribe();
        let _ = rx.wait_for(|stop| *stop).await;
    }

    /// A switch that flips on SIGTERM/SIGINT.
    pub fn on_signal() -> Self {
        let s = Shutdown::new();
        let s2 = s.clone();
        tokio::spawn(async move {
            signal().await;
            s2.trigger();
        });
        s
    }

    /// Sleeps for `d`, or less if shutdown comes first; returns true if shutting down.
    pub async fn sleep(&self, d: std::time::Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => self.is_triggered(),
            _ = self.wait() => true,
        }
    }
}

/// Longest wait between reconnect (and retry) attempts of the long-running roles: short enough
/// that an outage ends within seconds of the dependency coming back, long enough not to hammer
/// it meanwhile.
pub const MAX_BACKOFF: std::time::Duration = std::time::Duration::from_secs(10);

/// The reconnect policy of a long-running role, shared so all roles behave alike:
///
/// ```ignore
/// let mut reconnect = Reconnect::new("relay", &shutdown);
/// while !shutdown.is_triggered() {
///     match session(&mut reconnect.failures).await {
///         Ok(()) => break,
///         Err(e) if reconnect.after(&e).await => break, // shutting down
///         Err(_) => {}                                  // try again
///     }
/// }
/// ```
///
/// A session resets `failures` to 0 once it has worked again (the relay after a batch, the
/// consumers after a message), so a dependency that accepts connections but fails every
/// operation still backs off.
pub struct Reconnect<'a> {
    role: &'static str,
    shutdown: &'a Shutdown,
    /// Failed sessions since the session last worked.
    pub failures: u32,
}

impl<'a> Reconnect<'a> {
    pub fn new(role: &'static str, shutdown: &'a Shutdown) -> Self {
        Reconnect {
            role,
            shutdown,
            failures: 0,
        }
    }

    /// Logs why the session ended and waits `backoff(failures, MAX_BACKOFF)`; returns true if
    /// shutdown came meanwhile.
    pub async fn after(&mut self, e: &anyhow::Error) -> bool {
        let wait = backoff(self.failures, MAX_BACKOFF);
        self.failures += 1;
        log::error!("{}: {e:#}; reconnecting in {wait:?}", self.role);
        self.shutdown.sleep(wait).await
    }
}

/// Capped exponential backoff: 1s, 2s, 4s, … up to `cap`.
pub fn backoff(attempt: u32, cap: std::time::Duration) -> std::time::Duration {
    let secs = 1u64.checked_shl(attempt.min(20)).unwrap_or(u64::MAX);
    std::time::Duration::from_secs(secs).min(cap)
}
