"""The results: the table (what, measured, target, met or not) and the results file with the
machine, the method and every raw figure."""

import json

from .common import CLIENTS, PREFETCH
from .relay import LATENCY_TARGET_MS

CREATE_SHARE = 0.6  # create >= 60 % of the ceiling without a wake-up mechanism (issue 11)
RELAY_MIN = 10_000  # events/s (issue 11)


def status(ok):
    if ok is None:
        return "n/a"
    return "met" if ok else "MISSED"


def mib(kib):
    return kib / 1024


def table(r, skipped):
    rows = []
    pg = r.get("pgbench", {})
    pgc, pgn, pgg = pg.get("create"), pg.get("create_notify_trigger"), pg.get("get")
    if pgc:
        rows.append(("1", "ceiling: pgbench, payment + outbox INSERT (one statement), no wake-up "
                     "mechanism", f"{pgc['tps']:,.0f} tx/s, avg {pgc['latency_avg_ms']:.2f} ms",
                     "(reference)", ""))
    if pgc and pgn:
        rows.append(("1", "the wake-up's cost on the commit path: none (the relay polls); for "
                     "comparison, the same statement with the NOTIFY trigger it replaced",
                     f"{pgn['tps']:,.0f} tx/s = {pgn['tps'] / pgc['tps'] - 1:+.0%} "
                     f"(Lock:object waits {pgn['waits'].get('Lock:object', 0):.1f} backends)",
                     "(what NOTIFY would cost)", ""))
    if pgg:
        rows.append(("1", "ceiling: pgbench, the GET statement (primary key + newest webhook)",
                     f"{pgg['tps']:,.0f} tx/s, avg {pgg['latency_avg_ms']:.2f} ms", "(reference)", ""))
    cr = r.get("create")
    if cr:
        share = cr["rps"] / pgc["tps"] if pgc else None
        rows.append(("2", "create, requests/s",
                     f"{cr['rps']:,.0f}/s = {share:.0%} of the ceiling" if share else f"{cr['rps']:,.0f}/s",
                     f">= {CREATE_SHARE:.0%} of the ceiling",
                     status(share >= CREATE_SHARE if share else None)))
        lim = 4 * pgc["latency_avg_ms"] if pgc else None
        p99 = cr["latency_us"]["p99"] / 1000
        rows.append(("2", f"create p99 at {CLIENTS} connections",
                     f"{p99:.1f} ms (p50 {cr['latency_us']['p50'] / 1000:.1f} ms)",
                     f"<= 4x pgbench avg = {lim:.1f} ms" if lim else "<= 4x pgbench avg",
                     status(p99 <= lim if lim else None)))
        bad = cr["non_expected"] + sum(cr["errors"][k] for k in ("connect", "read", "write", "timeout"))
        rows.append(("2", "create, non-202 responses + socket errors",
                     f"{bad} of {cr['answered']:,}", "0", status(bad == 0)))
    g = r.get("get")
    if g:
        share = g["rps"] / pgg["tps"] if pgg else None
        bad = g["non_expected"] + g["errors"]["timeout"] + g["errors"]["read"]
        rows.append(("3", "get, requests/s",
                     (f"{g['rps']:,.0f}/s = {share:.0%} of the ceiling" if share else f"{g['rps']:,.0f}/s")
                     + f" (p50 {g['latency_us']['p50'] / 1000:.1f} ms, p99 "
                       f"{g['latency_us']['p99'] / 1000:.1f} ms, non-200 {bad})",
                     ">= 50 % of the ceiling", status(share >= 0.5 if share else None)))
    ri = r.get("relay_idle")
    if ri:
        rows.append(("4", "the wake-up's own cost: an idle relay's looks at the outbox",
                     f"{ri['looks_per_s']:.0f} looks/s; relay {ri['relay_cores']:.3f} cores, its "
                     f"PostgreSQL backends {ri['postgres_cores']:.3f} cores",
                     "(reference)", ""))
    rl = r.get("relay")
    if rl:
        ok = rl["events_per_s"] >= RELAY_MIN if rl["events_per_s"] else None
        rows.append(("4", "relay, sustained events/s",
                     f"{rl['events_per_s'] or 0:,.0f}/s ({rl['events']:,} events, "
                     f"{rl['batches']} batches)", f">= {RELAY_MIN:,}", status(ok)))
    for rate, lt in sorted(r.get("latency", {}).items(), key=lambda kv: int(kv[0])):
        if lt["p99_ms"] is None:
            continue
        target = LATENCY_TARGET_MS.get(int(rate))
        rows.append(("4", f"commit-to-broker p99 at {int(rate):,} events/s",
                     f"{lt['p99_ms']:.1f} ms (p50 {lt['p50_ms']:.1f}, max {lt['max_ms']:.1f}; "
                     f"{lt['steady_events']:,} events at {lt['rate']:.0f}/s, first and last "
                     f"second left out; whole run p99 {lt['whole_run_ms']['p99']:.1f} ms)",
                     f"<= {target} ms" if target else "", status(lt["p99_ms"] <= target if target else None)))
    pp = r.get("pipeline")
    if pp:
        rows.append(("4", f"{pp['payments']:,} payments, zero gateway delay",
                     f"POSTed in {pp['post_s']:.2f} s ({pp['post_rps']:,.0f}/s), all final after "
                     f"{pp['all_final_s']:.2f} s = {pp['ratio']:.2f}x",
                     "all final within 1.5x the POST time",
                     status(pp["ratio"] <= 1.5 if pp["ratio"] else None)))
    cs = r.get("consumer")
    if cs:
        rows.append(("5", "consumer, 2-5 s gateway, one process",
                     f"{cs['per_s']:,.0f} payments/s ({cs['payments']:,} in {cs['elapsed_s']:.2f} s, "
                     f"up to {cs['peak_in_flight']} in flight; a zero-overhead consumer with "
                     f"{PREFETCH} in flight, same payments: "
                     f"{cs['payments'] / cs['ideal_elapsed_these_delays_s']:,.0f}/s)",
                     ">= 200 payments/s per process", status(cs["per_s"] >= 200)))
    if cr and cr.get("serve_peak_rss_kib"):
        m = mib(cr["serve_peak_rss_kib"])
        rows.append(("6", "serve peak RSS during (2)", f"{m:.1f} MiB", "<= 32 MiB", status(m <= 32)))
    if cs and cs.get("consume_peak_rss_kib"):
        m = mib(cs["consume_peak_rss_kib"])
        rows.append(("6", f"consume peak RSS during (5), prefetch {PREFETCH}",
                     f"{m:.1f} MiB", "<= 64 MiB", status(m <= 64)))
    sc = r.get("scale")
    if sc:
        for role, unit, key in (("consume", "payments/s", "per_s"), ("relay", "events/s", "events_per_s")):
            one, two = sc[role].get("1", {}).get(key), sc[role].get("2", {}).get(key)
            if one and two:
                what = ("two consume processes against one (zero gateway delay, a queued backlog)"
                        if role == "consume" else "two relays against one (an outbox backlog)")
                rows.append(("7", what, f"one {one:,.0f} {unit}, two {two:,.0f} {unit} "
                             f"({two / one:.2f}x)", "(how it scales here)", ""))
    hg = r.get("http_gateway")
    if hg:
        rows.append(("8", "consumer, HTTP gateway against the PSP simulator (2-5 s), one process",
                     f"{hg['per_s']:,.0f} payments/s ({hg['payments']:,} in {hg['elapsed_s']:.2f} s; "
                     f"a zero-overhead consumer: {hg['ideal_per_s']:,.0f}/s; PSP charges per payment "
                     f"at most {hg['psp'].get('max_executed_per_payment', 0)})",
                     ">= 200 payments/s per process", status(hg["per_s"] >= 200)))
        m = mib(hg["consume_peak_rss_kib"])
        rows.append(("8", f"consume peak RSS during (8), prefetch {PREFETCH}", f"{m:.1f} MiB",
                     "<= 64 MiB", status(m <= 64)))
    elif "8" in skipped:
        rows.append(("8", "consumer, HTTP gateway against the PSP simulator", "skipped: " + skipped["8"],
                     ">= 200 payments/s, <= 64 MiB", "n/a"))
    so = r.get("soak")
    if so:
        a, b = so["start"], so["end"]
        ld = so["load"]
        span = f"{so['secs'] / 60:.0f} min" if so["secs"] >= 60 else f"{so['secs']} s"
        rows.append(("9", f"outbox soak: {so['rate']:,}/s for {span} through the whole pipeline",
                     f"{ld['answered_per_s']:,.0f}/s answered (p99 {ld['latency_ms']['p99'] or 0:.0f} ms), "
                     f"all final {so['drained_after_s']:.1f} s after the load; {a['at_s']:.0f} s -> "
                     f"{b['at_s']:.0f} s: outbox {mib(a['total_bytes'] / 1024):.1f} -> "
                     f"{mib(b['total_bytes'] / 1024):.1f} MiB, dead tuples {a['dead_tuples']:,} -> "
                     f"{b['dead_tuples']:,} (max {so['max_dead_tuples']:,}), claim {a['claim_ms']:.2f} -> "
                     f"{b['claim_ms']:.2f} ms ({a['claim_buffers']} -> {b['claim_buffers']} buffers)",
                     "rate held; size, dead tuples and claim time flat",
                     status(so["held"] and so["flat"])))
    for step, why in skipped.items():
        if step != "8":
            rows.append((step, "skipped", why, "", "n/a"))
    return rows


def costs_table(costs):
    lines = ["| on the commit path | tx/s with | tx/s without | cost | buffer accesses per tx, with / without |",
             "|---|---|---|---|---|"]
    for c in costs:
        lines.append(f"| {c['what']} | {c['with_tps']:,.0f} | {c['without_tps']:,.0f} | "
                     f"{c['cost']:.0%} | {c['with_buffers_per_tx']} / {c['without_buffers_per_tx']} |")
    return lines


def render(ctx, command, started, elapsed):
    rows = table(ctx.r, ctx.skipped)
    head = ("| step | what | measured | target | status |", "|---|---|---|---|---|")
    body = [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in rows]
    m = ctx.r.get("machine", {})
    lines = [f"# async-pay bench, {started:%Y-%m-%d %H:%M} UTC", ""]
    if ctx.quick:
        lines += ["**Quick run** (`--quick`, a few seconds a step, "
                  f"{ctx.profile} build): it checks that the bench runs; its figures are not "
                  "measurements and the status column means nothing.", ""]
    lines += [f"Command: `{command}` ({elapsed:.0f} s)", "", "## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in m.items()]
    lines += ["- shared: the load generator, the service, PostgreSQL and RabbitMQ all run on "
              "these cores", "", "## Results", "", *head, *body, ""]
    if ctx.r.get("costs"):
        lines += ["## What each index and constraint costs the commit path", "",
                  "pgbench `create.sql` on two fresh databases, one without the item, runs "
                  "alternating between them; tx/s are medians:", "",
                  *costs_table(ctx.r["costs"]), ""]
    if ctx.notes:
        lines += ["## Notes", "", *[f"- {n}" for n in ctx.notes], ""]
    lines += ["## How each figure is measured", "", METHOD.strip(), "",
              "## Raw figures", "",
              "CPU is in cores busy on average over the step (`rest_mostly_postgres` = machine "
              "total minus every process counted by name); `waits` = mean number of the "
              "database's active backends in each wait state (CPU = not waiting), sampled 10 "
              "times a second from pg_stat_activity.", "",
              "```json", json.dumps({k: v for k, v in ctx.r.items() if k != "machine"},
                                    indent=1, default=str), "```", ""]
    return "\n".join(lines), rows


METHOD = """
1. **Ceiling**: `pgbench -n -M prepared -c 32 -j 2 -T 15` on a scratch database migrated by
   `async-pay migrate`, so without any wake-up mechanism (the relay polls; migration 000006
   dropped the NOTIFY trigger). `bench/pgbench/create.sql` runs the very statement of
   `insert_with_event` (payment INSERT + outbox INSERT in one CTE, one implicit transaction,
   `synchronous_commit` on); then the same run with the NOTIFY trigger of migration 000002
   re-created, to name what that wake-up cost the commit path (its `Lock:object` waits are the
   instance-wide lock a notifying transaction takes at commit); `bench/pgbench/get.sql` runs the
   statement of `view_for_merchant` (the payment by primary key with its newest webhook
   delivery), over 20,000 loaded payments plus those of the create runs.
2. **API create**: `serve` (built-in defaults: 2 workers, pool 16) on its own database; wrk
   `-t2 -c32` with `bench/wrk/post.lua` (a unique Idempotency-Key per request), a warm-up run, then
   the measured run. Requests/s = answered requests / wrk's duration; p50/p99 from wrk's
   histogram; every status other than 202 and every socket error is counted.
3. **API get**: the same `serve`, wrk over 20,000 random ids of the payments of step 2.
4. **Relay** (fresh database): first the relay idles on an empty outbox; its looks per second
   are the database's commits over that time (each look is one short read-only transaction); its
   CPU and that of its PostgreSQL backends are the wake-up's own cost. Then a
   backlog of outbox events is committed in one statement and the relay drains it. events/s =
   events published between the first and the last batch / the time between their
   `published_at` (each batch stamps its transaction's start). **Pipeline**: `serve` + the relay
   + one `consume` with zero gateway delay; wrk posts the payments at full speed (each thread
   stops after its share); POST time = last `created_at` - first `created_at`, final time = last
   `processed_at` - first `created_at` (all database clock). **Commit-to-broker** (its own
   database, relay running, no consumer: the whole pipeline at these rates is more than two cores
   do, see the pipeline's rate): `pgbench -R RATE -c 32` runs the create statement at a steady
   (Poisson) 500, then 2,000 commits/s; a probe quorum queue bound to the exchange receives a
   copy of each event, and a probe consumer notes the wall-clock arrival of each (message id =
   outbox id). The script is `create.sql` with idempotency keys `lat-RATE-CLIENT-N`
   (`bench/pgbench/create_timed.sql`), so each row is matched to its transaction in pgbench's
   per-transaction log (`-l`), which says when the client got the COMMIT's answer. Latency =
   arrival - that moment: commit to broker, the commit's own duration not included (the raw
   figures also give it from the statement's start, `created_at`). The headline leaves out the
   events of pgbench's first and last second (connections opening and closing; its log times are
   off there); the whole run's p99 is given beside it. A quorum queue hands a message to
   consumers once it is committed to its log, the moment the relay's confirm becomes possible.
5. **Consumer**: payments are posted and published with no consumer running, then one `consume`
   (`ASYNC_PAY__AMQP__PREFETCH=1000`, default 2-5 s gateway) starts. payments/s = payments / (last
   `processed_at` - the moment the process was started), so its start-up is counted. The
   gateway's delay is a function of the payment id, so the bench also computes what a consumer
   with no overhead at all would take for the same payments with 1,000 in flight (about 204/s
   for 2,000 payments).
6. **Memory**: `VmHWM` (peak resident set) of `serve` right after step 2's measured run (it
   started fresh for step 2, so this covers warm-up and load) and of the consumers of steps 5
   and 8 once every payment is final.
7. **One against two** (fresh database): a backlog of payments is posted and queued, then one
   `consume` (zero gateway delay) drains it; the same again with two. payments/s = payments
   finalised between the first and the last `processed_at` / that time. Then an outbox backlog
   drained by one relay, then by two (events/s as in step 4). On two cores a second process of a
   role mostly competes with the first and with PostgreSQL and RabbitMQ for the same CPU.
8. **HTTP gateway**: as step 5, but `consume` runs with `gateway.kind = "http"` against
   `bench/asyncpay_bench/psp.py` (a PSP simulator: 2-5 s per charge, 10 % declined,
   idempotent per key, counting the charges it executes per payment). Skipped, saying so, when
   the binary refuses `gateway.kind` (a build from before the connector).
9. **Outbox soak** (fresh database): `serve`, a relay with `relay.retention = 1m` (so deleting
   published events is part of the steady state within minutes; the default is 7 days) and one
   `consume` (zero gateway delay); `bench/asyncpay_bench/loadgen.py` POSTs at a fixed rate over
   64 keep-alive connections (open loop: latency counts from each request's due time). Every
   30 s: the outbox's total size, live and dead tuples, vacuums, and the relay's claim query
   (`EXPLAIN ANALYZE`, median of 5, in a rolled-back transaction: time and buffers touched).
   Start = the first sample after 30 s, end = the last one under load. Held: every request
   answered 202, >= 95 % of the rate, and everything final and published within 30 s after the
   load. Flat: the size at the end within 1.25x of the size half-way, and the claim time at the
   end within 2x + 1 ms of the start.
"""
