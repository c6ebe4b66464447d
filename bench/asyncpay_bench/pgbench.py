"""Step 1, the database's own ceiling, and the `costs` step: what each index and constraint on
the commit path costs. pgbench runs the exact statements of one POST and one GET."""

import re
import statistics
import time

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


def buffers_and_commits(stack):
    """This database's buffer accesses and commits so far (pg_stat_database: per database, so
    other work on the server does not count; backends publish them up to a second late)."""
    row = stack.psql.query("SELECT blks_hit + blks_read, xact_commit FROM pg_stat_database "
                           "WHERE datname = current_database()")[0]
    return int(row[0]), int(row[1])


def step_costs(ctx):
    """Each item: two fresh databases, one without it; `costs_rounds` pgbench runs on each,
    alternating. The cost is 1 - median tx/s with / median tx/s without; buffer accesses per
    transaction are given beside it (they do not depend on what else the machine does)."""
    secs, rounds = ctx.cfg["costs_secs"], ctx.cfg["costs_rounds"]
    log(f"costs: the create statement with and without each index/constraint, {rounds} x "
        f"pgbench -c {CLIENTS} -T {secs} each, alternating")
    out = []
    for i, (what, drop) in enumerate(COSTS):
        stacks = {"with": ctx.stack(f"cost{i}a"), "without": ctx.stack(f"cost{i}b")}
        stacks["without"].psql.query(drop)
        runs = {"with": [], "without": []}
        for st in stacks.values():
            ctx.pgbench(st.db, "create.sql", 1)
        for _ in range(rounds):
            for variant, st in stacks.items():
                ctx.wait_quiet(f"costs {what} {variant}")
                b0 = buffers_and_commits(st)
                res = ctx.pgbench(st.db, "create.sql", secs)
                time.sleep(1.1)
                b1 = buffers_and_commits(st)
                res["buffers_per_tx"] = round((b1[0] - b0[0]) / max(b1[1] - b0[1], 1), 1)
                runs[variant].append(res)
        for st in stacks.values():
            st.close()
        tps = {v: statistics.median(r["tps"] for r in rs) for v, rs in runs.items()}
        bufs = {v: statistics.median(r["buffers_per_tx"] for r in rs) for v, rs in runs.items()}
        cost = 1 - tps["with"] / tps["without"]
        out.append({"what": what, "with_tps": tps["with"], "without_tps": tps["without"],
                    "cost": cost, "with_buffers_per_tx": bufs["with"],
                    "without_buffers_per_tx": bufs["without"],
                    "runs": {v: [round(r["tps"]) for r in rs] for v, rs in runs.items()}})
        log(f"   {what}: {tps['with']:,.0f} tx/s with, {tps['without']:,.0f} without (medians): "
            f"costs {cost:.0%} of the commit rate; {bufs['with']} against {bufs['without']} "
            "buffer accesses per transaction")
    ctx.r["costs"] = out
