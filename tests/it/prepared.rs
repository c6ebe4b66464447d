//! The statements run per request or per message are prepared once per connection
//! (`db::prepared`), not parsed and planned by PostgreSQL on every call.

use std::time::Duration;

use async_pay::db::{outbox, payments, webhooks};
use async_pay::domain::PaymentStatus;
use diesel::QueryableByName;
use diesel::sql_types::Text;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
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
