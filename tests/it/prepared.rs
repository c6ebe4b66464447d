//! The statements run per request or per message are prepared once per connection
//! (`db::prepared`), not parsed and planned by PostgreSQL on every call.

use std::time::Duration;

use async_pay::db::{outbox, payments, webhooks};
use async_pay::domain::PaymentStatus;
use diesel::QueryableByName;
use diesel::sql_types::Text;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use uuid::Uuid;

use crate::helpers::*;

#[derive(QueryableByName)]
struct Prepared {
    #[diesel(sql_type = Text)]
    statement: String,
}

/// Runs every hot statement once, as the API, the consumer, the relay and the webhook sender do.
async fn run_hot_statements(c: &mut AsyncPgConnection, round: u32) {
    let lease = Duration::from_secs(60);
    let metadata = serde_json::json!({});
    let id = Uuid::now_v7();
    let key = format!("prep-{round}");
    let new = payments::NewPayment {
        id,
        merchant: "a",
        amount: rust_decimal::Decimal::ONE,
        currency: "USD",
        description: None,
        metadata: &metadata,
        idempotency_key: &key,
        request_fingerprint: &[0; 32],
        webhook_url: None,
        request_id: Some("prep-request"),
        traceparent: None,
    };
    assert!(
        payments::insert_with_event(c, &new)
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        payments::view_for_merchant(c, id, "a")
            .await
            .unwrap()
            .is_some()
    );
    let token = Uuid::new_v4();
    assert!(
        payments::claim(c, id, token, lease)
            .await
            .unwrap()
            .is_some()
    );
    assert!(payments::claim_state(c, id).await.unwrap().is_some());
    assert!(
        payments::record_unknown(c, id, token, "HTTP 503", Duration::ZERO)
            .await
            .unwrap()
    );
    let due = payments::claim_due_checks(c, token, lease, 10)
        .await
        .unwrap();
    assert_eq!(due.len(), 1, "the unknown outcome is due at once");
    assert_eq!(due[0].prior_gateway_state.as_deref(), Some("unknown"));
    payments::pending_health(c, lease).await.unwrap();
    assert_eq!(
        payments::release_claims(c, &[(id, token)]).await.unwrap(),
        1
    );
    assert!(
        payments::claim(c, id, token, lease)
            .await
            .unwrap()
            .is_some()
    );
    let outcome = payments::Outcome {
        status: PaymentStatus::Succeeded,
        charge_id: Some("ch_1"),
        failure: None,
    };
    assert!(
        payments::finalise(c, id, token, outcome)
            .await
            .unwrap()
            .is_some()
    );
    outbox::mark_published(c, &[1]).await.unwrap();
    webhooks::claim_due(c, 10, lease, 8, &[], &[])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn hot_statements_are_prepared_once_per_connection() {
    let db = TestDb::new().await;
    let mut c = AsyncPgConnection::establish(&db.url).await.unwrap();
    for round in 0..2 {
        run_hot_statements(&mut c, round).await;
    }
    let prepared: Vec<String> = diesel::sql_query("SELECT statement FROM pg_prepared_statements")
        .load::<Prepared>(&mut c)
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.statement)
        .collect();
    for needle in [
        "WITH p AS ( INSERT INTO payments",
        "LEFT JOIN LATERAL",
        "WHERE id = $1 AND status = 'pending' AND (claimed_until",
        "WHERE next_check_at <= now()",
        "UPDATE payments SET gateway_state = 'unknown'",
        "SELECT (SELECT count(*) FROM payments",
        "SELECT status, (extract(epoch",
        "FROM unnest($1::uuid[], $2::uuid[])",
        "UPDATE payments SET status = $3",
        "UPDATE outbox SET published_at = now()",
        "WITH busy AS",
    ] {
        let n = prepared.iter().filter(|s| s.contains(needle)).count();
        assert_eq!(n, 1, "{needle:?} prepared {n} times: {prepared:#?}");
    }
}

/// A rolling deploy: a newer version migrates (adds columns) while the old processes keep their
/// connections and prepared statements. They must go on working, which a prepared `SELECT *` or
/// `RETURNING *` would not ("cached plan must not change result type").
#[tokio::test(flavor = "multi_thread")]
async fn prepared_statements_survive_a_migration_that_adds_columns() {
    let db = TestDb::new().await;
    let mut c = AsyncPgConnection::establish(&db.url).await.unwrap();
    run_hot_statements(&mut c, 0).await;
    for table in ["payments", "outbox", "webhook_deliveries"] {
        db.exec(&format!("ALTER TABLE {table} ADD COLUMN added_later text"))
            .unwrap();
    }
    run_hot_statements(&mut c, 1).await;
}

#[derive(QueryableByName)]
struct Pid {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    pid: i32,
}

/// Closes `c` and returns once its backend has exited. A backend sends the rest of its statistics
/// as it exits, before it leaves `pg_stat_activity`.
async fn close_and_wait(db: &TestDb, mut c: AsyncPgConnection) {
    let pid = diesel::sql_query("SELECT pg_backend_pid() AS pid")
        .get_result::<Pid>(&mut c)
        .await
        .unwrap()
        .pid;
    drop(c);
    eventually(Duration::from_secs(10), "the backend to exit", || async {
        let sql = format!("SELECT count(*) AS n FROM pg_stat_activity WHERE pid = {pid}");
        (db.count(&sql) == 0).then_some(())
    })
    .await;
}

/// Index entries every index scan of `tables` has read so far, as the statistics collector
/// reports them once the backends that read them have exited.
fn index_entries_read(db: &TestDb, tables: &str) -> i64 {
    db.count(&format!(
        "SELECT coalesce(sum(idx_tup_read), 0)::bigint AS n FROM pg_stat_user_indexes \
         WHERE relname IN ({tables})"
    ))
}

/// The statements that go by primary key stay on it whatever plan PostgreSQL caches for them. A
/// partial index whose predicate a statement also says (`status = 'pending'`) is a cheaper-looking
/// generic plan while the table is small: once cached, every claim read every pending payment
/// (seen in the benchmark: 70 million index entries for 10,000 payments, the pipeline 2.12x its
/// POST time instead of 1.47x). Generic plans are forced here, on tables with 500 pending payments and deliveries
/// beside the ones handled, so such a plan shows as hundreds of index entries read per
/// statement. (Forced generic plans of the periodic sweeps scan the table sequentially here;
/// sequential reads are not counted.)
#[tokio::test(flavor = "multi_thread")]
async fn statements_by_id_never_read_the_other_pending_rows() {
    let db = TestDb::new().await;
    let tables = "'payments', 'webhook_deliveries'";
    let mut fill = AsyncPgConnection::establish(&db.url).await.unwrap();
    // No statistics for the planner (autovacuum would gather some within a minute): the state in
    // which the wrong plan wins, and the one a burst on a fresh table is in.
    fill.batch_execute(
        "ALTER TABLE payments SET (autovacuum_enabled = off); \
         ALTER TABLE webhook_deliveries SET (autovacuum_enabled = off); \
         INSERT INTO payments (id, merchant, amount, currency, idempotency_key, \
                               request_fingerprint, webhook_url) \
         SELECT gen_random_uuid(), 'other', 1, 'USD', 'filler-' || i, \
                sha256(('filler-' || i)::bytea), 'http://127.0.0.1:9/hook' \
         FROM generate_series(1, 500) i; \
         INSERT INTO webhook_deliveries (id, message_id, payment_id, merchant, event_type, url, \
                                         host, payload, next_attempt_at) \
         SELECT gen_random_uuid(), 'filler-' || id, id, merchant, 'payment.succeeded', \
                webhook_url, '127.0.0.1', '{}', now() + interval '1 hour' FROM payments",
    )
    .await
    .unwrap();
    close_and_wait(&db, fill).await;
    // What filling the tables read (their foreign keys: one primary-key lookup per delivery).
    let filled = index_entries_read(&db, tables);
    let mut c = AsyncPgConnection::establish(&db.url).await.unwrap();
    diesel::sql_query("SET plan_cache_mode = force_generic_plan")
        .execute(&mut c)
        .await
        .unwrap();
    run_hot_statements(&mut c, 0).await;
    // The webhook sender's statements by id, on a delivery of that payment.
    let payment = Uuid::now_v7();
    let metadata = serde_json::json!({});
    let new = payments::NewPayment {
        id: payment,
        merchant: "a",
        amount: rust_decimal::Decimal::ONE,
        currency: "USD",
        description: None,
        metadata: &metadata,
        idempotency_key: "hooked",
        request_fingerprint: &[0; 32],
        webhook_url: None,
        request_id: None,
        traceparent: None,
    };
    payments::insert_with_event(&mut c, &new).await.unwrap();
    let delivery = Uuid::now_v7();
    let payload = serde_json::json!({"payment_id": payment});
    webhooks::insert(
        &mut c,
        &webhooks::NewDelivery {
            id: delivery,
            message_id: "hooked",
            payment_id: payment,
            merchant: "a",
            event_type: "payment.succeeded",
            url: "http://127.0.0.1:9/hook",
            host: "127.0.0.1",
            payload: &payload,
            request_id: None,
        },
    )
    .await
    .unwrap();
    for attempt in 1..=3 {
        assert!(
            webhooks::make_due_now(&mut c, delivery)
                .await
                .unwrap()
                .is_some()
        );
        let next = if attempt < 3 {
            webhooks::AfterAttempt::RetryAt(time::OffsetDateTime::now_utc())
        } else {
            webhooks::AfterAttempt::Delivered
        };
        webhooks::record_attempt(
            &mut c,
            &webhooks::Attempt {
                delivery_id: delivery,
                attempt,
                attempted_at: time::OffsetDateTime::now_utc(),
                duration_ms: 1,
                status_code: Some(500),
                error: None,
                response_body: None,
            },
            next,
        )
        .await
        .unwrap();
    }
    close_and_wait(&db, c).await;
    let read = index_entries_read(&db, tables) - filled;
    #[derive(QueryableByName, Debug)]
    #[allow(dead_code, reason = "read through Debug in the failure message")]
    struct Read {
        #[diesel(sql_type = Text)]
        scan: String,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        rows: i64,
    }
    let mut c = AsyncPgConnection::establish(&db.url).await.unwrap();
    let by_scan: Vec<Read> = diesel::sql_query(format!(
        "SELECT indexrelname::text AS scan, idx_tup_read AS rows FROM pg_stat_user_indexes \
         WHERE relname IN ({tables}) AND idx_tup_read > 0"
    ))
    .load(&mut c)
    .await
    .unwrap();
    // About one entry per statement (a few dozen statements); one scan of the pending rows
    // alone would be 500.
    assert!(
        read < 200,
        "{read} index entries read by statements that each go by primary key (by index, with \
         filling the tables: {by_scan:?})"
    );
}
