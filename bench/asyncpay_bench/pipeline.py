"""Step 4b (payments through the whole pipeline at full speed) and step 7 (one against two of a
role on this machine: consumers on a queued backlog, relays on an outbox backlog; issue 12)."""

import time

from .common import CLIENTS, ZERO_DELAY, log

DB_STATS = (
    "SELECT d.xact_commit, d.xact_rollback, d.blks_hit + d.blks_read, d.tup_returned, "
    "d.tup_fetched, i.idx_scan, i.idx_tup_read, t.n_dead_tup, "
    "t.autovacuum_count + t.vacuum_count "
    "FROM pg_stat_database d, pg_stat_user_indexes i, pg_stat_user_tables t "
    "WHERE d.datname = current_database() AND i.indexrelname = 'outbox_unpublished_idx' "
    "AND t.relname = 'outbox'")
DB_STAT_NAMES = ("commits", "rollbacks", "buffer_accesses", "tuples_returned", "tuples_fetched",
                 "unpublished_idx_scans", "unpublished_idx_entries_read", "outbox_dead_tuples",
                 "outbox_vacuums")


def db_stats(stack):
    return time.monotonic(), [int(x) for x in stack.psql.query(DB_STATS)[0]]


def db_stats_delta(stack, before):
    """What the database did since `before` (PostgreSQL's cumulative statistics, which backends
    publish up to a second late), per second, plus index entries read per scan of the relay's
    index."""
    t0, v0 = before
    time.sleep(1.1)  # let the backends flush their statistics
    t1, v1 = db_stats(stack)
    secs = max(t1 - t0 - 1.1, 1e-9)
    out = {f"{n}_per_s": round((b - a) / secs, 1) for n, a, b in zip(DB_STAT_NAMES, v0, v1)
           if not n.startswith("outbox_")}
    scans = v1[5] - v0[5]
    out["unpublished_idx_entries_per_scan"] = round((v1[6] - v0[6]) / scans, 1) if scans else None
    out["outbox_dead_tuples_at_end"] = v1[7]
    out["outbox_vacuums_during"] = v1[8] - v0[8]
    return out


def step4b_pipeline(ctx, stack):
    """`pipeline_n` payments through serve + relay + one consume with zero gateway delay."""
    n = ctx.cfg["pipeline_n"]
    relay = next((p for p in stack.procs if p.name == "relay"), None) or stack.start_relay()
    serve, url = stack.start_serve()
    log(f"4b pipeline: POST {n:,} payments (wrk -c{CLIENTS}), relay + consume, zero gateway delay")
    if int(stack.psql.value("SELECT count(*) FROM payments")):
        raise ValueError("step 4b needs a database without payments")
    consume = stack.start_consume(**ZERO_DELAY)
    ctx.wait_quiet("4b pipeline")
    cpu = ctx.meter([serve, relay, consume])
    stats0 = db_stats(stack)
    post = ctx.wrk_quota(url, n, f"{ctx.run_id}-pipe", timeout=600)
    ctx.wait_until("every payment final", lambda: stack.pending() == 0,
                   timeout=max(120, n / 50), every=0.1)
    pipe_cpu = cpu.stop()
    ctx.check_disturbed("4b pipeline", pipe_cpu)
    pipe_db = db_stats_delta(stack, stats0)
    row = stack.psql.query(
        "SELECT count(*), extract(epoch FROM min(created_at)), extract(epoch FROM max(created_at)), "
        "extract(epoch FROM max(processed_at)) FROM payments")[0]
    count, c0, c1, p1 = int(row[0]), float(row[1]), float(row[2]), float(row[3])
    post_s = c1 - c0
    final_s = p1 - c0
    ctx.r["pipeline"] = {
        "payments": count, "posted_by_wrk": post["answered"], "non_expected": post["non_expected"],
        "post_s": round(post_s, 3), "all_final_s": round(final_s, 3),
        "ratio": final_s / post_s if post_s > 0 else None,
        "post_rps": post["answered"] / (post["duration_us"] / 1e6),
        "post_p99_ms": post["latency_us"]["p99"] / 1000,
        "cpu": pipe_cpu,
        "db": pipe_db,
    }
    log(f"   POSTed {count:,} in {post_s:.2f} s; all final {final_s:.2f} s after the first "
        f"(x{final_s / post_s:.2f})")
    stack.stop(consume)


def step7_scale(ctx):
    """How throughput grows from one to two processes of a role on this machine."""
    n = ctx.cfg["scale_n"]
    backlog = ctx.cfg["relay_backlog"]
    s = ctx.stack("scale")
    _, url = s.start_serve()
    relay = s.start_relay()
    out = {"consume": {}, "relay": {}}
    for k in (1, 2):
        log(f"7 scale: {n:,} payments queued, then {k} consume process(es), zero gateway delay")
        ctx.wrk_quota(url, n, f"{ctx.run_id}-scale{k}", timeout=600)
        s.settle_posts()
        pending = s.pending()
        ctx.wait_until("the payments published", lambda: s.unpublished() == 0, timeout=120)
        ctx.wait_until("the payments in the queue", lambda: s.queue_depth() >= pending,
                       timeout=60, every=0.2)
        ctx.wait_quiet(f"7 scale, {k} consume")
        t0 = time.time()
        procs = [s.spawn(f"consume{k}-{i}", "consume", **ZERO_DELAY) for i in range(k)]
        cpu = ctx.meter(procs)
        ctx.wait_until(f"every payment final with {k} consume", lambda: s.pending() == 0,
                       timeout=max(120, n / 20), every=0.1)
        used = cpu.stop(loadgen=False)
        ctx.check_disturbed(f"7 scale, {k} consume", used)
        row = s.psql.query(
            "SELECT count(*), extract(epoch FROM min(processed_at)), "
            f"extract(epoch FROM max(processed_at)) FROM payments WHERE processed_at >= to_timestamp({t0})")[0]
        done, first, last = int(row[0]), float(row[1]), float(row[2])
        out["consume"][str(k)] = {
            "payments": done, "per_s": (done - 1) / (last - first) if last > first else None,
            "from_start_s": round(last - t0, 3), "cpu": used}
        log(f"   {k} consume: {done:,} final at {out['consume'][str(k)]['per_s'] or 0:,.0f}/s")
        for p in procs:
            s.stop(p)
    s.stop(relay)
    for k in (1, 2):
        log(f"7 scale: a backlog of {backlog:,} outbox events, {k} relay process(es)")
        first = int(s.psql.value("SELECT coalesce(max(id), 0) FROM outbox")) + 1
        last = s.insert_backlog(backlog)
        ctx.wait_quiet(f"7 scale, {k} relay")
        procs = [s.spawn(f"relay{k}-{i}", "relay") for i in range(k)]
        cpu = ctx.meter(procs)
        ctx.wait_until(f"the backlog published by {k} relay(s)", lambda: s.unpublished() == 0,
                       timeout=max(60, backlog / 200), every=0.05)
        used = cpu.stop(loadgen=False)
        ctx.check_disturbed(f"7 scale, {k} relay", used)
        rate = s.publish_rate(first, last)
        rate["cpu"] = used
        out["relay"][str(k)] = rate
        log(f"   {k} relay: {rate['events_per_s'] or 0:,.0f} events/s")
        for p in procs:
            s.stop(p)
        ctx.wait_until("the backlog in the queue", lambda: s.queue_depth() >= backlog,
                       timeout=30, every=0.2)
        s.purge()
    ctx.r["scale"] = out
    s.close()
