//! One module per role of the `async-pay` binary. Each has `run(settings) -> anyhow::Result<()>`.

pub mod serve;
