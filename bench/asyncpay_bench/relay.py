"""Step 4a (the relay's capacity on a backlog, and what an idle relay costs) and 4c/4d (the
commit-to-broker latency at a steady 500 and 2,000 events/s)."""

import sys
import time

from .common import CLIENTS, PACKAGE, log, pct, python_env

LATENCY_RATES = (500, 2000)  # events/s (issue 6: 500; issue 11: 2,000 beside it)
LATENCY_TARGET_MS = {500: 20, 2000: 50}  # p99 targets (issue 11)


def commits(stack):
    return int(stack.psql.value(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"))


def step4a_relay(ctx, stack):
    """An idle relay first (its looks per second and CPU), then a backlog committed at once."""
    n = ctx.cfg["relay_backlog"]
    secs = ctx.cfg["idle_secs"]
    log(f"4a relay: idle for {secs} s, then a backlog of {n:,} outbox events")
    relay = stack.start_relay()
    time.sleep(1.0)  # the relay's backoff reaches its idle pace within ~0.1 s
    ctx.wait_quiet("4a idle relay")
    c0, t0 = commits(stack), time.monotonic()
    cpu = ctx.meter([relay])
    time.sleep(secs)
    idle_cpu = cpu.stop(loadgen=False)
    time.sleep(1.1)  # backends publish their statistics up to a second late
    looks = (commits(stack) - c0 - 2) / (time.monotonic() - t0 - 1.1)  # minus our own 2 queries
    ctx.r["relay_idle"] = {"looks_per_s": round(looks, 1), "relay_cores": idle_cpu["relay_cores"],
                           "postgres_cores": idle_cpu["bench_db_backends_cores"], "cpu": idle_cpu}
    log(f"   idle: {looks:.1f} looks/s, relay {idle_cpu['relay_cores']:.3f} cores, its PostgreSQL "
        f"backends {idle_cpu['bench_db_backends_cores']:.3f} cores")

    first = int(stack.psql.value("SELECT coalesce(max(id), 0) FROM outbox")) + 1
    ctx.wait_quiet("4a relay capacity")
    cpu = ctx.meter([relay])
    t_commit = time.time()
    last = stack.insert_backlog(n)
    ctx.wait_until("the backlog published", lambda: stack.unpublished() == 0,
                   timeout=max(60, n / 200), every=0.05)
    t_done = time.time()
    relay_cpu = cpu.stop(loadgen=False)
    ctx.check_disturbed("4a relay capacity", relay_cpu)
    rate = stack.publish_rate(first, last)
    rate["wall_s_from_commit"] = round(t_done - t_commit, 3)
    rate["cpu"] = relay_cpu
    ctx.r["relay"] = rate
    log(f"   {rate['events_per_s'] or 0:,.0f} events/s over {rate['batches']} batches "
        f"({t_done - t_commit:.2f} s from the backlog's commit to the last row published)")
    depth = ctx.wait_until("the backlog in the queue",
                           lambda: (d if (d := stack.queue_depth()) >= n else None),
                           timeout=30, every=0.2)
    stack.purge()
    ctx.r["relay"]["queue_depth_after"] = depth


def step4c_latency(ctx):
    """Commit-to-broker latency at each of LATENCY_RATES, relay running, no consumer."""
    s = ctx.stack("lat")
    relay = s.start_relay()
    for rate in LATENCY_RATES:
        latency(ctx, s, relay, rate)
        s.purge()
    s.close()


def latency(ctx, s, relay, rate):
    secs = ctx.cfg["latency_secs"]
    # No consumer during this step: the whole pipeline at these rates is more than this machine's
    # two cores do (step 4b's end-to-end rate), so with it the figure would measure that overload
    # instead of the relay.
    log(f"4c commit-to-broker latency: pgbench -R {rate} for {secs} s, a probe queue bound to "
        "the exchange, no consumer")
    ctx.wait_quiet(f"4c commit-to-broker latency {rate}/s")
    before = int(s.psql.value("SELECT coalesce(max(id), 0) FROM outbox"))
    out = ctx.workdir / f"probe-{rate}.tsv"
    probe = ctx.helper(f"probe-{rate}", [sys.executable, str(PACKAGE / "amqp_tools.py"), "probe",
                                         ctx.amqp_url, s.amqp["EXCHANGE"], s.amqp["ROUTING_KEY"],
                                         s.probe_queue, str(out), str(secs + 120)], python_env())
    probe.wait_for_log(r"^ready", 30)
    cpu = ctx.meter([relay, probe])
    # 32 clients so a slow commit never holds up the schedule (pgbench -R sends each
    # transaction at its scheduled time only when a client is free).
    ctx.latency_runs = getattr(ctx, "latency_runs", 0) + 1  # a log of its own for each run
    log_prefix = ctx.workdir / f"pgbench-latency-{rate}-{ctx.latency_runs}"
    lat_pgb = ctx.pgbench(s.db, "create_timed.sql", secs, clients=CLIENTS, threads=1,
                          extra=("-R", str(rate), "-D", "n=0", "-D", f"rate={rate}", "-l",
                                 f"--log-prefix={log_prefix}"))
    ctx.wait_until("the latency events published", lambda: s.unpublished() == 0,
                   timeout=60, every=0.05)
    lat_cpu = cpu.stop()
    ctx.check_disturbed(f"4c commit-to-broker latency {rate}/s", lat_cpu)
    # When each transaction's COMMIT was answered, from pgbench's per-transaction log
    # ("client transaction_no latency_us script epoch_s epoch_us [lag]").
    committed = {}
    for f in ctx.workdir.glob(f"{log_prefix.name}.*"):
        for line in f.read_text().splitlines():
            c, n, _, _, sec, usec = line.split()[:6]
            committed[f"lat-{rate}-{c}-{n}"] = int(sec) + int(usec) / 1e6
    rows = s.psql.query(
        "SELECT o.id, extract(epoch FROM o.created_at), p.idempotency_key FROM outbox o "
        "JOIN payments p ON p.id = (o.payload->>'payment_id')::uuid "
        f"WHERE o.id > {before}")
    created = {int(i): float(t) for i, t, _ in rows}
    commit_of = {int(i): committed.get(k) for i, _, k in rows}
    time.sleep(1.0)  # the probe's last deliveries
    ctx.stop_helper(probe)
    seen = {}
    for line in out.read_text().splitlines():
        mid, t = line.split("\t")
        if mid.isdigit() and int(mid) in created:
            seen.setdefault(int(mid), float(t))  # first arrival counts
    lat_ms = [(seen[i] - commit_of[i]) * 1000 for i in seen if commit_of[i] is not None]
    with open(ctx.workdir / f"latency-{rate}.tsv", "w") as f:  # id, commit, arrival
        for i in sorted(seen):
            f.write(f"{i}\t{commit_of[i] or ''}\t{seen[i]:.6f}\n")
    from_start_ms = [(seen[i] - created[i]) * 1000 for i in seen]
    # The steady part: pgbench's first and last second are not (32 connections opening and
    # closing, and its per-transaction log times are off there: some events "arrive" before
    # their logged commit). The whole run's figures are kept beside them.
    times = [commit_of[i] for i in seen if commit_of[i] is not None]
    lo, hi = (min(times) + 1.0, max(times) - 1.0) if times else (0, 0)
    steady_ms = [(seen[i] - commit_of[i]) * 1000 for i in seen
                 if commit_of[i] is not None and lo <= commit_of[i] <= hi]
    if len(lat_ms) < len(seen):
        ctx.notes.append(f"commit-to-broker {rate}/s: {len(seen) - len(lat_ms)} events had no "
                         "commit time in pgbench's log")
    if len(seen) < len(created):
        ctx.notes.append(f"commit-to-broker {rate}/s: the probe missed {len(created) - len(seen)} "
                         f"of {len(created)} events")
    ctx.r.setdefault("latency", {})[str(rate)] = {
        "target_rate": rate, "events": len(created), "received": len(seen),
        "with_commit_time": len(lat_ms),
        "rate": lat_pgb["tps"], "pgbench_latency_avg_ms": lat_pgb["latency_avg_ms"],
        "steady_events": len(steady_ms),
        "p50_ms": pct(steady_ms, 50), "p90_ms": pct(steady_ms, 90),
        "p99_ms": pct(steady_ms, 99), "max_ms": max(steady_ms, default=None),
        "whole_run_ms": {"p50": pct(lat_ms, 50), "p99": pct(lat_ms, 99),
                         "min": min(lat_ms, default=None), "max": max(lat_ms, default=None)},
        "from_statement_start_ms": {"p50": pct(from_start_ms, 50), "p99": pct(from_start_ms, 99)},
        "cpu": lat_cpu,
    }
    log(f"   {len(seen):,} events at {lat_pgb['tps']:.0f}/s: steady p50 {pct(steady_ms, 50) or 0:.1f} ms, "
        f"p99 {pct(steady_ms, 99) or 0:.1f} ms, max {max(steady_ms, default=0):.1f} ms "
        f"(whole run p99 {pct(lat_ms, 99) or 0:.1f} ms)")
