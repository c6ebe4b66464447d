"""Step 1, the database's own ceiling, and the `costs` step: what each index and constraint on
the commit path costs. pgbench runs the exact statements of one POST and one GET."""

import re

from .common import CLIENTS, ROOT, BenchError, WaitSampler, log

# The wake-up the outbox had until migration 000006, exactly as migration 000002 created it (its
# function and trigger, read from that file): measured beside the ceiling so the table names what
# such a mechanism costs the commit path.
MIGRATION_000002 = ROOT / "migrations" / "2026-11-25-000002_pipeline" / "up.sql"
DROP_NOTIFY_TRIGGER = "DROP TRIGGER outbox_notify ON outbox; DROP FUNCTION outbox_notify()"


def notify_trigger_sql():
    sql = MIGRATION_000002.read_text()
    m = re.search(r"^CREATE FUNCTION outbox_notify\(\).*?^CREATE TRIGGER outbox_notify [^;]*;",
                  sql, re.S | re.M)
    if not m:
        raise BenchError(f"no outbox_notify function and trigger in {MIGRATION_000002}")
    return m.group(0)


GET_ROWS = 20_000


def measured(ctx, stack, script, what, extra=()):
    """One measured pgbench run of `script` (after the machine got quiet), with its CPU and the
    wait states of the database's backends."""
    ctx.wait_quiet(what)
    waits = WaitSampler(ctx.db_url("postgres"), stack.db)
    waits.start()
    cpu = ctx.meter([])
    res = ctx.pgbench(stack.db, script, ctx.cfg["pgbench_secs"], extra=extra)
    res["cpu"] = cpu.stop()
    ctx.check_disturbed(what, res["cpu"])
    res["waits"] = waits.finish()
    return res


def step1_ceiling(ctx):
    c = ctx.cfg
    log(f"1 ceiling: pgbench -M prepared -c {CLIENTS} -j 2 -T {c['pgbench_secs']}: the create "
        "statement without any wake-up mechanism, then with the old NOTIFY trigger, then the GET")
    s = ctx.stack("pgbench")
    # A short warm-up so the first seconds of the measured run are not the cold start.
    ctx.pgbench(s.db, "create.sql", 1)
    create = measured(ctx, s, "create.sql", "1 pgbench create")
    s.psql.query(notify_trigger_sql())
    notify = measured(ctx, s, "create.sql", "1 pgbench create, NOTIFY trigger")
    s.psql.query(DROP_NOTIFY_TRIGGER)
    s.psql.query(
        "INSERT INTO payments (id, merchant, amount, currency, description, metadata, "
        "idempotency_key, request_fingerprint) "
        f"SELECT lpad(to_hex(i), 32, '0')::uuid, 'demo', 100.50, 'RUB', 'Order #123', "
        "'{\"order_id\": \"123\"}', 'pgb-get-' || i, sha256(('pgb-get-' || i)::bytea) "
        f"FROM generate_series(1, {GET_ROWS}) i", timeout=120)
    s.psql.query("ANALYZE payments")
    table_rows = int(s.psql.value("SELECT count(*) FROM payments"))
    ctx.pgbench(s.db, "get.sql", 1, extra=("-D", f"rows={GET_ROWS}"))
    get = measured(ctx, s, "get.sql", "1 pgbench get", extra=("-D", f"rows={GET_ROWS}"))
    get["table_rows"] = table_rows
    ctx.r["pgbench"] = {"create": create, "create_notify_trigger": notify, "get": get}
    log(f"   create: {create['tps']:,.0f} tx/s without a wake-up mechanism, "
        f"{notify['tps']:,.0f} tx/s with the NOTIFY trigger "
        f"({notify['tps'] / create['tps'] - 1:+.0%}); get: {get['tps']:,.0f} tx/s")
    s.close()


# What the create statement's commit path carries, and SQL that removes it. The unique
# (merchant, idempotency_key) constraint is not in the list: the statement's ON CONFLICT needs it.
COSTS = [
    ("payments_merchant_created_idx (GET /payments listing)",
     "DROP INDEX payments_merchant_created_idx"),
    ("outbox_unpublished_idx (the relay's claim)", "DROP INDEX outbox_unpublished_idx"),
    ("outbox_published_at_idx (retention sweep; partial, NULL at insert)",
     "DROP INDEX outbox_published_at_idx"),
    ("payments_pkey (GET by id, webhook_deliveries FK)",
     "ALTER TABLE webhook_deliveries DROP CONSTRAINT webhook_deliveries_payment_id_fkey; "
     "ALTER TABLE payments DROP CONSTRAINT payments_pkey"),
    ("outbox_pkey (marking published by id)", "ALTER TABLE outbox DROP CONSTRAINT outbox_pkey"),
    ("every CHECK constraint of payments (11) and outbox (1)",
     "DO $$ DECLARE r record; BEGIN FOR r IN SELECT conrelid::regclass AS t, conname "
     "FROM pg_constraint WHERE contype = 'c' AND conrelid IN ('payments'::regclass, "
     "'outbox'::regclass) LOOP EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', r.t, "
     "r.conname); END LOOP; END $$"),
]


def step_costs(ctx):
    """One pgbench run with and one without each item, each on a fresh database, alternating."""
    secs = ctx.cfg["costs_secs"]
    log(f"costs: the create statement with and without each index/constraint, "
        f"pgbench -c {CLIENTS} -T {secs} each")
    out = []
    for i, (what, drop) in enumerate(COSTS):
        runs = {}
        for variant in ("with", "without"):
            s = ctx.stack(f"cost{i}{variant[:2]}")
            if variant == "without":
                s.psql.query(drop)
            ctx.pgbench(s.db, "create.sql", 1)
            ctx.wait_quiet(f"costs {what} {variant}")
            cpu = ctx.meter([])
            res = ctx.pgbench(s.db, "create.sql", secs)
            res["cpu"] = cpu.stop()
            runs[variant] = res
            s.close()
        cost = 1 - runs["with"]["tps"] / runs["without"]["tps"]
        out.append({"what": what, "with_tps": runs["with"]["tps"],
                    "without_tps": runs["without"]["tps"], "cost": cost,
                    "cpu_with": runs["with"]["cpu"], "cpu_without": runs["without"]["cpu"]})
        log(f"   {what}: {runs['with']['tps']:,.0f} tx/s with, {runs['without']['tps']:,.0f} "
            f"without: costs {cost:.0%} of the commit rate")
    ctx.r["costs"] = out
