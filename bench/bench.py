#!/usr/bin/env python3
"""`just bench`: async-pay against the database's own ceiling (issue 6). See bench/README.md.

    python3 bench/bench.py            # the full run, release build (about 5 minutes + the build)
    python3 bench/bench.py --quick    # a few seconds a step: checks the bench runs (CI)

Every step runs in this one process's lifetime, against the local PostgreSQL and RabbitMQ, on
databases and queues/exchanges whose names are unique to this run; all of them, and every process
the bench starts, are removed at the end, also after a failure or Ctrl-C (the processes are
started with PR_SET_PDEATHSIG, so even a SIGKILLed bench takes them along). Every wait has a
deadline. Standard library only, plus pika (AMQP), installed from PyPI into target/bench/pydeps
when it is missing.
"""

import argparse
import ctypes
import datetime
import json
import math
import os
import platform
import re
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PYDEPS = ROOT / "target" / "bench" / "pydeps"
PIKA = "pika==1.3.2"

API_KEY = "secret-api-key"  # the built-in demo merchant of config.example.toml
CLIENTS = 32  # connections of the load generator and clients of pgbench (issue 6)
LATENCY_RATE = 500  # events/s for the commit-to-broker latency step (issue 6)
PREFETCH_STEP5 = 1000  # payments in flight in the consumer step (issue 6: "1,000 in flight")

FULL = dict(pgbench_secs=15, warmup_secs=5, load_secs=15, relay_backlog=50_000,
            pipeline_n=10_000, latency_secs=15, consumer_n=2_000)
QUICK = dict(pgbench_secs=3, warmup_secs=1, load_secs=3, relay_backlog=3_000,
             pipeline_n=1_000, latency_secs=3, consumer_n=300)


class BenchError(Exception):
    pass


class Interrupted(BaseException):
    pass


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# processes

_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def _die_with_parent():
    """preexec_fn: the child gets SIGKILL when the bench dies, however it dies."""
    _libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def run(argv, timeout, env=None, check=True, cwd=ROOT):
    """Runs a command to completion (killed after `timeout`); returns (rc, stdout, stderr)."""
    try:
        p = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{argv[0]} did not finish within {timeout}s") from e
    if check and p.returncode != 0:
        raise BenchError(f"{' '.join(map(str, argv))} failed ({p.returncode}):\n"
                         f"{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return p.returncode, p.stdout, p.stderr


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class Proc:
    """A long-running role (serve, relay, consume) or helper, logging to a file."""

    def __init__(self, name, argv, env, logfile):
        self.name = name
        self.logfile = logfile
        self._log = open(logfile, "wb")
        self.p = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=self._log,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  preexec_fn=_die_with_parent)
        self.pid = self.p.pid

    def alive(self):
        return self.p.poll() is None

    def log_text(self):
        try:
            return Path(self.logfile).read_text(errors="replace")
        except OSError:
            return ""

    def wait_for_log(self, pattern, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.log_text()):
                return
            if not self.alive():
                raise BenchError(f"{self.name} exited ({self.p.returncode}) before logging "
                                 f"{pattern!r}; see {self.logfile}")
            time.sleep(0.05)
        raise BenchError(f"{self.name} did not log {pattern!r} within {timeout}s; "
                         f"see {self.logfile}")

    def status_kib(self, field):
        """VmRSS / VmHWM (peak RSS) from /proc, in KiB."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        except OSError:
            pass
        return None

    def cpu_seconds(self):
        return proc_cpu_seconds(self.pid)

    def stop(self, timeout=40):
        """SIGTERM, then SIGKILL after `timeout` (consume gives in-flight work up to 30 s)."""
        if self.alive():
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name} ignored SIGTERM for {timeout}s; killing it")
                self.p.kill()
                self.p.wait(10)
        self._log.close()
        return self.p.returncode


CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid):
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0.0


def pids_named(comm):
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "comm").read_text().strip() == comm:
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def machine_ticks():
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = v[3] + v[4]
    return sum(v[:8]) - idle, sum(v[:8])


def proc_table():
    """pid -> (comm, ppid, cpu seconds, command line) of every process."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                comm = stat[stat.index("(") + 1:stat.rindex(")")]
                fields = stat.rsplit(")", 1)[1].split()
                cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, ValueError, IndexError):
                continue
            out[int(d.name)] = (comm, int(fields[1]), cpu, cmd.strip())
    return out


def foreign_cpu(t0, t1, db_prefix):
    """CPU seconds used between two proc_table()s by work that is not this bench's: processes
    outside the bench's process tree other than PostgreSQL's own processes, RabbitMQ and kernel
    threads, plus PostgreSQL backends serving databases that are not the bench's. (A process
    that started and ended between the two tables is not seen.) Returns (seconds, top names)."""
    mine = {os.getpid()}
    grew = True
    while grew:
        grew = False
        for pid, (_, ppid, _, _) in t1.items():
            if ppid in mine and pid not in mine:
                mine.add(pid)
                grew = True
    per = {}
    for pid, (comm, ppid, cpu, cmd) in t1.items():
        if pid in mine or pid == 2 or ppid == 2 or comm == "beam.smp" or not cmd:
            continue
        name = comm
        if comm == "postgres" and not cmd.startswith("postgres:"):
            continue  # the postmaster
        if cmd.startswith("postgres:"):
            # A client backend's title: "postgres: 15/main: USER DATABASE HOST(PORT) STATE".
            m = re.match(r"postgres: [^:]+: \S+ (\S+) \S+\(\d+\)", cmd)
            if not m or m.group(1).startswith(db_prefix) or m.group(1) == "postgres":
                continue  # the server's own processes, the bench's databases, monitoring
            name = f"postgres({m.group(1)[:12]})"
        before = t0.get(pid)
        d = cpu - before[2] if before and before[0] == comm else cpu
        if d > 0:
            per[name] = per.get(name, 0.0) + d
    top = sorted(per.items(), key=lambda kv: -kv[1])
    return sum(per.values()), top


def busy_sample(seconds, db_prefix):
    """How busy the machine is over `seconds` (0..1), and the work not the bench's meanwhile."""
    t0 = proc_table()
    m0 = machine_ticks()
    time.sleep(seconds)
    m1 = machine_ticks()
    t1 = proc_table()
    busy = (m1[0] - m0[0]) / max(m1[1] - m0[1], 1)
    _, top = foreign_cpu(t0, t1, db_prefix)
    return busy, [f"{c} {v / seconds:.0%}" for c, v in top[:4]]


class CpuMeter:
    """CPU use over one step: the machine as a whole (/proc/stat), each of the bench's own
    processes, RabbitMQ (beam.smp) and the load generator (the bench's waited children). What is
    left is mostly PostgreSQL (its backends come and go, so it is not counted directly)."""

    def __init__(self, procs, db_prefix):
        self.procs = procs
        self.db_prefix = db_prefix
        self.table0 = proc_table()
        self.rabbit = pids_named("beam.smp")
        self.t0 = time.monotonic()
        self.m0 = machine_ticks()
        self.p0 = {p.name: p.cpu_seconds() for p in procs}
        self.r0 = sum(proc_cpu_seconds(p) for p in self.rabbit)
        self.c0 = children_cpu()
        self.me0 = time.process_time()

    def stop(self, loadgen=True):
        wall = time.monotonic() - self.t0
        busy1, total1 = machine_ticks()
        busy = (busy1 - self.m0[0]) / CLK_TCK
        total = (total1 - self.m0[1]) / CLK_TCK
        out = {"wall_s": round(wall, 2), "machine_busy_pct": round(100 * busy / max(total, 1e-9), 1)}
        cores = os.cpu_count() or 1
        out["cores_busy"] = round(busy / max(wall, 1e-9), 2)
        known = 0.0
        for p in self.procs:
            s = p.cpu_seconds() - self.p0[p.name]
            out[f"{p.name}_cores"] = round(s / wall, 2)
            known += s
        r = sum(proc_cpu_seconds(p) for p in self.rabbit) - self.r0
        out["rabbitmq_cores"] = round(r / wall, 2)
        known += r
        c = children_cpu() - self.c0
        if loadgen:
            out["loadgen_cores"] = round(c / wall, 2)
            known += c
        me = time.process_time() - self.me0
        out["bench_py_cores"] = round(me / wall, 2)
        known += me
        out["rest_mostly_postgres_cores"] = round(max(busy - known, 0) / wall, 2)
        out["cores"] = cores
        foreign, top = foreign_cpu(self.table0, proc_table(), self.db_prefix)
        out["foreign_cores"] = round(foreign / wall, 2)
        out["foreign_top"] = [f"{c} {v / wall:.2f}" for c, v in top[:4]]
        return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# PostgreSQL through psql (the standard library has no PostgreSQL client)

class Psql:
    """One long-lived psql session for cheap repeated queries (polling)."""

    def __init__(self, url):
        self.p = subprocess.Popen(
            ["psql", "-X", "-q", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=0", "-d", url],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent)
        os.set_blocking(self.p.stderr.fileno(), False)
        self.buf = b""
        self.n = 0

    def query(self, sql, timeout=60):
        self.n += 1
        marker = f"__bench_end_{self.n}__".encode()
        self.p.stdin.write(sql.strip().rstrip(";").encode() + b";\n\\echo " + marker + b"\n")
        self.p.stdin.flush()
        fd = self.p.stdout.fileno()
        deadline = time.monotonic() + timeout
        while marker + b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"psql: no answer within {timeout}s to {sql[:80]!r}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise BenchError("psql exited")
                self.buf += chunk
        out, self.buf = self.buf.split(marker + b"\n", 1)
        try:
            err = self.p.stderr.read() or b""
        except (BlockingIOError, TypeError):
            err = b""
        if b"ERROR" in err:
            raise BenchError(f"psql: {err.decode(errors='replace').strip()} in {sql[:200]!r}")
        return [line.split("\t") for line in out.decode().splitlines() if line]

    def value(self, sql, timeout=60):
        rows = self.query(sql, timeout)
        return rows[0][0] if rows else None

    def close(self):
        if self.p.poll() is None:
            try:
                self.p.stdin.close()
                self.p.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.p.kill()
                self.p.wait(5)


class WaitSampler(threading.Thread):
    """Samples pg_stat_activity of one database 10 times a second: what its backends are doing
    or waiting on (the cheap, always-on profile of where PostgreSQL time goes)."""

    def __init__(self, url, db):
        super().__init__(daemon=True)
        self.psql = Psql(url)
        self.db = db
        self.stop_evt = threading.Event()
        self.counts = {}
        self.samples = 0

    def run(self):
        sql = ("SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU'), count(*) "
               f"FROM pg_stat_activity WHERE datname = '{self.db}' AND state = 'active' "
               "AND pid <> pg_backend_pid() GROUP BY 1")
        while not self.stop_evt.wait(0.1):
            try:
                rows = self.psql.query(sql, timeout=10)
            except BenchError:
                break
            self.samples += 1
            for what, n in rows:
                self.counts[what] = self.counts.get(what, 0) + int(n)

    def finish(self):
        self.stop_evt.set()
        self.join(15)
        self.psql.close()
        top = sorted(self.counts.items(), key=lambda kv: -kv[1])[:6]
        s = max(self.samples, 1)
        return {k: round(v / s, 2) for k, v in top}  # mean active backends per state


# --------------------------------------------------------------------------------------------
# the bench

def parse_wrk(stdout):
    for line in stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON "):])
    raise BenchError(f"wrk printed no BENCH_JSON line:\n{stdout[-2000:]}")


def parse_pgbench(stdout):
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", stdout)
    lat = re.search(r"latency average = ([\d.]+) ms", stdout)
    done = re.search(r"number of transactions actually processed: (\d+)", stdout)
    failed = re.search(r"number of failed transactions: (\d+)", stdout)
    if not (tps and lat and done):
        raise BenchError(f"cannot read pgbench's output:\n{stdout[-2000:]}")
    return {"tps": float(tps.group(1)), "latency_avg_ms": float(lat.group(1)),
            "transactions": int(done.group(1)),
            "failed": int(failed.group(1)) if failed else 0}


def fresh_release_binary():
    """True when target/release/async-pay is newer than every source it is built from: --quick
    then runs it (cargo confirms it is up to date in a second) instead of the debug build; a
    stale or missing one is never rebuilt by --quick (4.5 minutes here)."""
    binary = ROOT / "target" / "release" / "async-pay"
    if not binary.exists():
        return False
    built = binary.stat().st_mtime
    sources = [ROOT / "Cargo.toml", ROOT / "Cargo.lock", ROOT / "build.rs"]
    for d in ("src", "migrations"):
        sources += [f for f in (ROOT / d).rglob("*") if f.is_file()]
    return all(f.stat().st_mtime <= built for f in sources if f.exists())


M64 = (1 << 64) - 1


def gateway_delay(payment_id, lo=2.0, hi=5.0):
    """The simulated gateway's delay for a payment (src/gateway.rs `decide`: fastrand 2's wyrand
    seeded with the id's two 64-bit halves xored, first f64 draw), in seconds."""
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
    import heapq
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
    import heapq
    import random
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


def pct(values, p):
    if not values:
        return None
    s = sorted(values)
    k = min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


class Bench:
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.cfg = dict(QUICK if args.quick else FULL)
        self.profile = args.profile or ("release" if not args.quick or fresh_release_binary()
                                        else "debug")
        self.run_id = time.strftime("%Y%m%d%H%M%S") + f"_{os.getpid()}"
        self.prefix = f"bench_{self.run_id}"
        self.pg_base = args.pg_url.rstrip("/")
        self.amqp_url = args.amqp_url
        self.workdir = ROOT / "target" / "bench" / self.run_id
        self.workdir.mkdir(parents=True, exist_ok=True)
        names = f"bench.{self.run_id}"
        self.amqp = {
            "EXCHANGE": f"{names}.payments",
            "QUEUE": f"{names}.new",
            "ROUTING_KEY": f"{names}.new",
            "DEAD_LETTER_EXCHANGE": f"{names}.dlx",
            "DEAD_LETTER_QUEUE": f"{names}.dead",
        }
        self.probe_queue = f"{names}.probe"
        self.dbs = []
        self.procs = []
        self.r = {}  # every figure, by step
        self.notes = []
        self.binary = None
        self.amqp_tools = None

    # ---- plumbing

    def db_url(self, db):
        return f"{self.pg_base}/{db}"

    def admin_sql(self, sql, db="postgres", timeout=120):
        run(["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", self.db_url(db),
             "-c", sql], timeout=timeout)

    def env(self, db, **settings):
        """The roles' environment: built-in defaults (config.example.toml) except this run's
        database, queue and exchange names, plus `settings` (ASYNC_PAY__SECTION__KEY=value)."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("ASYNC_PAY") and k not in ("DATABASE_URL", "AMQP_URL")}
        env["RUST_LOG"] = "info"  # the default level, whatever the caller's shell says
        env["DATABASE_URL"] = self.db_url(db)
        env["AMQP_URL"] = self.amqp_url
        for k, v in self.amqp.items():
            env[f"ASYNC_PAY__AMQP__{k}"] = v
        for k, v in settings.items():
            env[f"ASYNC_PAY__{k}"] = str(v)
        return env

    def spawn(self, name, role, env):
        p = Proc(name, [str(self.binary), role], env, self.workdir / f"{name}.log")
        self.procs.append(p)
        return p

    def stop(self, p):
        rc = p.stop()
        self.procs.remove(p)
        if rc not in (0, -signal.SIGTERM):
            log(f"{p.name} exited with {rc}; see {p.logfile}")

    def create_db(self, suffix):
        db = f"{self.prefix}_{suffix}"
        self.dbs.append(db)
        # The brief's way: `async-pay migrate` creates the database and applies the migrations.
        run([str(self.binary), "migrate"], timeout=120, env=self.env(db))
        return db

    def start_serve(self, db):
        port = free_port()
        p = self.spawn(f"serve-{db.rsplit('_', 1)[1]}", "serve",
                       self.env(db, SERVER__BIND=f"127.0.0.1:{port}"))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return p, url
            except OSError:
                pass
            if not p.alive():
                raise BenchError(f"serve exited ({p.p.returncode}); see {p.logfile}")
            if time.monotonic() > deadline:
                raise BenchError(f"serve did not answer /health within 60s; see {p.logfile}")
            time.sleep(0.1)

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
                             stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
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

    def wait_until(self, what, fn, timeout, every=0.1):
        deadline = time.monotonic() + timeout
        while True:
            v = fn()
            if v:
                return v
            if time.monotonic() > deadline:
                raise BenchError(f"{what}: not reached within {timeout:.0f}s")
            for p in self.procs:
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
        sys.path.insert(0, str(BENCH))
        import amqp_tools
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
                "'max_connections', 'commit_delay')"))
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

    # ---- step 1

    def step1_ceiling(self):
        c = self.cfg
        log(f"1/6 ceiling: pgbench -M prepared -c {CLIENTS} -j 2 -T {c['pgbench_secs']}")
        db = self.create_db("pgbench")
        # A short warm-up so the first seconds of the measured run are not the cold start.
        self.pgbench(db, "create.sql", 1)
        self.wait_quiet("1 pgbench create")
        waits = WaitSampler(self.db_url("postgres"), db)
        waits.start()
        cpu = self.meter([])
        create = self.pgbench(db, "create.sql", c["pgbench_secs"])
        create["cpu"] = cpu.stop()
        self.check_disturbed("1 pgbench create", create["cpu"])
        create["waits"] = waits.finish()
        rows = 20_000
        psql = Psql(self.db_url(db))
        try:
            psql.query(
                "INSERT INTO payments (id, merchant, amount, currency, description, metadata, "
                "idempotency_key, request_fingerprint) "
                f"SELECT lpad(to_hex(i), 32, '0')::uuid, 'demo', 100.50, 'RUB', 'Order #123', "
                "'{\"order_id\": \"123\"}', 'pgb-get-' || i, sha256(('pgb-get-' || i)::bytea) "
                f"FROM generate_series(1, {rows}) i", timeout=120)
            psql.query("ANALYZE payments")
            table_rows = int(psql.value("SELECT count(*) FROM payments"))
        finally:
            psql.close()
        self.pgbench(db, "get.sql", 1, extra=("-D", f"rows={rows}"))
        self.wait_quiet("1 pgbench get")
        cpu = self.meter([])
        get = self.pgbench(db, "get.sql", c["pgbench_secs"], extra=("-D", f"rows={rows}"))
        get["cpu"] = cpu.stop()
        self.check_disturbed("1 pgbench get", get["cpu"])
        get["table_rows"] = table_rows
        self.r["pgbench"] = {"create": create, "get": get}
        log(f"   create: {create['tps']:,.0f} tx/s, avg {create['latency_avg_ms']:.2f} ms; "
            f"get: {get['tps']:,.0f} tx/s, avg {get['latency_avg_ms']:.2f} ms")
        self.drop_db(db)

    # ---- steps 2, 3, 6a

    def step2_3_api(self):
        c = self.cfg
        db = self.create_db("api")
        serve, url = self.start_serve(db)
        log(f"2/6 API create: wrk -t2 -c{CLIENTS}, {c['warmup_secs']} s warm-up, then {c['load_secs']} s")
        self.wrk("post.lua", url, c["warmup_secs"], [f"{self.run_id}-warm"])
        self.wait_quiet("2 API create")
        waits = WaitSampler(self.db_url("postgres"), db)
        waits.start()
        cpu = self.meter([serve])
        create = self.wrk("post.lua", url, c["load_secs"], [f"{self.run_id}-load"])
        create["cpu"] = cpu.stop()
        self.check_disturbed("2 API create", create["cpu"])
        create["waits"] = waits.finish()
        create["serve_peak_rss_kib"] = serve.status_kib("VmHWM")
        create["rps"] = create["answered"] / (create["duration_us"] / 1e6)
        psql = Psql(self.db_url(db))
        try:
            create["stored"] = int(psql.value(
                f"SELECT count(*) FROM payments WHERE idempotency_key LIKE '{self.run_id}-load-%'"))
            ids = [r[0] for r in psql.query(
                "SELECT id FROM payments ORDER BY random() LIMIT 20000")]
            create["table_rows"] = int(psql.value("SELECT count(*) FROM payments"))
        finally:
            psql.close()
        self.r["create"] = create
        log(f"   {create['rps']:,.0f} req/s, p50 {create['latency_us']['p50'] / 1000:.1f} ms, "
            f"p99 {create['latency_us']['p99'] / 1000:.1f} ms, non-202: {create['non_expected']}, "
            f"serve peak RSS {create['serve_peak_rss_kib'] / 1024:.1f} MiB")

        log(f"3/6 API get: wrk -t2 -c{CLIENTS} over {len(ids):,} payments, "
            f"{c['warmup_secs']} s warm-up, then {c['load_secs']} s")
        ids_file = self.workdir / "ids.txt"
        ids_file.write_text("\n".join(ids) + "\n")
        self.wrk("get.lua", url, c["warmup_secs"], [ids_file])
        self.wait_quiet("3 API get")
        cpu = self.meter([serve])
        get = self.wrk("get.lua", url, c["load_secs"], [ids_file])
        get["cpu"] = cpu.stop()
        self.check_disturbed("3 API get", get["cpu"])
        get["rps"] = get["answered"] / (get["duration_us"] / 1e6)
        get["serve_peak_rss_kib"] = serve.status_kib("VmHWM")
        self.r["get"] = get
        log(f"   {get['rps']:,.0f} req/s, p50 {get['latency_us']['p50'] / 1000:.1f} ms, "
            f"p99 {get['latency_us']['p99'] / 1000:.1f} ms, non-200: {get['non_expected']}")
        self.stop(serve)
        self.drop_db(db)

    # ---- step 4

    # the pipeline's database and processes, started on first use (so steps can run alone)

    ZERO_DELAY = dict(GATEWAY__MIN_DELAY="0s", GATEWAY__MAX_DELAY="0s")

    def pipe(self):
        if not hasattr(self, "pipe_db"):
            self.pipe_db = self.create_db("pipe")
            self.pipe_psql = Psql(self.db_url(self.pipe_db))
        return self.pipe_psql, self.pipe_db

    def pipe_relay(self):
        if getattr(self, "relay", None) is None:
            self.relay = self.spawn("relay", "relay", self.env(self.pipe()[1]))
            self.relay.wait_for_log(r"relay connected", 60)
        return self.relay

    def pipe_serve(self):
        if getattr(self, "serve", None) is None:
            self.serve, self.serve_url = self.start_serve(self.pipe()[1])
        return self.serve, self.serve_url

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

    def db_stats(self):
        return time.monotonic(), [int(x) for x in self.pipe_psql.query(self.DB_STATS)[0]]

    def db_stats_delta(self, before):
        """What the pipeline database did since `before` (PostgreSQL's cumulative statistics,
        which backends publish up to a second late), per second, plus index entries read per
        scan of the relay's index."""
        t0, v0 = before
        time.sleep(1.1)  # let the backends flush their statistics
        t1, v1 = self.db_stats()
        secs = max(t1 - t0 - 1.1, 1e-9)
        out = {f"{n}_per_s": round((b - a) / secs, 1) for n, a, b in zip(self.DB_STAT_NAMES, v0, v1)
               if not n.startswith("outbox_")}
        scans = v1[5] - v0[5]
        out["unpublished_idx_entries_per_scan"] = round((v1[6] - v0[6]) / scans, 1) if scans else None
        out["outbox_dead_tuples_at_end"] = v1[7]
        out["outbox_vacuums_during"] = v1[8] - v0[8]
        return out

    def pending(self):
        return int(self.pipe_psql.value("SELECT count(*) FROM payments WHERE status = 'pending'"))

    def unpublished(self):
        return int(self.pipe_psql.value("SELECT count(*) FROM outbox WHERE published_at IS NULL"))

    # ---- step 4a

    def step4_relay(self):
        """The relay's capacity, on a backlog (the POST rate could not feed it 5,000 events/s)."""
        n = self.cfg["relay_backlog"]
        psql, db = self.pipe()
        if getattr(self, "relay", None) is not None:
            raise BenchError("step 4a needs the relay stopped while the backlog is inserted")
        log(f"4/6 relay capacity: a backlog of {n:,} outbox events, one relay")
        psql.query("INSERT INTO outbox (event_type, payload) SELECT 'payment.created', "
                   "jsonb_build_object('payment_id', gen_random_uuid()) "
                   f"FROM generate_series(1, {n})", timeout=120)
        backlog_max = int(psql.value("SELECT max(id) FROM outbox"))
        self.wait_quiet("4 relay capacity")
        t_spawn = time.time()
        self.relay = relay = self.spawn("relay", "relay", self.env(db))
        cpu = self.meter([relay])
        self.wait_until("the backlog published", lambda: self.unpublished() == 0,
                        timeout=max(60, n / 200), every=0.05)
        t_done = time.time()
        relay_cpu = cpu.stop(loadgen=False)
        self.check_disturbed("4a relay capacity", relay_cpu)
        row = psql.query(
            "SELECT count(DISTINCT published_at), extract(epoch FROM min(published_at)), "
            "extract(epoch FROM max(published_at)), "
            "count(*) FILTER (WHERE published_at = (SELECT max(published_at) FROM outbox)) "
            f"FROM outbox WHERE id <= {backlog_max}")[0]
        batches, first, last, last_batch = int(row[0]), float(row[1]), float(row[2]), int(row[3])
        rate = (n - last_batch) / (last - first) if last > first else None
        self.r["relay"] = {
            "events": n, "batches": batches,
            "events_per_s": rate,
            "wall_s_including_start": round(t_done - t_spawn, 3),
            "cpu": relay_cpu,
        }
        log(f"   {rate or 0:,.0f} events/s over {batches} batches "
            f"({t_done - t_spawn:.2f} s from starting the relay to the last row published)")
        depth = self.wait_until("the backlog in the queue",
                                lambda: (d if (d := self.amqp_tools.queue_depth(
                                    self.amqp_url, self.amqp["QUEUE"])) >= n else None),
                                timeout=30, every=0.2)
        self.amqp_tools.purge(self.amqp_url, self.amqp["QUEUE"])
        self.r["relay"]["queue_depth_after"] = depth

    # ---- step 4b

    def step4_pipeline(self):
        """10,000 payments through the whole pipeline, zero gateway delay."""
        n = self.cfg["pipeline_n"]
        psql, db = self.pipe()
        relay = self.pipe_relay()
        serve, url = self.pipe_serve()
        log(f"4/6 pipeline: POST {n:,} payments (wrk -c{CLIENTS}), relay + consume, zero gateway delay")
        first_new = int(psql.value("SELECT count(*) FROM payments"))
        if first_new:
            raise BenchError("step 4b needs a database without payments")
        consume = self.spawn("consume", "consume", self.env(db, **self.ZERO_DELAY))
        consume.wait_for_log(r"consuming ", 60)
        self.wait_quiet("4 pipeline")
        cpu = self.meter([serve, relay, consume])
        stats0 = self.db_stats()
        post = self.wrk_quota(url, n, f"{self.run_id}-pipe", timeout=600)
        self.wait_until("every payment final", lambda: self.pending() == 0,
                        timeout=max(120, n / 50), every=0.1)
        pipe_cpu = cpu.stop()
        self.check_disturbed("4b pipeline", pipe_cpu)
        pipe_db = self.db_stats_delta(stats0)
        row = psql.query(
            "SELECT count(*), extract(epoch FROM min(created_at)), extract(epoch FROM max(created_at)), "
            "extract(epoch FROM max(processed_at)) FROM payments")[0]
        count, c0, c1, p1 = int(row[0]), float(row[1]), float(row[2]), float(row[3])
        post_s = c1 - c0
        final_s = p1 - c0
        self.r["pipeline"] = {
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
        self.consume_zero = consume

    # ---- step 4c

    def step4_latency(self):
        """Commit-to-broker latency at a steady 500 events/s."""
        secs = self.cfg["latency_secs"]
        psql, db = self.pipe()
        relay = self.pipe_relay()
        # No consumer during this step: the whole pipeline at 500 payments/s is more than this
        # machine's two cores do (step 4b's end-to-end rate), so with it the figure would measure
        # that overload instead of the relay. The payments are finalised after the measurement.
        if getattr(self, "consume_zero", None) is not None:
            self.stop(self.consume_zero)
            self.consume_zero = None
        log(f"4/6 commit-to-broker latency: pgbench -R {LATENCY_RATE} for {secs} s, "
            f"a probe queue bound to the exchange, no consumer")
        self.wait_quiet("4 commit-to-broker latency")
        before = int(psql.value("SELECT coalesce(max(id), 0) FROM outbox"))
        out = self.workdir / "probe.tsv"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(PYDEPS), env.get("PYTHONPATH", "")])
        probe = Proc("probe", [sys.executable, str(BENCH / "amqp_tools.py"), "probe", self.amqp_url,
                               self.amqp["EXCHANGE"], self.amqp["ROUTING_KEY"], self.probe_queue,
                               str(out), str(secs + 120)], env, self.workdir / "probe.log")
        self.procs.append(probe)
        probe.wait_for_log(r"^ready", 30)
        cpu = self.meter([relay, probe])
        stats0 = self.db_stats()
        # 32 clients so a slow commit never holds up the schedule (pgbench -R sends each
        # transaction at its scheduled time only when a client is free).
        log_prefix = self.workdir / "pgbench-latency"
        lat_pgb = self.pgbench(db, "create_timed.sql", secs, clients=CLIENTS, threads=1,
                               extra=("-R", str(LATENCY_RATE), "-D", "n=0", "-l",
                                      f"--log-prefix={log_prefix}"))
        self.wait_until("the latency events published", lambda: self.unpublished() == 0,
                        timeout=60, every=0.05)
        lat_cpu = cpu.stop()
        self.check_disturbed("4c commit-to-broker latency", lat_cpu)
        lat_db = self.db_stats_delta(stats0)
        # When each transaction's COMMIT was answered, from pgbench's per-transaction log
        # ("client transaction_no latency_us script epoch_s epoch_us [lag]").
        committed = {}
        for f in self.workdir.glob("pgbench-latency*"):
            for line in f.read_text().splitlines():
                c, n, _, _, sec, usec = line.split()[:6]
                committed[f"lat-{c}-{n}"] = int(sec) + int(usec) / 1e6
        rows = psql.query(
            "SELECT o.id, extract(epoch FROM o.created_at), p.idempotency_key FROM outbox o "
            "JOIN payments p ON p.id = (o.payload->>'payment_id')::uuid "
            f"WHERE o.id > {before}")
        created = {int(i): float(t) for i, t, _ in rows}
        commit_of = {int(i): committed.get(k) for i, _, k in rows}
        time.sleep(1.0)  # the probe's last deliveries
        self.stop(probe)
        seen = {}
        for line in out.read_text().splitlines():
            mid, t = line.split("\t")
            if mid.isdigit() and int(mid) in created:
                seen.setdefault(int(mid), float(t))  # first arrival counts
        lat_ms = [(seen[i] - commit_of[i]) * 1000 for i in seen if commit_of[i] is not None]
        with open(self.workdir / "latency.tsv", "w") as f:  # for a closer look: id, commit, arrival
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
            self.notes.append(f"commit-to-broker: {len(seen) - len(lat_ms)} events had no commit "
                              "time in pgbench's log")
        self.r["latency"] = {
            "events": len(created), "received": len(seen), "with_commit_time": len(lat_ms),
            "rate": lat_pgb["tps"], "pgbench_latency_avg_ms": lat_pgb["latency_avg_ms"],
            "steady_events": len(steady_ms),
            "p50_ms": pct(steady_ms, 50), "p90_ms": pct(steady_ms, 90),
            "p99_ms": pct(steady_ms, 99), "max_ms": max(steady_ms, default=None),
            "whole_run_ms": {"p50": pct(lat_ms, 50), "p99": pct(lat_ms, 99),
                             "min": min(lat_ms, default=None), "max": max(lat_ms, default=None)},
            "from_statement_start_ms": {"p50": pct(from_start_ms, 50), "p99": pct(from_start_ms, 99)},
            "cpu": lat_cpu,
            "db": lat_db,
        }
        if len(seen) < len(created):
            self.notes.append(f"commit-to-broker: the probe missed {len(created) - len(seen)} of "
                              f"{len(created)} events")
        log(f"   {len(seen):,} events at {lat_pgb['tps']:.0f}/s: steady p50 {pct(steady_ms, 50) or 0:.1f} ms, "
            f"p99 {pct(steady_ms, 99) or 0:.1f} ms, max {max(steady_ms, default=0):.1f} ms "
            f"(whole run p99 {pct(lat_ms, 99) or 0:.1f} ms)")
        consume = self.spawn("consume", "consume", self.env(db, **self.ZERO_DELAY))
        self.wait_until("every payment final", lambda: self.pending() == 0, timeout=300, every=0.2)
        self.stop(consume)

    # ---- steps 5, 6b

    def step5_consumer(self):
        n = self.cfg["consumer_n"]
        psql, db = self.pipe()
        self.pipe_relay()
        _, url = self.pipe_serve()
        if getattr(self, "consume_zero", None) is not None:
            self.stop(self.consume_zero)
            self.consume_zero = None
        log(f"5/6 consumer: {n:,} payments queued, then one consume with prefetch "
            f"{PREFETCH_STEP5} and the default 2-5 s gateway")
        self.wrk_quota(url, n, f"{self.run_id}-cons", timeout=300)
        n = self.pending()
        self.wait_until("the payments published", lambda: self.unpublished() == 0,
                        timeout=120, every=0.1)
        self.wait_until("the payments in the queue",
                        lambda: self.amqp_tools.queue_depth(self.amqp_url, self.amqp["QUEUE"]) >= n,
                        timeout=30, every=0.2)
        self.wait_quiet("5 consumer")
        t0 = time.time()
        consume = self.spawn("consume5", "consume", self.env(db, AMQP__PREFETCH=PREFETCH_STEP5))
        cpu = self.meter([consume])
        peak_in_flight = 0
        deadline = time.monotonic() + max(120, n / 20)
        while True:
            row = psql.query("SELECT count(*) FILTER (WHERE status = 'pending'), "
                             "count(*) FILTER (WHERE claim_token IS NOT NULL) FROM payments")[0]
            pending, claimed = int(row[0]), int(row[1])
            peak_in_flight = max(peak_in_flight, claimed)
            if pending == 0:
                break
            if time.monotonic() > deadline or not consume.alive():
                raise BenchError(f"consumer step: {pending} payments still pending; see {consume.logfile}")
            time.sleep(0.1)
        cons_cpu = cpu.stop(loadgen=False)
        self.check_disturbed("5 consumer", cons_cpu)
        peak = consume.status_kib("VmHWM")
        row = psql.query(
            "SELECT extract(epoch FROM min(processed_at)), extract(epoch FROM max(processed_at)), "
            "extract(epoch FROM percentile_disc(0.1) WITHIN GROUP (ORDER BY processed_at)), "
            "extract(epoch FROM percentile_disc(0.9) WITHIN GROUP (ORDER BY processed_at)) "
            f"FROM payments WHERE processed_at >= to_timestamp({t0})")[0]
        first, last, p10, p90 = map(float, row)
        elapsed = last - t0
        # Where the time beyond the gateway's own delays went: each payment's gateway call began
        # at processed_at - its delay (the delay is a function of the id), so the overhead of
        # the consumer shows as the gap between those starts and the ideal schedule.
        done = psql.query("SELECT id, extract(epoch FROM processed_at) FROM payments "
                          f"WHERE processed_at >= to_timestamp({t0}) ORDER BY created_at, id")
        delays = [gateway_delay(i) for i, _ in done]
        starts = sorted(float(t) - d - t0 for (_, t), d in zip(done, delays))
        exact = makespan(delays, PREFETCH_STEP5)
        first_wave = starts[:PREFETCH_STEP5]
        # The best any consumer could do with this many in flight, from the gateway's delays alone.
        ideal = simulate_makespan(n, PREFETCH_STEP5, 2.0, 5.0)
        self.r["consumer"] = {
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
            f"(a zero-overhead consumer with {PREFETCH_STEP5} in flight: {exact:.2f} s, "
            f"{n / exact:,.0f}/s; first gateway calls began {first_wave[0]:.3f}..{first_wave[-1]:.3f} s "
            f"after the start); up to {peak_in_flight} in flight; peak RSS {peak / 1024:.1f} MiB")
        self.stop(consume)

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
                p.stop(timeout=40)
            except Exception as e:  # noqa: BLE001 - cleanup goes on whatever happens
                log(f"stopping {p.name}: {e}")
                try:
                    p.p.kill()
                except OSError:
                    pass
        self.procs.clear()
        for attr in ("pipe_psql",):
            if hasattr(self, attr):
                getattr(self, attr).close()
        for db in list(self.dbs):
            self.drop_db(db)
        if self.amqp_tools is not None:
            try:
                failed = self.amqp_tools.delete(
                    self.amqp_url,
                    [self.amqp["QUEUE"], self.amqp["DEAD_LETTER_QUEUE"], self.probe_queue],
                    [self.amqp["EXCHANGE"], self.amqp["DEAD_LETTER_EXCHANGE"]])
                for f in failed:
                    log(f"could not delete {f}")
            except Exception as e:  # noqa: BLE001
                log(f"could not delete the run's queues/exchanges: {e}")
        log(f"cleaned up (logs of this run: {self.workdir.relative_to(ROOT)})")

    # ---- report

    def table(self):
        r = self.r
        rows = []

        def status(ok):
            if ok is None:
                return "n/a"
            return "met" if ok else "MISSED"

        pgc, pgg = r.get("pgbench", {}).get("create"), r.get("pgbench", {}).get("get")
        if pgc:
            rows.append(("1", "ceiling: pgbench, payment + outbox INSERT (one statement)",
                         f"{pgc['tps']:,.0f} tx/s, avg {pgc['latency_avg_ms']:.2f} ms", "(reference)", ""))
        if pgg:
            rows.append(("1", "ceiling: pgbench, the GET statement (primary key + newest webhook)",
                         f"{pgg['tps']:,.0f} tx/s, avg {pgg['latency_avg_ms']:.2f} ms", "(reference)", ""))
        cr = r.get("create")
        if cr:
            share = cr["rps"] / pgc["tps"] if pgc else None
            rows.append(("2", "create, requests/s",
                         f"{cr['rps']:,.0f}/s = {share:.0%} of ceiling" if share else f"{cr['rps']:,.0f}/s",
                         ">= 50 % of the ceiling", status(share >= 0.5 if share else None)))
            lim = 4 * pgc["latency_avg_ms"] if pgc else None
            p99 = cr["latency_us"]["p99"] / 1000
            rows.append(("2", f"create p99 at {CLIENTS} connections",
                         f"{p99:.1f} ms (p50 {cr['latency_us']['p50'] / 1000:.1f} ms)",
                         f"<= 4x pgbench avg = {lim:.1f} ms" if lim else "<= 4x pgbench avg",
                         status(p99 <= lim if lim else None)))
            bad = cr["non_expected"] + cr["errors"]["connect"] + cr["errors"]["read"] + \
                cr["errors"]["write"] + cr["errors"]["timeout"]
            rows.append(("2", "create, non-202 responses + socket errors",
                         f"{bad} of {cr['answered']:,}", "0", status(bad == 0)))
        g = r.get("get")
        if g:
            share = g["rps"] / pgg["tps"] if pgg else None
            bad = g["non_expected"] + g["errors"]["timeout"] + g["errors"]["read"]
            rows.append(("3", "get, requests/s",
                         (f"{g['rps']:,.0f}/s = {share:.0%} of ceiling" if share else f"{g['rps']:,.0f}/s")
                         + f" (p50 {g['latency_us']['p50'] / 1000:.1f} ms, p99 "
                           f"{g['latency_us']['p99'] / 1000:.1f} ms, non-200 {bad})",
                         ">= 50 % of the ceiling", status(share >= 0.5 if share else None)))
        rl = r.get("relay")
        if rl:
            ok = rl["events_per_s"] >= 5000 if rl["events_per_s"] else None
            rows.append(("4", "relay, sustained events/s",
                         f"{rl['events_per_s'] or 0:,.0f}/s ({rl['events']:,} events, "
                         f"{rl['batches']} batches)", ">= 5,000", status(ok)))
        lt = r.get("latency")
        if lt and lt["p99_ms"] is not None:
            rows.append(("4", f"commit-to-broker p99 at {LATENCY_RATE} events/s",
                         f"{lt['p99_ms']:.1f} ms (p50 {lt['p50_ms']:.1f}, max {lt['max_ms']:.1f}; "
                         f"{lt['steady_events']:,} events at {lt['rate']:.0f}/s, first and last "
                         f"second left out; whole run p99 {lt['whole_run_ms']['p99']:.1f} ms)",
                         "<= 20 ms",
                         status(lt["p99_ms"] <= 20)))
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
                         f"{PREFETCH_STEP5} in flight, same payments: "
                         f"{cs['payments'] / cs['ideal_elapsed_these_delays_s']:,.0f}/s)",
                         ">= 200 payments/s per process",
                         status(cs["per_s"] >= 200)))
        if cr and cr.get("serve_peak_rss_kib"):
            mib = cr["serve_peak_rss_kib"] / 1024
            rows.append(("6", "serve peak RSS during (2)", f"{mib:.1f} MiB", "<= 32 MiB",
                         status(mib <= 32)))
        if cs and cs.get("consume_peak_rss_kib"):
            mib = cs["consume_peak_rss_kib"] / 1024
            rows.append(("6", f"consume peak RSS during (5), prefetch {PREFETCH_STEP5}",
                         f"{mib:.1f} MiB", "<= 64 MiB", status(mib <= 64)))
        return rows

    def render(self, command, started, elapsed):
        rows = self.table()
        head = ("| step | what | measured | target | status |", "|---|---|---|---|---|")
        body = [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in rows]
        m = self.r.get("machine", {})
        lines = [f"# async-pay bench, {started:%Y-%m-%d %H:%M} UTC", ""]
        if self.quick:
            lines += ["**Quick run** (`--quick`, a few seconds a step, "
                      f"{self.profile} build): it checks that the bench runs; its figures are not "
                      "measurements and the status column means nothing.", ""]
        lines += [f"Command: `{command}` ({elapsed:.0f} s)", "", "## Machine", ""]
        lines += [f"- {k}: {v}" for k, v in m.items()]
        lines += ["- shared: the load generator, the service, PostgreSQL and RabbitMQ all run on "
                  "these cores", "", "## Results", "", *head, *body, ""]
        if self.notes:
            lines += ["## Notes", "", *[f"- {n}" for n in self.notes], ""]
        lines += ["## How each figure is measured", "", METHOD.strip(), "",
                  "## Raw figures", "",
                  "CPU is in cores busy on average over the step (`rest_mostly_postgres` = machine "
                  "total minus every process counted by name); `waits` = mean number of the "
                  "database's active backends in each wait state (CPU = not waiting), sampled 10 "
                  "times a second from pg_stat_activity.", "",
                  "```json", json.dumps({k: v for k, v in self.r.items() if k != "machine"},
                                        indent=1, default=str), "```", ""]
        return "\n".join(lines), rows


METHOD = """
1. **Ceiling**: `pgbench -n -M prepared -c 32 -j 2 -T 15` on a scratch database migrated by
   `async-pay migrate` (so the outbox trigger is there). `bench/pgbench/create.sql` runs the very
   statement of `insert_with_event` (payment INSERT + outbox INSERT in one CTE, one implicit
   transaction, `synchronous_commit` on); `bench/pgbench/get.sql` the statement of
   `view_for_merchant` (the payment by primary key with its newest webhook delivery), over
   20,000 loaded payments plus those of the create run.
2. **API create**: `serve` (built-in defaults: 2 workers, pool 16) on its own database; wrk
   `-t2 -c32` with `bench/wrk/post.lua` (a unique Idempotency-Key per request), a warm-up run, then
   the measured run. Requests/s = answered requests / wrk's duration; p50/p99 from wrk's
   histogram; every status other than 202 and every socket error is counted.
3. **API get**: the same `serve`, wrk over 20,000 random ids of the payments of step 2.
4. **Relay** (fresh database): a backlog of outbox events is inserted with the relay stopped, then
   one relay drains it. events/s = events published between the first and the last batch /
   the time between their `published_at` (each batch stamps its transaction's start), so the
   process start is not counted. **Pipeline**: `serve` + the relay + one `consume` with zero gateway
   delay; wrk posts the payments at full speed (each thread stops after its share); POST time =
   last `created_at` - first `created_at`, final time = last `processed_at` - first `created_at`
   (all database clock). **Commit-to-broker**: `pgbench -R 500 -c 32` runs the create statement
   at a steady (Poisson) 500 commits/s with the relay running and no consumer (the whole pipeline
   at 500 payments/s is more than two cores do, see the pipeline's rate, so the consumer would
   turn this into a measurement of that overload); a probe quorum queue bound to the exchange
   receives a copy of each event, and a probe consumer notes the wall-clock arrival of each
   (message id = outbox id). The script is `create.sql` with idempotency keys `lat-CLIENT-N`
   (`bench/pgbench/create_timed.sql`), so each row is matched to its transaction in pgbench's
   per-transaction log (`-l`), which says when the client got the COMMIT's answer. Latency =
   arrival - that moment: commit to broker, the commit's own duration not included (the raw
   figures also give it from the statement's start, `created_at`). The headline leaves out the
   events of pgbench's first and last second (connections opening and closing; its log times are
   off there, a few events even "arrive" before their logged commit); the whole run's p99 is
   given beside it. A quorum queue hands a
   message to consumers once it is committed to its log, the moment the relay's confirm becomes
   possible.
5. **Consumer**: payments are posted and published with no consumer running, then one `consume`
   (`ASYNC_PAY__AMQP__PREFETCH=1000`, default 2-5 s gateway) starts. payments/s = payments / (last
   `processed_at` - the moment the process was started), so its start-up is counted. The
   gateway's delay is a function of the payment id, so the bench also computes what a consumer
   with no overhead at all would take for the same payments with 1,000 in flight (the bound
   for this figure: 2,000 payments of 2-5 s in 1,000 slots take about 9.8 s, about 204/s), and
   when each payment's gateway call began (`processed_at` - its delay).
6. **Memory**: `VmHWM` (peak resident set) of `serve` right after step 2's measured run (it
   started fresh for step 2, so this covers warm-up and load) and of the step 5 `consume` once
   every payment is final.
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="a few seconds a step, debug build (CI); figures are not measurements")
    ap.add_argument("--profile", choices=("debug", "release"),
                    help="which build to run (default: release; with --quick the release binary "
                    "if it is newer than the sources, else the debug build)")
    ap.add_argument("--out", help="where to write the results (default: bench/results/<date>.md, "
                    "or target/bench/results/<date>-quick.md with --quick)")
    ap.add_argument("--pg-url", default=os.environ.get("BENCH_PG_URL", "postgres://postgres@127.0.0.1:5432"),
                    help="PostgreSQL server URL without a database (env BENCH_PG_URL)")
    ap.add_argument("--amqp-url", default=os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
                    help="RabbitMQ URL (env BENCH_AMQP_URL)")
    ap.add_argument("--steps", default="1,2,4,5",
                    help="which steps to run (default all: 1,2,4,5; 2 includes 3 and 4 is 4a,4b,4c)")
    ap.add_argument("--binary", help="run this async-pay binary (no build), e.g. to compare "
                    "two versions")
    ap.add_argument("--no-build", action="store_true",
                    help="run the binary already in target/<profile>/ instead of building first")
    ap.add_argument("--wait-idle", type=float, default=None,
                    help="seconds to wait for an idle machine before each step (default 300, "
                    "quick 0); past it the step runs anyway and the results say so")
    args = ap.parse_args()
    if args.wait_idle is None:
        args.wait_idle = 0 if args.quick else 300

    def interrupted(signum, _frame):
        raise Interrupted(signal.Signals(signum).name)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, interrupted)

    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.monotonic()
    bench = Bench(args)
    command = "just bench" + (" --quick" if args.quick else "")
    if args.profile:
        command += f" --profile {args.profile}"
    failure = None
    try:
        bench.setup()
        steps = {"1": bench.step1_ceiling, "2": bench.step2_3_api, "4a": bench.step4_relay,
                 "4b": bench.step4_pipeline, "4c": bench.step4_latency, "5": bench.step5_consumer}
        wanted = [x.strip() for x in args.steps.split(",") if x.strip()]
        wanted = [y for x in wanted for y in (["4a", "4b", "4c"] if x == "4" else [x])]
        for x in wanted:
            if x not in steps:
                raise BenchError(f"unknown step {x!r} (steps: 1, 2, 4, 4a, 4b, 4c, 5; 2 includes 3)")
        for name, fn in steps.items():
            if name in wanted:
                fn()
    except (BenchError, Interrupted, Exception) as e:  # noqa: BLE001 - report, clean up, exit 1
        failure = e
        log(f"FAILED: {type(e).__name__}: {e}")
    finally:
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)  # let the cleanup finish
        bench.cleanup()
    if failure is not None:
        bench.notes.append(f"the run FAILED: {type(failure).__name__}: {failure}")

    text, rows = bench.render(command, started, time.monotonic() - t0)
    if args.out:
        out = Path(args.out)
    elif args.quick:
        out = ROOT / "target" / "bench" / "results" / f"{started:%Y-%m-%d}-quick.md"
    else:
        out = BENCH / "results" / f"{started:%Y-%m-%d}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)

    widths = [max(len(str(r[i])) for r in rows + [("step", "what", "measured", "target", "status")])
              for i in range(5)]
    print()
    for r in [("step", "what", "measured", "target", "status")] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print(f"\nwritten to {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    if bench.quick:
        print("(quick run: checks that the bench runs; the figures are not measurements)")
    return 1 if failure is not None else 0


if __name__ == "__main__":
    sys.exit(main())
