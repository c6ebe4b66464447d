"""Steps 2 and 3: the API's create and get under wrk, against a fresh `serve`; step 6's serve
figure (peak RSS) is taken here."""

from .common import CLIENTS, WaitSampler, log


def step2_3_api(ctx):
    c = ctx.cfg
    s = ctx.stack("api")
    serve, url = s.start_serve()
    log(f"2 API create: wrk -t2 -c{CLIENTS}, {c['warmup_secs']} s warm-up, then {c['load_secs']} s")
    ctx.wrk("post.lua", url, c["warmup_secs"], [f"{ctx.run_id}-warm"])
    ctx.wait_quiet("2 API create")
    waits = WaitSampler(ctx.db_url("postgres"), s.db)
    waits.start()
    cpu = ctx.meter([serve])
    create = ctx.wrk("post.lua", url, c["load_secs"], [f"{ctx.run_id}-load"])
    create["cpu"] = cpu.stop()
    ctx.check_disturbed("2 API create", create["cpu"])
    create["waits"] = waits.finish()
    create["serve_peak_rss_kib"] = serve.status_kib("VmHWM")
    create["rps"] = create["answered"] / (create["duration_us"] / 1e6)
    create["stored"] = int(s.psql.value(
        f"SELECT count(*) FROM payments WHERE idempotency_key LIKE '{ctx.run_id}-load-%'"))
    ids = [r[0] for r in s.psql.query("SELECT id FROM payments ORDER BY random() LIMIT 20000")]
    create["table_rows"] = int(s.psql.value("SELECT count(*) FROM payments"))
    ctx.r["create"] = create
    log(f"   {create['rps']:,.0f} req/s, p50 {create['latency_us']['p50'] / 1000:.1f} ms, "
        f"p99 {create['latency_us']['p99'] / 1000:.1f} ms, non-202: {create['non_expected']}, "
        f"serve peak RSS {create['serve_peak_rss_kib'] / 1024:.1f} MiB")

    log(f"3 API get: wrk -t2 -c{CLIENTS} over {len(ids):,} payments, "
        f"{c['warmup_secs']} s warm-up, then {c['load_secs']} s")
    ids_file = ctx.workdir / "ids.txt"
    ids_file.write_text("\n".join(ids) + "\n")
    ctx.wrk("get.lua", url, c["warmup_secs"], [ids_file])
    ctx.wait_quiet("3 API get")
    cpu = ctx.meter([serve])
    get = ctx.wrk("get.lua", url, c["load_secs"], [ids_file])
    get["cpu"] = cpu.stop()
    ctx.check_disturbed("3 API get", get["cpu"])
    get["rps"] = get["answered"] / (get["duration_us"] / 1e6)
    get["serve_peak_rss_kib"] = serve.status_kib("VmHWM")
    ctx.r["get"] = get
    log(f"   {get['rps']:,.0f} req/s, p50 {get['latency_us']['p50'] / 1000:.1f} ms, "
        f"p99 {get['latency_us']['p99'] / 1000:.1f} ms, non-200: {get['non_expected']}")
    s.close()
