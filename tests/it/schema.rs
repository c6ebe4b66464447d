//! The database refuses on its own what the API refuses, and `async-pay migrate` works.

use crate::helpers::*;

const GOOD: [(&str, &str); 9] = [
    ("id", "gen_random_uuid()"),
    ("merchant", "'m'"),
    ("amount", "1.00"),
    ("currency", "'RUB'"),
    ("description", "NULL"),
    ("metadata", "'{}'"),
    ("idempotency_key", "'k'"),
    ("request_fingerprint", "decode(repeat('00', 32), 'hex')"),
    ("webhook_url", "NULL"),
];

fn insert_with(
    db: &TestDb,
    column: &str,
    value: &str,
    extra: &str,
) -> Result<(), diesel::result::Error> {
    let cols: Vec<&str> = GOOD.iter().map(|(c, _)| *c).collect();
    let vals: Vec<&str> = GOOD
        .iter()
        .map(|(c, v)| if *c == column { value } else { *v })
        .collect();
    let (extra_cols, extra_vals) = extra.split_once('|').unwrap_or(("", ""));
    db.exec(&format!(
        "INSERT INTO payments ({}{extra_cols}) VALUES ({}{extra_vals})",
        cols.join(", "),
        vals.join(", ")
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_database_refuses_rows_the_api_refuses() {
    let db = TestDb::new().await;
    insert_with(&db, "id", "gen_random_uuid()", "").unwrap();
    let refused = [
        ("amount", "0"),
        ("amount", "-1"),
        ("amount", "12345678901234567"),
        ("currency", "'GBP'"),
        ("description", "repeat('d', 1001)"),
        ("metadata", "'[1]'"),
        ("metadata", "jsonb_build_object('k', repeat('x', 16400))"),
        ("idempotency_key", "''"),
        ("idempotency_key", "repeat('k', 256)"),
        ("request_fingerprint", "'\\x00'"),
        ("webhook_url", "'ftp://example.com/'"),
        ("webhook_url", "'https://example.com/' || repeat('a', 2048)"),
        ("merchant", "''"),
    ];
    for (i, (col, val)) in refused.into_iter().enumerate() {
        // A fresh idempotency key each time, so only the rule under test can refuse the row.
        let key = format!("'k{i}'");
        let r = if col == "idempotency_key" {
            insert_with(&db, col, val, "")
        } else {
            let cols: Vec<&str> = GOOD.iter().map(|(c, _)| *c).collect();
            let vals: Vec<String> = GOOD
                .iter()
                .map(|(c, v)| {
                    if *c == col {
                        val.to_string()
                    } else if *c == "idempotency_key" {
                        key.clone()
                    } else {
                        v.to_string()
                    }
                })
                .collect();
            db.exec(&format!(
                "INSERT INTO payments ({}) VALUES ({})",
                cols.join(", "),
                vals.join(", ")
            ))
        };
        assert!(r.is_err(), "{col} = {val} must be refused");
    }
    // Statuses and processed_at agree.
    assert!(insert_with(&db, "idempotency_key", "'s1'", ", status|, 'weird'").is_err());
    assert!(
        insert_with(&db, "idempotency_key", "'s2'", ", status|, 'succeeded'").is_err(),
        "final without processed_at"
    );
    assert!(
        insert_with(&db, "idempotency_key", "'s3'", ", processed_at|, now()").is_err(),
        "pending with processed_at"
    );
    assert!(
        insert_with(
            &db,
            "idempotency_key",
            "'s4'",
            ", status, processed_at|, 'failed', now()"
        )
        .is_ok()
    );
    // One key per merchant.
    assert!(insert_with(&db, "idempotency_key", "'k'", "").is_err());
}

/// A transaction that has called `pg_notify` takes an instance-wide lock at commit: nothing a
/// POST commits may do so (the relay polls instead). No trigger on the tables a POST writes, and
/// no function of ours that notifies.
#[tokio::test(flavor = "multi_thread")]
async fn nothing_on_the_post_path_notifies() {
    let db = TestDb::new().await;
    assert_eq!(
        db.count(
            "SELECT count(*) AS n FROM pg_trigger \
             WHERE tgrelid IN ('payments'::regclass, 'outbox'::regclass) AND NOT tgisinternal"
        ),
        0,
        "no trigger on payments or outbox"
    );
    assert_eq!(
        db.count(
            "SELECT count(*) AS n FROM pg_proc p JOIN pg_namespace s ON s.oid = p.pronamespace \
             WHERE s.nspname = 'public' AND p.prosrc ILIKE '%notify%'"
        ),
        0,
        "no function that notifies"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_command_creates_and_migrates_a_database_once() {
    let name = format!("ap_test_{}", uuid::Uuid::new_v4().simple());
    let url = url_for(&name);
    let guard = TestDb {
        name: name.clone(),
        url: url.clone(),
    }; // drops it at the end
    let run = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_async-pay"))
            .arg("migrate")
            .env("DATABASE_URL", &url)
            .env_remove("ASYNC_PAY_CONFIG")
            .output()
            .unwrap()
    };
    let first = run();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let out = String::from_utf8_lossy(&first.stdout).to_string();
    assert!(out.starts_with("applied "), "{out}");
    assert!(!out.starts_with("applied 0"), "{out}");
    let second = run();
    assert!(second.status.success());
    assert!(String::from_utf8_lossy(&second.stdout).starts_with("applied 0 migration"));
    assert_eq!(guard.count("SELECT count(*) AS n FROM payments"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_config_key_stops_the_binary_with_its_name() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_async-pay"))
        .arg("migrate")
        .env("ASYNC_PAY__DATABASE__POOL_SIZ", "3")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("database.pool_siz"), "{err}");
}
