//! `async-pay reconcile`: one reconciliation pass, for cron or by hand. Asks the payment provider
//! about every payment whose status check is due (an unknown outcome, or a claim abandoned in the
//! middle of a gateway call), settles what it can, prints a summary and exits: 0 when the pass
//! ran, 1 when the database is unreachable or the provider refuses our configuration. `consume`
//! runs the same sweep continuously; both can run at once (claims keep them apart).

use anyhow::Context;

use crate::config::Settings;
use crate::db;
use crate::gateway;
use crate::processing::Processor;
use crate::processing::reconcile::stuck_message;
use crate::shutdown::Shutdown;

pub async fn run(settings: &Settings, shutdown: Shutdown) -> anyhow::Result<String> {
    let pool = db::pool(&settings.database)?;
    let gateway = gateway::from_settings(&settings.gateway)?;
    let processor = Processor::new(settings, pool, gateway, shutdown);
    let summary = processor
        .reconcile_due()
        .await
        .context("reconciliation failed")?;
    processor.wait_for_calls().await;
    let mut report = summary.to_string();
    let health = processor
        .pending_health(settings.gateway.stuck_after)
        .await
        .context("cannot count pending payments")?;
    report.push_str(&format!(
        "\n{} payment(s) still await the provider's answer",
        health.unknown
    ));
    if health.stuck > 0 {
        report.push('\n');
        report.push_str(&stuck_message(&health, settings.gateway.stuck_after));
    }
    if summary.refused {
        anyhow::bail!("{report}");
    }
    Ok(report)
}
