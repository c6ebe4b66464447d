//! The pipeline on a 3-node RabbitMQ cluster of the test's own (tests/it/rabbit_cluster.rs),
//! with nodes killed and hung while payments are posted. It takes about two minutes and runs
//! alone (.config/nextest.toml: it takes every test slot), so its timings are not disturbed by
//! other tests and the others by its three Erlang nodes; `just test-cluster` runs only it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::helpers::eventually;
use crate::rabbit_cluster::{Cluster, NET_TICKTIME_SECS};
use crate::stack::Stack;

/// The whole scenario fails (and stops every node and process) if it takes longer than this;
/// nextest's own limit for this test (.config/nextest.toml) is longer, so the guards always run.
const SCENARIO_LIMIT: Duration = Duration::from_secs(420);
/// A payment posted every 50 ms: a steady 20/s.
const PAY_EVERY: Duration = Duration::from_millis(50);
/// How long a node stays hung (SIGSTOP), longer than the net tick timeout so the cluster gives
/// up on it.
const HUNG_FOR: Duration = Duration::from_secs(20);
/// How long a node that was killed or hung may take to be back in the cluster with its queue
/// replicas online: a restart takes about 5 s here, but autoheal sometimes waits out its own 60 s
/// retry before it restarts a node that was hung.
const WHOLE_AGAIN: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread")]
async fn killed_and_hung_nodes_under_load_lose_nothing() {
    // Out here, the scenario outlives the select: a deadline or a signal panics while it is
    // still alive, so its guards stop the nodes and processes on the way out, and keep the logs.
    let scenario = scenario();
    tokio::pin!(scenario);
    tokio::select! {
        () = &mut scenario => {}
        () = tokio::time::sleep(SCENARIO_LIMIT) => {
            panic!("the scenario took longer than {SCENARIO_LIMIT:?}")
        }
        // nextest's timeout (SIGTERM) or Ctrl-C.
        signal = terminated() => panic!("stopped by {signal}"),
    }
}

async fn terminated() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).unwrap();
    let mut int = signal(SignalKind::interrupt()).unwrap();
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// A fault and when it began, by the database's clock (milliseconds since the epoch).
struct Fault {
    what: String,
    at_ms: i64,
}

async fn scenario() {
    // Blocking calls run on this thread (block_in_place, not spawn_blocking): see
    // rabbit_cluster.rs on why the nodes must be started from the test's own thread.
    let mut cluster = tokio::task::block_in_place(|| Cluster::start(3));
    let mut s = Stack::on_brokers(&cluster.urls(), &[]).await;
    let confirm_timeout = s
        .env
        .iter()
        .find(|(k, _)| k == "ASYNC_PAY__AMQP__CONFIRM_TIMEOUT")
        .and_then(|(_, v)| humantime::parse_duration(v).ok())
        .unwrap();
    assert!(
        confirm_timeout < Duration::from_secs(NET_TICKTIME_SECS),
        "the relay must give up on a batch before the cluster gives up on a hung node"
    );
    let queue = s.broker.settings.queue.clone();
    let dead = s.broker.settings.dead_letter_queue.clone();
    for role in ["serve", "relay", "relay", "consume", "consume", "dlq-watch"] {
        s.start(role);
    }
    s.wait_healthy().await;
    eventually(
        Duration::from_secs(60),
        "both queues on all three nodes",
        || async {
            let everywhere = |q: &str| {
                cluster.replicas(q).is_some_and(|(mut members, _)| {
                    members.sort();
                    members == [0, 1, 2]
                })
            };
            (everywhere(&queue) && everywhere(&dead)).then_some(())
        },
    )
    .await;
    eventually(
        Duration::from_secs(60),
        "two relays and two consumers connected",
        || async {
            let count = |role: &str| -> usize {
                cluster
                    .connections(&format!("async-pay {role} pid"))
                    .map(|n| n.iter().sum())
                    .unwrap_or(0)
            };
            (count("relay") == 2 && count("consume") == 2).then_some(())
        },
    )
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let poster = s.pay_steadily("cluster", PAY_EVERY, stop.clone());
    let started = now_ms(&s);
    wait_for_progress(&s, started, "payments to flow").await;
    let mut faults = Vec::new();

    let queues = [queue.as_str(), dead.as_str()];

    // 1. The leader of payments.new dies.
    let leader = cluster.leader(&queue).expect("payments.new has a leader");
    faults
        .push(sigkill_and_restart(&mut cluster, &s, &queues, leader, "leader of the queue").await);

    // 2. The node most consumers are connected to dies.
    let per_node = cluster
        .connections("async-pay consume pid")
        .expect("connections listed");
    let busiest = (0..per_node.len())
        .max_by_key(|i| per_node[*i])
        .unwrap_or(0);
    let why = format!("{} of 2 consumers on it", per_node[busiest]);
    faults.push(sigkill_and_restart(&mut cluster, &s, &queues, busiest, &why).await);

    // 3. The leader hangs (SIGSTOP: sockets open, no answer) for longer than the net tick timeout.
    let leader = cluster.leader(&queue).expect("payments.new has a leader");
    faults.push(Fault {
        what: format!(
            "SIGSTOP node {} (leader of the queue) for {HUNG_FOR:?}",
            leader + 1
        ),
        at_ms: now_ms(&s),
    });
    cluster.set_running(leader, false);
    // The length of the fault, not a wait for something.
    tokio::time::sleep(HUNG_FOR).await;
    cluster.set_running(leader, true);
    wait_for_progress(&s, faults[2].at_ms, "payments posted while it was hung").await;
    cluster.wait_whole(&queues, WHOLE_AGAIN).await;

    stop.store(true, Ordering::SeqCst);
    let ended_ms = now_ms(&s);
    let (accepted, statuses) = tokio::task::block_in_place(|| poster.join().unwrap());
    assert!(
        statuses.iter().all(|c| *c == 202),
        "the API answers 202 whatever the broker does"
    );
    s.assert_nothing_lost(&accepted, 0, Duration::from_secs(120))
        .await;
    eventually(Duration::from_secs(30), "both queues empty", || async {
        (cluster.depth(&queue) == Some(0) && cluster.depth(&dead) == Some(0)).then_some(())
    })
    .await;

    println!(
        "cluster: {} payments posted over {:.0} s, every one final once, webhook delivered, no dead letter",
        accepted.len(),
        (ended_ms - started) as f64 / 1000.0
    );
    for (i, fault) in faults.iter().enumerate() {
        let until = faults.get(i + 1).map_or(ended_ms, |f| f.at_ms);
        println!(
            "cluster: {} at +{:.1} s: publishing stalled {:.1} s, consuming {:.1} s \
             (longest stretch without an event published / a payment finalised)",
            fault.what,
            (fault.at_ms - started) as f64 / 1000.0,
            longest_gap(&s, "outbox", "published_at", fault.at_ms, until) as f64 / 1000.0,
            longest_gap(&s, "payments", "processed_at", fault.at_ms, until) as f64 / 1000.0,
        );
    }
}

/// SIGKILLs node `i`, waits until a payment posted after that is final, restarts the node and
/// waits until the cluster is whole again.
async fn sigkill_and_restart(
    cluster: &mut Cluster,
    s: &Stack,
    queues: &[&str],
    i: usize,
    why: &str,
) -> Fault {
    let fault = Fault {
        what: format!("SIGKILL node {} ({why})", i + 1),
        at_ms: now_ms(s),
    };
    cluster.kill9(i);
    wait_for_progress(
        s,
        fault.at_ms,
        &format!("payments posted after {}", fault.what),
    )
    .await;
    tokio::task::block_in_place(|| cluster.restart(i));
    cluster.wait_whole(queues, WHOLE_AGAIN).await;
    fault
}

/// The database's clock, in milliseconds since the epoch.
fn now_ms(s: &Stack) -> i64 {
    s.db.count("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS n")
}

/// Waits until a payment created after `since_ms` is final: events are published and consumed.
async fn wait_for_progress(s: &Stack, since_ms: i64, what: &str) {
    let sql = format!(
        "SELECT count(*) AS n FROM payments \
         WHERE created_at > to_timestamp({since_ms} / 1000.0) AND processed_at IS NOT NULL"
    );
    eventually(Duration::from_secs(120), what, || async {
        (s.db.count(&sql) > 0).then_some(())
    })
    .await;
}

/// The longest time, in ms, between two consecutive `column` timestamps of `table` from just
/// before `from_ms` until `until_ms`: how long nothing happened.
fn longest_gap(s: &Stack, table: &str, column: &str, from_ms: i64, until_ms: i64) -> i64 {
    s.db.count(&format!(
        "SELECT coalesce(max(gap), 0)::bigint AS n FROM (
           SELECT extract(epoch FROM {column} - lag({column}) OVER (ORDER BY {column})) * 1000 AS gap
           FROM {table}
           WHERE {column} >= to_timestamp({from_ms} / 1000.0) - interval '2 seconds'
             AND {column} < to_timestamp({until_ms} / 1000.0)) x"
    ))
}
