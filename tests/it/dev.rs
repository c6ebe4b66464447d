//! `async-pay dev`: the quick start's whole pipeline in one process.

use std::time::Duration;

use crate::stack::Stack;

#[tokio::test(flavor = "multi_thread")]
async fn dev_runs_the_whole_pipeline_in_one_process_and_stops_on_ctrl_c() {
    let mut s = Stack::new(&[
        ("ASYNC_PAY__GATEWAY__MIN_DELAY", "10ms"),
        ("ASYNC_PAY__GATEWAY__MAX_DELAY", "50ms"),
    ])
    .await;
    let dev = s.start("dev");
    s.wait_healthy().await;
    let (accepted, _) = tokio::task::block_in_place(|| s.pay_many("dev", 20, 2));
    assert_eq!(accepted.len(), 20);
    // Final, published, and every webhook delivered: serve, relay, consume and dlq-watch ran.
    s.assert_nothing_lost(&accepted, 0, Duration::from_secs(30))
        .await;
    let status = s.proc(dev).interrupt(Duration::from_secs(20));
    assert!(
        status.is_some_and(|st| st.success()),
        "Ctrl-C stops it cleanly: {status:?}"
    );
    let logs = s.all_logs();
    for line in [
        "the API on http://",
        "consuming",
        "async-pay dev stopped",
        "consumer stopped",
    ] {
        assert!(logs.contains(line), "{line:?} missing from the log");
    }
}
