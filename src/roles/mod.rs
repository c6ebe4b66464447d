//! One module per role of the `async-pay` binary. Each has a `run` that returns when the role
//! stops (SIGTERM/SIGINT for the long-running ones).

pub mod consume;
pub mod dlq;
pub mod dlq_watch;
pub mod healthcheck;
pub mod reconcile;
pub mod relay;
pub mod serve;
