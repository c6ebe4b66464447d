//! The log of every role: env_logger (`RUST_LOG`, default `info`), one line per event, and the
//! request id of the work a task is doing on each line it writes (`[req …]`), so one grep
//! follows a request. The id is a task-local: the API sets it per request
//! ([`crate::api::request_id`]); [`scope`] sets it for any other piece of work.

tokio::task_local! {
    static REQUEST_ID: String;
}

/// The request id of the work this task is doing, if any.
pub fn current() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

/// Runs `work` with `id` as its request id (on every log line it writes).
pub async fn scope<F: Future>(id: String, work: F) -> F::Output {
    REQUEST_ID.scope(id, work).await
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
