"""Step 9, the outbox soak (issue 11): the whole pipeline (serve, relay, consume with zero gateway
delay) under a steady POST rate for minutes, sampling the outbox's size, dead tuples, vacuums and
the relay's claim query as it goes."""

import json
import re
import sys
import time

from .common import ZERO_DELAY, BenchError, log, python_env

# The relay's claim, as diesel sends it (src/db/outbox.rs claim_unpublished, batch 500), timed
# with EXPLAIN ANALYZE in a transaction that is rolled back (its row locks with it).
CLAIM = ("SELECT id, event_type, payload, created_at, published_at FROM outbox "
         "WHERE published_at IS NULL ORDER BY id LIMIT 500 FOR UPDATE SKIP LOCKED")
TABLE = (
    "SELECT pg_total_relation_size('outbox'), pg_relation_size('outbox'), "
    "pg_relation_size('outbox_unpublished_idx'), t.n_live_tup, t.n_dead_tup, "
    "t.autovacuum_count + t.vacuum_count, "
    "(SELECT count(*) FROM outbox WHERE published_at IS NULL), "
    "(SELECT count(*) FROM payments WHERE status = 'pending') "
    "FROM pg_stat_user_tables t WHERE t.relname = 'outbox'")
TABLE_NAMES = ("total_bytes", "heap_bytes", "unpublished_idx_bytes", "live_tuples", "dead_tuples",
               "vacuums", "unpublished", "pending_payments")
RETENTION = "1m"  # so that deleting old events is part of the steady state within minutes


def claim_time(psql, runs=5):
    """Median execution time (ms) and buffers touched of the claim query over `runs` runs."""
    out = []
    for _ in range(runs):
        text = psql.text(f"BEGIN; EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {CLAIM}; ROLLBACK")
        m = re.search(r"\[.*\]", text, re.S)
        if not m:
            raise BenchError(f"cannot read EXPLAIN's output: {text[:300]!r}")
        plan = json.loads(m.group(0))[0]
        top = plan["Plan"]
        out.append((plan["Execution Time"],
                    top.get("Shared Hit Blocks", 0) + top.get("Shared Read Blocks", 0)))
    out.sort()
    ms, buffers = out[len(out) // 2]
    return round(ms, 3), buffers


def sample(s, t0):
    row = [int(x) for x in s.psql.query(TABLE)[0]]
    ms, buffers = claim_time(s.psql)
    return dict(zip(TABLE_NAMES, row), at_s=round(time.monotonic() - t0, 1), claim_ms=ms,
                claim_buffers=buffers)


def step9_soak(ctx):
    c = ctx.cfg
    rate, secs, every = c["soak_rate"], c["soak_secs"], c["soak_every"]
    s = ctx.stack("soak")
    serve, url = s.start_serve()
    relay = s.start_relay(RELAY__RETENTION=RETENTION)
    consume = s.start_consume(**ZERO_DELAY)
    log(f"9 soak: {rate:,}/s POSTed for {secs} s through serve, relay (retention {RETENTION}) "
        f"and consume (zero gateway delay); the outbox sampled every {every} s")
    ctx.wait_quiet("9 soak")
    t0 = time.monotonic()
    samples = [sample(s, t0)]
    loadgen = ctx.helper("loadgen", [sys.executable, "-m", "asyncpay_bench.loadgen", url,
                                     "--rate", str(rate), "--secs", str(secs),
                                     "--key-prefix", f"{ctx.run_id}-soak"], python_env())
    cpu = ctx.meter([serve, relay, consume, loadgen])
    k = 1
    while loadgen.alive():
        for p in (serve, relay, consume):
            if not p.alive():
                raise BenchError(f"{p.name} exited during the soak; see {p.logfile}")
        if time.monotonic() - t0 >= k * every:
            samples.append(sample(s, t0))
            k += 1
        time.sleep(0.2)
        if time.monotonic() - t0 > secs + 120:
            raise BenchError(f"the load generator did not finish; see {loadgen.logfile}")
    used = cpu.stop()
    ctx.check_disturbed("9 soak", used)
    m = re.search(r"^LOADGEN_JSON (.*)$", loadgen.log_text(), re.M)
    if not m:
        raise BenchError(f"the load generator printed no result; see {loadgen.logfile}")
    load = json.loads(m.group(1))
    ctx.stop_helper(loadgen)
    t_end = time.monotonic()
    ctx.wait_until("the soak's payments final and published",
                   lambda: s.pending() == 0 and s.unpublished() == 0, timeout=300, every=0.2)
    drained_after = time.monotonic() - t_end
    samples.append(sample(s, t0))
    start = samples[1] if len(samples) > 2 else samples[0]
    mid = min(samples, key=lambda x: abs(x["at_s"] - secs / 2))
    end = samples[-2] if len(samples) > 2 else samples[-1]
    ok = load["statuses"].get("202", 0) == load["due"] and load["errors"] == 0
    held = ok and load["answered_per_s"] >= 0.95 * rate and drained_after <= 30
    flat = (end["total_bytes"] <= 1.25 * max(mid["total_bytes"], 1)
            and end["claim_ms"] <= 2 * start["claim_ms"] + 1.0)
    ctx.r["soak"] = {
        "rate": rate, "secs": secs, "retention": RETENTION, "load": load,
        "held": held, "flat": flat, "drained_after_s": round(drained_after, 2),
        "start": start, "mid": mid, "end": end, "after_drain": samples[-1],
        "max_dead_tuples": max(x["dead_tuples"] for x in samples),
        "samples": samples, "cpu": used,
    }
    log(f"   {load['answered_per_s']:,.0f}/s answered of {rate:,}/s due (p99 "
        f"{load['latency_ms']['p99'] or 0:.1f} ms), backlog drained {drained_after:.1f} s after; "
        f"outbox {start['total_bytes'] / 2**20:.1f} -> {end['total_bytes'] / 2**20:.1f} MiB, dead "
        f"tuples {start['dead_tuples']:,} -> {end['dead_tuples']:,}, claim {start['claim_ms']} -> "
        f"{end['claim_ms']} ms")
    s.close()
