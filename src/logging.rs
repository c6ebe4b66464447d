//! The log of every role: env_logger (`RUST_LOG`, default `info`), one line per event, and the
//! request id of the work a task is doing on each line it writes (`[req …]`), so one grep
//! follows a request. The id is a task-local: the API sets it per request
//! ([`crate::api::request_id`]); [`scope`] sets it for any other piece of work (a message, a
//! payment the sweep checks, a webhook delivery: the id of the POST that created the payment),
//! [`with_id`] for a few synchronous lines. A task-local does not pass to a spawned task: spawn
//! [`inherit`]`(work)` to keep it.

tokio::task_local! {
    static REQUEST_ID: String;
}

/// The request id of the work this task is doing, if any.
pub fn current() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

/// Runs `work` with `id` as its request id (on every log line it writes); with `None`, as it is.
pub async fn scope<F: Future>(id: impl Into<Option<String>>, work: F) -> F::Output {
    match id.into() {
        Some(id) => REQUEST_ID.scope(id, work).await,
        None => work.await,
    }
}

/// `work` with the request id of the calling task, to be spawned as a task of its own.
pub fn inherit<F: Future>(work: F) -> impl Future<Output = F::Output> {
    scope(current(), work)
}

/// Runs `f` (which writes log lines) with `id` as its request id; with `None`, as it is.
pub fn with_id<R>(id: Option<&str>, f: impl FnOnce() -> R) -> R {
    match id {
        Some(id) => REQUEST_ID.sync_scope(id.to_string(), f),
        None => f(),
    }
}

/// Sets up the log for the process: `[time LEVEL target] [req id] message`.
pub fn init() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(format)
        .init();
}

fn format(buf: &mut env_logger::fmt::Formatter, record: &log::Record<'_>) -> std::io::Result<()> {
    use std::io::Write;
    let ts = buf.timestamp_micros();
    match current() {
        Some(id) => writeln!(
            buf,
            "[{ts} {:<5} {}] [req {id}] {}",
            record.level(),
            record.target(),
            record.args()
        ),
        None => writeln!(
            buf,
            "[{ts} {:<5} {}] {}",
            record.level(),
            record.target(),
            record.args()
        ),
    }
}
