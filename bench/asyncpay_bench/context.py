"""The run's context: tools, the binary, databases, queues, processes, waits, and cleanup.

A step gets a `Context` and records its figures in `ctx.r[...]`; `ctx.stack(name)` gives it a
database of its own (migrated by `async-pay migrate`) with its own RabbitMQ names, and starts the
roles it asks for. Everything is removed at the end, also after a failure or Ctrl-C.
"""

import math
import os
import platform
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .common import (BENCH, CLIENTS, PIKA, PYDEPS, ROOT, BenchError, CpuMeter, Proc, Psql,
                     busy_sample, die_with_parent, free_port, fresh_release_binary, log,
                     parse_pgbench, parse_wrk, run)

FULL = dict(pgbench_secs=15, warmup_secs=5, load_secs=15, relay_backlog=50_000, idle_secs=10,
            pipeline_n=10_000, latency_secs=15, consumer_n=2_000, scale_n=10_000,
            psp_n=2_000, soak_secs=300, soak_rate=1000, soak_every=30, costs_secs=10,
            costs_rounds=3)
QUICK = dict(pgbench_secs=3, warmup_secs=1, load_secs=3, relay_backlog=3_000, idle_secs=2,
             pipeline_n=1_000, latency_secs=3, consumer_n=300, scale_n=1_000,
             psp_n=200, soak_secs=10, soak_rate=200, soak_every=3, costs_secs=2,
             costs_rounds=1)


class Stack:
    """One database of the run, with RabbitMQ names of its own, and the roles started on it."""

    def __init__(self, ctx, suffix):
        self.ctx = ctx
        self.suffix = suffix
        names = f"bench.{ctx.run_id}.{suffix}"
        self.amqp = {
            "EXCHANGE": f"{names}.payments",
            "QUEUE": f"{names}.new",
            "ROUTING_KEY": f"{names}.new",
            "DEAD_LETTER_EXCHANGE": f"{names}.dlx",
            "DEAD_LETTER_QUEUE": f"{names}.dead",
        }
        self.probe_queue = f"{names}.probe"
        ctx.amqp_names.append(self.amqp | {"PROBE": self.probe_queue})
        self.db = ctx.create_db(suffix, self.env())
        self.url = ctx.db_url(self.db)
        self.psql = Psql(self.url)
        self.procs = []
        self.serve = None
        self.serve_url = None

    def env(self, **settings):
        """The roles' environment: built-in defaults (config.example.toml) except this stack's
        database and broker names, plus `settings` (ASYNC_PAY__SECTION__KEY=value)."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("ASYNC_PAY") and k not in ("DATABASE_URL", "AMQP_URL")}
        env["RUST_LOG"] = "info"  # the default level, whatever the caller's shell says
        env["DATABASE_URL"] = self.ctx.db_url(f"{self.ctx.prefix}_{self.suffix}")
        env["AMQP_URL"] = self.ctx.amqp_url
        for k, v in self.amqp.items():
            env[f"ASYNC_PAY__AMQP__{k}"] = v
        for k, v in settings.items():
            env[f"ASYNC_PAY__{k}"] = str(v)
        return env

    def spawn(self, name, role, **settings):
        p = Proc(name, [str(self.ctx.binary), role], self.env(**settings),
                 self.ctx.workdir / f"{self.suffix}-{name}.log")
        self.procs.append(p)
        return p

    def stop(self, p, timeout=40):
        rc = p.stop(timeout)
        if p in self.procs:
            self.procs.remove(p)
        if p is self.serve:
            self.serve = None
        if rc not in (0, -signal.SIGTERM):
            log(f"{p.name} exited with {rc}; see {p.logfile}")
        return rc

    def start_relay(self, name="relay", **settings):
        p = self.spawn(name, "relay", **settings)
        p.wait_for_log(r"relay connected", 60)
        return p

    def start_consume(self, name="consume", **settings):
        p = self.spawn(name, "consume", **settings)
        p.wait_for_log(r"consuming ", 60)
        return p

    def start_serve(self, **settings):
        port = free_port()
        p = self.spawn("serve", "serve", SERVER__BIND=f"127.0.0.1:{port}", **settings)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        self.serve, self.serve_url = p, url
                        return p, url
            except OSError:
                pass
            if not p.alive():
                raise BenchError(f"serve exited ({p.p.returncode}); see {p.logfile}")
            if time.monotonic() > deadline:
                raise BenchError(f"serve did not answer /health within 60s; see {p.logfile}")
            time.sleep(0.1)

    def settle_posts(self, quiet=0.5, timeout=30):
        """wrk stops its threads with requests still in flight, which the server still commits:
        waits until no new payment arrived for `quiet` seconds."""
        last, since = -1, time.monotonic()
        deadline = since + timeout
        while time.monotonic() < deadline:
            n = int(self.psql.value("SELECT count(*) FROM payments"))
            if n != last:
                last, since = n, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return
            time.sleep(0.1)

    def pending(self):
        return int(self.psql.value("SELECT count(*) FROM payments WHERE status = 'pending'"))

    def unpublished(self):
        return int(self.psql.value("SELECT count(*) FROM outbox WHERE published_at IS NULL"))

    def queue_depth(self):
        return self.ctx.amqp_tools.queue_depth(self.ctx.amqp_url, self.amqp["QUEUE"])

    def purge(self):
        return self.ctx.amqp_tools.purge(self.ctx.amqp_url, self.amqp["QUEUE"])

    def insert_backlog(self, n):
        """`n` outbox events, committed at once (one statement); returns the highest id."""
        self.psql.query("INSERT INTO outbox (event_type, payload) SELECT 'payment.created', "
                        "jsonb_build_object('payment_id', gen_random_uuid()) "
                        f"FROM generate_series(1, {n})", timeout=120)
        return int(self.psql.value("SELECT max(id) FROM outbox"))

    def publish_rate(self, first_id, last_id):
        """Events/s of the batches that published ids first_id..last_id: events published
        between the first and the last batch / the time between their `published_at` (each batch
        stamps its transaction's start), so the process start is not counted."""
        row = self.psql.query(
            "SELECT count(DISTINCT published_at), extract(epoch FROM min(published_at)), "
            "extract(epoch FROM max(published_at)), count(*) FILTER (WHERE published_at = "
            f"(SELECT max(published_at) FROM outbox WHERE id BETWEEN {first_id} AND {last_id})), "
            f"count(*) FROM outbox WHERE id BETWEEN {first_id} AND {last_id}")[0]
        batches, first, last, last_batch, n = (int(row[0]), float(row[1]), float(row[2]),
                                               int(row[3]), int(row[4]))
        rate = (n - last_batch) / (last - first) if last > first else None
        return {"events": n, "batches": batches, "events_per_s": rate}

    def close(self):
        for p in list(reversed(self.procs)):
            try:
                self.stop(p)
            except Exception as e:  # noqa: BLE001 - cleanup goes on whatever happens
                log(f"stopping {p.name}: {e}")
                try:
                    p.p.kill()
                except OSError:
                    pass
        self.procs.clear()
        self.psql.close()
        self.ctx.drop_db(self.db)
        if self in self.ctx.stacks:
            self.ctx.stacks.remove(self)


class Context:
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.cfg = dict(QUICK if args.quick else FULL)
        if getattr(args, "soak_rate", None):
            self.cfg["soak_rate"] = args.soak_rate
        if getattr(args, "soak_secs", None):
            self.cfg["soak_secs"] = args.soak_secs
        self.profile = args.profile or ("release" if not args.quick or fresh_release_binary()
                                        else "debug")
        self.run_id = time.strftime("%Y%m%d%H%M%S") + f"_{os.getpid()}"
        self.prefix = f"bench_{self.run_id}"
        self.pg_base = args.pg_url.rstrip("/")
        self.amqp_url = args.amqp_url
        self.workdir = ROOT / "target" / "bench" / self.run_id
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.dbs = []
        self.stacks = []
        self.procs = []  # helpers that belong to no stack (probe, PSP simulator)
        self.amqp_names = []
        self.r = {}  # every figure, by step
        self.notes = []
        self.skipped = {}  # step -> why
        self.binary = None
        self.amqp_tools = None

    # ---- plumbing

    def db_url(self, db):
        return f"{self.pg_base}/{db}"

    def admin_sql(self, sql, db="postgres", timeout=120):
        run(["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", self.db_url(db),
             "-c", sql], timeout=timeout)

    def create_db(self, suffix, env):
        db = f"{self.prefix}_{suffix}"
        self.dbs.append(db)
        # The brief's way: `async-pay migrate` creates the database and applies the migrations.
        run([str(self.binary), "migrate"], timeout=120, env=env)
        return db

    def stack(self, suffix):
        s = Stack(self, suffix)
        self.stacks.append(s)
        return s

    def helper(self, name, argv, env):
        """A helper process of the bench (probe consumer, PSP simulator), stopped at cleanup."""
        p = Proc(name, argv, env, self.workdir / f"{name}.log")
        self.procs.append(p)
        return p

    def stop_helper(self, p, timeout=15):
        p.stop(timeout)
        if p in self.procs:
            self.procs.remove(p)

    def wrk(self, script, url, secs, script_args, timeout=None):
        argv = ["wrk", "-t2", f"-c{CLIENTS}", f"-d{secs}s", "--timeout", "10s",
                "-s", str(BENCH / "wrk" / script), url, "--", *map(str, script_args)]
        _, out, _ = run(argv, timeout=timeout or secs + 60)
        return parse_wrk(out)

    def wrk_quota(self, url, total, key_prefix, timeout):
        """Posts about `total` payments (each of wrk's 2 threads stops after its half) and
        returns wrk's figures. wrk would sleep out its whole -d after the threads stopped, so it is
        ended with SIGINT (it then prints its summary) once both threads said they are done."""
        argv = ["wrk", "-t2", f"-c{CLIENTS}", f"-d{int(timeout)}s", "--timeout", "10s",
                "-s", str(BENCH / "wrk" / "post.lua"), url, "--", key_prefix,
                str(math.ceil(total / 2))]
        p = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
        try:
            fd = p.stderr.fileno()
            buf, done = b"", 0
            deadline = time.monotonic() + timeout
            while done < 2 and p.poll() is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"wrk did not post {total} payments within {timeout:.0f}s")
                if select.select([fd], [], [], min(left, 1.0))[0]:
                    chunk = os.read(fd, 4096)
                    if not chunk:
                        break
                    buf += chunk
                    done = buf.count(b"BENCH_THREAD_DONE")
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
            out, err = p.communicate(timeout=30)
        except BaseException:
            p.kill()
            p.wait(10)
            raise
        if p.returncode != 0:
            raise BenchError(f"wrk failed ({p.returncode}): {(buf + err).decode(errors='replace')[-2000:]}")
        return parse_wrk(out.decode())

    def pgbench(self, db, script, secs, clients=CLIENTS, threads=2, extra=()):
        argv = ["pgbench", "-n", "-M", "prepared", "-c", str(clients), "-j", str(threads),
                "-T", str(secs), *extra, "-f", str(BENCH / "pgbench" / script), self.db_url(db)]
        _, out, err = run(argv, timeout=secs + 120)
        res = parse_pgbench(out)
        if res["failed"]:
            raise BenchError(f"pgbench {script}: {res['failed']} failed transactions:\n{err[-2000:]}")
        return res

    def wait_until(self, what, fn, timeout, every=0.1, procs=None):
        deadline = time.monotonic() + timeout
        watched = procs if procs is not None else [p for s in self.stacks for p in s.procs]
        while True:
            v = fn()
            if v:
                return v
            if time.monotonic() > deadline:
                raise BenchError(f"{what}: not reached within {timeout:.0f}s")
            for p in watched:
                if not p.alive():
                    raise BenchError(f"{p.name} exited ({p.p.returncode}) while waiting for "
                                     f"{what}; see {p.logfile}")
            time.sleep(every)

    # ---- setup

    def setup(self):
        for tool in ("psql", "pgbench", "wrk", "cargo"):
            if not shutil.which(tool):
                hint = " (Debian: apt-get install wrk)" if tool == "wrk" else ""
                raise BenchError(f"{tool} is not installed{hint}")
        try:
            import pika  # noqa: F401
        except ImportError:
            if not (PYDEPS / "pika").exists():
                log(f"installing {PIKA} from PyPI into {PYDEPS.relative_to(ROOT)}")
                run([sys.executable, "-m", "pip", "install", "--quiet",
                     "--disable-pip-version-check", "--target", str(PYDEPS), PIKA], timeout=300)
            sys.path.insert(0, str(PYDEPS))
        from . import amqp_tools
        self.amqp_tools = amqp_tools

        self.binary = ROOT / "target" / self.profile / "async-pay"
        if self.args.binary:
            self.binary = Path(self.args.binary).resolve()
            log(f"using {self.binary} (--binary)")
        elif self.args.no_build and self.binary.exists():
            log(f"using the existing {self.binary.relative_to(ROOT)} (--no-build)")
        else:
            cargo = ["cargo", "build", "--bin", "async-pay"]
            if self.profile == "release":
                cargo.append("--release")
            log(f"building: {' '.join(cargo)}")
            env = dict(os.environ)
            # The Justfile's and CI's setting, so the debug build is the one the tests left.
            env.setdefault("CARGO_PROFILE_DEV_DEBUG", "line-tables-only")
            run(cargo, timeout=1800, env=env)
        self.r["machine"] = self.machine()

    def machine(self):
        cpu = "?"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        ver = lambda argv: run(argv, timeout=30, check=False)[1].strip().splitlines()[0]  # noqa: E731
        pg = Psql(self.db_url("postgres"))
        try:
            pg_version = pg.value("SHOW server_version")
            pg_settings = dict(pg.query(
                "SELECT name, current_setting(name) FROM pg_settings WHERE name IN "
                "('synchronous_commit', 'fsync', 'wal_sync_method', 'shared_buffers', "
                "'max_connections', 'commit_delay', 'autovacuum_naptime')"))
        finally:
            pg.close()
        git = run(["git", "rev-parse", "--short", "HEAD"], timeout=30, check=False)[1].strip()
        dirty = run(["git", "status", "--porcelain", "--untracked-files=no"], timeout=30,
                    check=False)[1].strip()
        return {
            "cpu": f"{os.cpu_count()} x {cpu}",
            "memory": f"{mem_kib / 1024 / 1024:.1f} GiB",
            "kernel": f"{platform.system()} {platform.release()}",
            "postgresql": f"{pg_version} ({', '.join(f'{k}={v}' for k, v in sorted(pg_settings.items()))})",
            "rabbitmq": self.amqp_tools.server_version(self.amqp_url),
            "disk": f"fdatasync of one 8 KiB write: {self.fdatasync_rate():,.0f}/s (1 s probe in {ROOT / 'target'})",
            "rustc": ver(["rustc", "--version"]),
            "wrk": ver(["wrk", "--version"]).split(" Copyright")[0],
            "pgbench": ver(["pgbench", "--version"]),
            "python": platform.python_version(),
            "async-pay": (f"{self.binary} (--binary)" if self.args.binary else
                          f"{git}{' (+ uncommitted changes)' if dirty else ''}, {self.profile} build"),
        }

    def fdatasync_rate(self):
        path = ROOT / "target" / "bench" / f".fsync-probe-{os.getpid()}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            block = b"\0" * 8192
            n, t0 = 0, time.monotonic()
            while time.monotonic() - t0 < 1.0:
                os.pwrite(fd, block, 0)
                os.fdatasync(fd)
                n += 1
            return n / (time.monotonic() - t0)
        finally:
            os.close(fd)
            path.unlink()

    # ---- a fair measurement

    def meter(self, procs):
        return CpuMeter(procs, self.prefix)

    def check_disturbed(self, what, cpu):
        """A step during which other work used a tenth of a core or more is flagged."""
        if cpu.get("foreign_cores", 0) >= 0.1:
            self.notes.append(f"step {what} was disturbed: other work used {cpu['foreign_cores']:.2f} "
                              f"cores during it ({', '.join(cpu['foreign_top'])}); its figures may be low")

    def wait_quiet(self, what):
        """Benchmarks need the machine to themselves: wait (bounded) until it is nearly idle
        before a step, and say so in the results when it never was."""
        t0 = time.monotonic()
        said = None
        while True:
            busy, top = busy_sample(1.0, self.prefix)
            waited = time.monotonic() - t0
            if busy < 0.15 or waited > self.args.wait_idle:
                break
            if said is None or waited - said >= 30:
                said = waited
                log(f"the machine is {busy:.0%} busy before {what} ({', '.join(top) or '?'}); "
                    f"waiting (up to {self.args.wait_idle:.0f} s)")
        if waited > 5:
            log(f"waited {waited:.0f} s for a quiet machine")
        self.r.setdefault("machine_busy_before_pct", {})[what] = round(busy * 100, 1)
        if busy >= 0.15:
            self.notes.append(f"the machine was {busy:.0%} busy with other work before {what} "
                              f"({', '.join(top)}): that step's figures may be low")

    # ---- teardown

    def drop_db(self, db):
        try:
            self.admin_sql(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            if db in self.dbs:
                self.dbs.remove(db)
        except BenchError as e:
            log(f"could not drop database {db}: {e}")

    def cleanup(self):
        for p in list(reversed(self.procs)):
            try:
                p.stop(timeout=15)
            except Exception as e:  # noqa: BLE001 - cleanup goes on whatever happens
                log(f"stopping {p.name}: {e}")
        self.procs.clear()
        for s in list(reversed(self.stacks)):
            s.close()
        for db in list(self.dbs):
            self.drop_db(db)
        if self.amqp_tools is not None:
            for names in self.amqp_names:
                try:
                    failed = self.amqp_tools.delete(
                        self.amqp_url,
                        [names["QUEUE"], names["DEAD_LETTER_QUEUE"], names["PROBE"]],
                        [names["EXCHANGE"], names["DEAD_LETTER_EXCHANGE"]])
                    for f in failed:
                        log(f"could not delete {f}")
                except Exception as e:  # noqa: BLE001
                    log(f"could not delete the run's queues/exchanges: {e}")
        log(f"cleaned up (logs of this run: {self.workdir.relative_to(ROOT)})")
