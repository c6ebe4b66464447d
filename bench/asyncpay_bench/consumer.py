"""Step 5 (one consumer with the simulated 2-5 s gateway; step 6's consume figure) and step 8
(one consumer with the HTTP gateway connector against the PSP simulator, psp.py; issue 10)."""

import heapq
import json
import random
import sys
import time
import urllib.request
import uuid

from .common import PREFETCH, BenchError, Skipped, log, pct, python_env

M64 = (1 << 64) - 1
PSP_KEY = "bench-psp-key"


def gateway_delay(payment_id, lo=2.0, hi=5.0):
    """The simulated gateway's delay for a payment (its `decide`: fastrand 2's wyrand seeded with
    the id's two 64-bit halves xored, first f64 draw), in seconds."""
    v = uuid.UUID(payment_id).int
    state = ((v & M64) ^ (v >> 64)) & M64
    while True:
        state = (state + 0x2D358DCCAA6C78A5) & M64
        t = state * (state ^ 0x8BB84B93962EACC9)
        x = ((((t & M64) ^ (t >> 64)) & M64) >> 1) * (1.0 / (1 << 63))
        if x < 1.0:
            return lo + (hi - lo) * x


def makespan(delays, slots):
    """When `slots` workers finish jobs of these durations taken in this order, with no
    overhead at all."""
    free = [0.0] * min(slots, len(delays))
    end = 0.0
    for d in delays:
        t = heapq.heappop(free) + d
        end = max(end, t)
        heapq.heappush(free, t)
    return end


def simulate_makespan(n, slots, lo, hi, trials=200):
    """Mean time for a zero-overhead consumer with `slots` payments in flight to finish `n`
    payments whose gateway delays are uniform in lo..hi (the simulated gateway's draw)."""
    rng = random.Random(6)
    total = 0.0
    for _ in range(trials):
        free = [0.0] * min(slots, n)
        end = 0.0
        for _ in range(n):
            t = heapq.heappop(free) + rng.uniform(lo, hi)
            end = max(end, t)
            heapq.heappush(free, t)
        total += end
    return total / trials


def queue_payments(ctx, s, n, tag):
    """POSTs `n` payments with no consumer running and waits until all are in the queue."""
    _, url = s.start_serve() if s.serve is None else (s.serve, s.serve_url)
    ctx.wrk_quota(url, n, f"{ctx.run_id}-{tag}", timeout=300)
    s.settle_posts()
    n = s.pending()
    ctx.wait_until("the payments published", lambda: s.unpublished() == 0, timeout=120)
    ctx.wait_until("the payments in the queue", lambda: s.queue_depth() >= n, timeout=30, every=0.2)
    return n


def drain_with_one_consume(ctx, s, n, what, name, helpers, **settings):
    """Starts one consume on the queued payments and waits until none is pending; returns when
    it was started, the most payments claimed at once, its peak RSS (KiB) and the CPU used."""
    ctx.wait_quiet(what)
    t0 = time.time()
    consume = s.spawn(name, "consume", **settings)
    cpu = ctx.meter([consume, *helpers])
    peak_in_flight = watch_until_final(ctx, s, consume, n, what)
    used = cpu.stop(loadgen=False)
    ctx.check_disturbed(what, used)
    return t0, peak_in_flight, consume.status_kib("VmHWM"), used


def watch_until_final(ctx, s, consume, n, what):
    """Polls until no payment is pending; returns the most claimed at once."""
    peak_in_flight = 0
    deadline = time.monotonic() + max(120, n / 20)
    while True:
        row = s.psql.query("SELECT count(*) FILTER (WHERE status = 'pending'), "
                           "count(*) FILTER (WHERE claim_token IS NOT NULL) FROM payments")[0]
        pending, claimed = int(row[0]), int(row[1])
        peak_in_flight = max(peak_in_flight, claimed)
        if pending == 0:
            return peak_in_flight
        if time.monotonic() > deadline or not consume.alive():
            raise BenchError(f"{what}: {pending} payments still pending; see {consume.logfile}")
        time.sleep(0.1)


def step5_consumer(ctx):
    n = ctx.cfg["consumer_n"]
    s = ctx.stack("cons")
    s.start_relay()
    log(f"5 consumer: {n:,} payments queued, then one consume with prefetch {PREFETCH} and the "
        "default 2-5 s gateway")
    n = queue_payments(ctx, s, n, "cons")
    t0, peak_in_flight, peak, cons_cpu = drain_with_one_consume(
        ctx, s, n, "5 consumer", "consume5", [], AMQP__PREFETCH=PREFETCH)
    row = s.psql.query(
        "SELECT extract(epoch FROM min(processed_at)), extract(epoch FROM max(processed_at)), "
        "extract(epoch FROM percentile_disc(0.1) WITHIN GROUP (ORDER BY processed_at)), "
        "extract(epoch FROM percentile_disc(0.9) WITHIN GROUP (ORDER BY processed_at)) "
        f"FROM payments WHERE processed_at >= to_timestamp({t0})")[0]
    first, last, p10, p90 = map(float, row)
    elapsed = last - t0
    # Where the time beyond the gateway's own delays went: each payment's gateway call began
    # at processed_at - its delay (the delay is a function of the id), so the overhead of
    # the consumer shows as the gap between those starts and the ideal schedule.
    done = s.psql.query("SELECT id, extract(epoch FROM processed_at) FROM payments "
                        f"WHERE processed_at >= to_timestamp({t0}) ORDER BY created_at, id")
    delays = [gateway_delay(i) for i, _ in done]
    starts = sorted(float(t) - d - t0 for (_, t), d in zip(done, delays))
    exact = makespan(delays, PREFETCH)
    first_wave = starts[:PREFETCH]
    # The best any consumer could do with this many in flight, from the gateway's delays alone.
    ideal = simulate_makespan(n, PREFETCH, 2.0, 5.0)
    ctx.r["consumer"] = {
        "payments": n, "elapsed_s": round(elapsed, 3), "per_s": n / elapsed,
        "first_final_after_s": round(first - t0, 3),
        "middle_80pct_per_s": 0.8 * n / (p90 - p10) if p90 > p10 else None,
        "ideal_elapsed_s": round(ideal, 3), "ideal_per_s": n / ideal,
        "ideal_elapsed_these_delays_s": round(exact, 3),
        "overhead_s": round(elapsed - exact, 3),
        "first_wave_gateway_start_after_s": {
            "min": round(first_wave[0], 3), "p50": round(pct(first_wave, 50), 3),
            "max": round(first_wave[-1], 3)},
        "peak_in_flight": peak_in_flight, "consume_peak_rss_kib": peak,
        "cpu": cons_cpu,
    }
    log(f"   {n:,} final {elapsed:.2f} s after starting consume: {n / elapsed:,.0f}/s "
        f"(a zero-overhead consumer with {PREFETCH} in flight: {exact:.2f} s, "
        f"{n / exact:,.0f}/s; first gateway calls began {first_wave[0]:.3f}..{first_wave[-1]:.3f} s "
        f"after the start); up to {peak_in_flight} in flight; peak RSS {peak / 1024:.1f} MiB")
    s.close()


def psp_stats(url):
    with urllib.request.urlopen(url + "/_stats", timeout=10) as resp:
        return json.loads(resp.read())


def refused_gateway_config(consume, timeout=30):
    """Why `consume` stopped at start because its configuration has no HTTP gateway (a binary
    from before the connector exits at once, naming a `gateway.` key), or None once it consumes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = consume.log_text()
        if not consume.alive():
            if "gateway." in text:
                lines = [ln for ln in text.splitlines() if "gateway." in ln]
                return lines[-1].strip()
            raise BenchError(f"consume exited ({consume.p.returncode}) at start; "
                             f"see {consume.logfile}")
        if "consuming " in text:
            return None
        time.sleep(0.1)
    raise BenchError(f"consume neither consumed nor exited within {timeout}s; see {consume.logfile}")


def step8_http_gateway(ctx):
    """One consume with `gateway.kind = "http"` against psp.py (2-5 s per charge)."""
    n = ctx.cfg["psp_n"]
    s = ctx.stack("psp")
    psp = ctx.helper("psp", [sys.executable, "-m", "asyncpay_bench.psp", "--api-key", PSP_KEY,
                             "--min-delay", "2", "--max-delay", "5"], python_env())
    port = int(psp.wait_for_log(r"^listening (\d+)", 30).group(1))
    psp_url = f"http://127.0.0.1:{port}"
    gateway = dict(GATEWAY__KIND="http", GATEWAY__URL=psp_url, GATEWAY__API_KEY=PSP_KEY,
                   GATEWAY__TIMEOUT="10s", AMQP__PREFETCH=PREFETCH)
    # Ask the binary first, before any payment is posted: does it know the HTTP connector?
    probe = s.spawn("consume-config", "consume", **gateway)
    why = refused_gateway_config(probe)
    probe.stop()
    s.procs.remove(probe)
    if why:
        s.close()
        ctx.stop_helper(psp)
        raise Skipped(f"this binary has no HTTP gateway connector (consume refused "
                      f"gateway.kind = \"http\": {why})")
    s.start_relay()
    log(f"8 HTTP gateway: {n:,} payments queued, then one consume with prefetch {PREFETCH} "
        f"and gateway.kind = \"http\" against the PSP simulator (2-5 s per charge)")
    n = queue_payments(ctx, s, n, "psp")
    t0, peak_in_flight, peak, used = drain_with_one_consume(
        ctx, s, n, "8 HTTP gateway", "consume8", [psp], **gateway)
    row = s.psql.query(
        "SELECT extract(epoch FROM max(processed_at)), count(*) FILTER (WHERE status = 'succeeded'), "
        f"count(*) FILTER (WHERE status = 'failed') FROM payments WHERE processed_at >= to_timestamp({t0})")[0]
    last, succeeded, failed = float(row[0]), int(row[1]), int(row[2])
    stats = psp_stats(psp_url)
    elapsed = last - t0
    ctx.r["http_gateway"] = {
        "payments": n, "elapsed_s": round(elapsed, 3), "per_s": n / elapsed,
        "ideal_per_s": n / simulate_makespan(n, PREFETCH, 2.0, 5.0),
        "succeeded": succeeded, "failed": failed, "peak_in_flight": peak_in_flight,
        "consume_peak_rss_kib": peak, "psp": stats, "cpu": used,
    }
    if stats.get("max_executed_per_payment", 0) > 1:
        ctx.notes.append(f"HTTP gateway: the PSP executed more than one charge for "
                         f"{stats['payments_charged_more_than_once']} payment(s)")
    if (succeeded, failed) != (stats.get("succeeded", 0), stats.get("declined", 0)):
        ctx.notes.append(f"HTTP gateway: payments {succeeded} succeeded / {failed} failed, the PSP "
                         f"{stats.get('succeeded', 0)} succeeded / {stats.get('declined', 0)} declined")
    log(f"   {n:,} final {elapsed:.2f} s after starting consume: {n / elapsed:,.0f}/s; peak RSS "
        f"{peak / 1024:.1f} MiB; PSP: {stats.get('charges_executed', 0)} charges executed, at most "
        f"{stats.get('max_executed_per_payment', 0)} per payment")
    s.close()
    ctx.stop_helper(psp)
