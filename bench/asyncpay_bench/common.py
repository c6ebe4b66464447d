"""What every step uses: logging, errors, child processes, CPU accounting, psql, parsing."""

import ctypes
import math
import os
import re
import resource
import select
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
BENCH = ROOT / "bench"
PACKAGE = Path(__file__).resolve().parent
PYDEPS = ROOT / "target" / "bench" / "pydeps"
PIKA = "pika==1.3.2"

API_KEY = "secret-api-key"  # the built-in demo merchant of config.example.toml
CLIENTS = 32  # connections of the load generator and clients of pgbench (issue 6)
PREFETCH = 1000  # payments in flight in the consumer steps (issue 6: "1,000 in flight")
ZERO_DELAY = dict(GATEWAY__MIN_DELAY="0s", GATEWAY__MAX_DELAY="0s")


class BenchError(Exception):
    pass


class Skipped(Exception):
    """A step that cannot run with this binary or machine; the report says why."""


class Interrupted(BaseException):
    pass


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pct(values, p):
    if not values:
        return None
    s = sorted(values)
    k = min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# processes

_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def die_with_parent():
    """preexec_fn: the child gets SIGKILL when the bench dies, however it dies."""
    _libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def run(argv, timeout, env=None, check=True, cwd=ROOT):
    """Runs a command to completion (killed after `timeout`); returns (rc, stdout, stderr)."""
    try:
        p = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{argv[0]} did not finish within {timeout}s") from e
    if check and p.returncode != 0:
        raise BenchError(f"{' '.join(map(str, argv))} failed ({p.returncode}):\n"
                         f"{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return p.returncode, p.stdout, p.stderr


def python_env():
    """The environment for a Python helper of this package run as its own process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(BENCH), str(PYDEPS),
                                                    env.get("PYTHONPATH", "")) if p)
    return env


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
                                  preexec_fn=die_with_parent)
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
            m = re.search(pattern, self.log_text(), re.M)
            if m:
                return m
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
            out[f"{p.name}_cores"] = round(s / wall, 3)
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
        table1 = proc_table()
        foreign, top = foreign_cpu(self.table0, table1, self.db_prefix)
        # Other work on the machine is not PostgreSQL's work for the bench: left out of the rest.
        out["rest_mostly_postgres_cores"] = round(max(busy - known - foreign, 0) / wall, 3)
        out["bench_db_backends_cores"] = round(self.backends(table1) / wall, 3)
        out["cores"] = cores
        out["foreign_cores"] = round(foreign / wall, 2)
        out["foreign_top"] = [f"{c} {v / wall:.2f}" for c, v in top[:4]]
        return out

    def backends(self, table1):
        """CPU seconds of the PostgreSQL backends serving the bench's databases that lived
        through the whole step (the relay's and the roles' pooled connections)."""
        total = 0.0
        for pid, (comm, _, cpu, cmd) in table1.items():
            m = re.match(r"postgres: [^:]+: \S+ (\S+) ", cmd)
            before = self.table0.get(pid)
            if comm == "postgres" and m and m.group(1).startswith(self.db_prefix) and before:
                total += cpu - before[2]
        return total


# --------------------------------------------------------------------------------------------
# PostgreSQL through psql (the standard library has no PostgreSQL client)

class Psql:
    """One long-lived psql session for cheap repeated queries (polling)."""

    def __init__(self, url):
        self.p = subprocess.Popen(
            ["psql", "-X", "-q", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=0", "-d", url],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            preexec_fn=die_with_parent)
        os.set_blocking(self.p.stderr.fileno(), False)
        self.buf = b""
        self.n = 0

    def text(self, sql, timeout=60):
        """Runs statements (several may be given, `;`-separated) and returns their raw output."""
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
        return out.decode()

    def query(self, sql, timeout=60):
        return [line.split("\t") for line in self.text(sql, timeout).splitlines() if line]

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
# parsing the tools' output

def parse_wrk(stdout):
    import json
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
