#!/usr/bin/env python3
"""The monitoring setup against a real Prometheus (`just prometheus-check`; CI runs it).

Static checks:
  - promtool check config / check rules / test rules on deploy/prometheus/;
  - every alert has a `summary` and a `runbook`, a unit test that fires it and one that expects it
    silent; every `async-pay …` command a runbook names exists in the binary;
  - the Grafana dashboard's panels use the provisioned datasource, and compose.yaml mounts the
    files where the provisioning expects them.

A live run: the real binary, one process per role (serve, relay, consume, dlq-watch) against a
database and queue names of their own, each non-HTTP role with metrics.bind on a free port, and
Debian's Prometheus server on a free port with its own data directory, scraping them with the jobs
of deploy/prometheus/prometheus.yml (targets rewritten to the local ports, scraped every second)
and evaluating alerts.yml. A few payments (webhooks to a local receiver) and one poison message
published to the dead-letter exchange go through. Then, through Prometheus' HTTP API: every
target is up; every metric of README's Metrics table has a series, and the pipeline's counts
arrived; every expression of the rules and of the dashboard evaluates without an error and names
only documented metrics; the dead-letter alert fires and no other alert is active; a stopped role
makes AsyncPayTargetDown pending. Every process it started is stopped and the database and queues
are dropped, also on failure or Ctrl-C.

Installs Debian's `prometheus` package if promtool or prometheus is missing (its service is not
started), and pika (AMQP client, for the poison message) as bench.py does. The binary is
ASYNC_PAY_BIN, else target/debug/async-pay (built if missing). Needs the local PostgreSQL
(CHECK_DATABASE_URL, default postgres://postgres@127.0.0.1:5432) and RabbitMQ (AMQP_URL).
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PROM_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
README = ROOT / "README.md"
ROLES = ("serve", "relay", "consume", "dlq-watch")
API_KEY = "secret-api-key"  # the built-in demo merchant
PAYMENTS = 6


# What the short run must have left in Prometheus, beyond "a series exists": the counts of the
# pipeline itself (every role exports every metric, most at 0, so a series alone proves little).
PIPELINE_FACTS = (
    (f'sum(async_pay_payments_total{{result="created"}}) >= {PAYMENTS}', "payments created (serve)"),
    (f'sum(async_pay_relay_messages_total{{job="relay", result="confirmed"}}) >= {PAYMENTS}',
     "events confirmed (relay)"),
    (f'sum(async_pay_consumer_messages_total{{job="consume", outcome=~"succeeded|failed"}}) >= {PAYMENTS}',
     "payments finalised (consume)"),
    (f'sum(async_pay_webhook_attempts_total{{job="consume", result="delivered"}}) >= {PAYMENTS}',
     "webhooks delivered (consume)"),
    ('sum(async_pay_dead_letters_total{job="dlq-watch"}) >= 1', "the dead letter (dlq-watch)"),
)
# Grafana's variables, replaced before an expression is sent to Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "30s", "$__interval": "15s", "$__range": "5m"}

started_at = time.monotonic()


class CheckFailed(Exception):
    pass


def log(msg):
    print(f"[{time.monotonic() - started_at:5.1f}s] {msg}", flush=True)


def fail(msg):
    raise CheckFailed(msg)


def run(argv, **kw):
    r = subprocess.run(argv, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        fail(f"{' '.join(map(str, argv))} exited {r.returncode}:\n{r.stdout}{r.stderr}")
    return r.stdout


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def eventually(what, fn, timeout, every=0.25):
    """Polls fn until it returns something truthy; fails naming `what` and fn's last answer."""
    deadline = time.monotonic() + timeout
    while True:
        ok, last = fn()
        if ok:
            return last
        if time.monotonic() > deadline:
            fail(f"{what}: not within {timeout:.0f}s; last: {last}")
        time.sleep(every)


# ------------------------------------------------------------------------------------ tools

def ensure_prometheus():
    if shutil.which("promtool") and shutil.which("prometheus"):
        return
    log("installing Debian's prometheus package (promtool and the server; its service stays off)")
    # No init script may start the packaged server (it would take port 9090); Debian's
    # invoke-rc.d asks policy-rc.d. Recommends are skipped: prometheus-node-exporter would
    # start on port 9100.
    policy = Path("/usr/sbin/policy-rc.d")
    ours = not policy.exists()
    if ours:
        policy.write_text("#!/bin/sh\n# scripts/prometheus-check.py: start no service\nexit 101\n")
        policy.chmod(0o755)
    try:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run(["apt-get", "update", "-qq"], env=env)
        run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"], env=env)
    finally:
        if ours:
            policy.unlink()


def import_pika():
    """pika from the environment, else installed as bench.py installs it (target/bench/pydeps)."""
    try:
        import pika  # noqa: F401
    except ImportError:
        pydeps = ROOT / "target" / "bench" / "pydeps"
        if not (pydeps / "pika").exists():
            log("installing pika from PyPI into target/bench/pydeps")
            run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                 "--target", str(pydeps), "pika==1.3.2"])
        sys.path.insert(0, str(pydeps))
    sys.path.insert(0, str(ROOT / "bench"))
    from asyncpay_bench import amqp_tools
    return amqp_tools


def binary():
    explicit = os.environ.get("ASYNC_PAY_BIN")
    path = Path(explicit) if explicit else ROOT / "target" / "debug" / "async-pay"
    if not path.exists():
        if explicit:
            fail(f"ASYNC_PAY_BIN={explicit} does not exist")
        log("building target/debug/async-pay")
        run(["cargo", "build", "--quiet", "--bin", "async-pay"], cwd=ROOT)
    return path.resolve()


# ------------------------------------------------------------------------------------ static

def documented_metrics():
    """{name: type} from README's Metrics table."""
    text = README.read_text()
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `(async_pay_\w+)` \| (\w+) \|", section, re.M))
    if not rows:
        fail("README.md: no metric rows found in its Metrics table")
    return rows


def alert_rules():
    doc = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def dashboard_targets():
    """(panel title, expr) of every query of every dashboard."""
    out = []

    def walk(panels):
        for p in panels:
            walk(p.get("panels", []))
            for t in p.get("targets", []):
                out.append((p.get("title", "?"), t["expr"]))

    for f in sorted((GRAFANA_DIR / "dashboards").glob("*.json")):
        walk(json.loads(f.read_text())["panels"])
    return out


def grafana_to_promql(expr):
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    if "$" in expr:
        fail(f"a dashboard query uses a Grafana variable this check does not know: {expr}")
    return expr


def referenced_metrics(expr, documented):
    names = set()
    for name in re.findall(r"\basync_pay_[a-z0-9_]+", expr):
        base = re.sub(r"_(bucket|count|sum)$", "", name)
        names.add(base if base != name and base in documented else name)
    return names


def datasources():
    return [d for f in sorted((GRAFANA_DIR / "provisioning" / "datasources").glob("*.yml"))
            for d in yaml.safe_load(f.read_text())["datasources"]]


def check_alert_rules(bin_path):
    """Every alert: summary and runbook, a unit test that fires it and one that expects it
    silent; every `async-pay …` command a runbook names is one the binary accepts."""
    fires, silent = set(), set()
    for t in yaml.safe_load((PROM_DIR / "alerts.test.yml").read_text())["tests"]:
        for case in t.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else silent).add(case["alertname"])
    problems, commands = [], set()
    alerts = [r for r in alert_rules() if "alert" in r]
    for r in alerts:
        name, ann = r["alert"], r.get("annotations", {})
        for key in ("summary", "runbook"):
            if not ann.get(key, "").strip():
                problems.append(f"{name} has no {key} annotation")
        if name not in fires:
            problems.append(f"{name} has no unit test that fires it (alerts.test.yml)")
        if name not in silent:
            problems.append(f"{name} has no unit test that expects it silent (alerts.test.yml)")
        commands |= set(re.findall(r"`async-pay ([^`]+)`", ann.get("runbook", "")))
    for cmd in sorted(commands):
        # Placeholders (`dlq replay ID`) are the reader's to fill in.
        words = [w for w in cmd.split() if not w.isupper()]
        r = subprocess.run([bin_path, *words, "--help"], capture_output=True, text=True)
        if r.returncode != 0:
            problems.append(f"a runbook names `async-pay {cmd}`, which the binary refuses: "
                            f"{r.stderr.strip()}")
    log(f"{len(alerts)} alerts, each with summary, runbook, a firing and a silent unit test; "
        f"runbook commands: {', '.join(sorted(commands))}")
    return problems


def check_dashboards():
    """Every panel and query asks a provisioned datasource; panel ids are unique."""
    uids = {d["uid"] for d in datasources()}
    problems = []
    for f in sorted((GRAFANA_DIR / "dashboards").glob("*.json")):
        ids = []

        def walk(panels):
            for p in panels:
                ids.append(p["id"])
                walk(p.get("panels", []))
                if p["type"] == "row":
                    continue
                for ds in [p.get("datasource")] + [t.get("datasource") for t in p["targets"]]:
                    if not ds or ds.get("uid") not in uids:
                        problems.append(f"{f.name}: panel {p['title']!r} uses datasource {ds}, "
                                        f"not one of the provisioned {sorted(uids)}")

        walk(json.loads(f.read_text())["panels"])
        if len(ids) != len(set(ids)):
            problems.append(f"{f.name}: panel ids repeat")
    return problems


def check_compose_mounts():
    """compose.yaml mounts the files where Prometheus and Grafana's provisioning look for them,
    and the datasource names the Prometheus service."""
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    providers = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "dashboards" / "async-pay.yml").read_text())["providers"]
    expected = {
        "prometheus": {"/etc/prometheus": "./deploy/prometheus"},
        "grafana": {"/etc/grafana/provisioning": "./deploy/grafana/provisioning",
                    providers[0]["options"]["path"]: "./deploy/grafana/dashboards"},
    }
    problems = []
    for service, want in expected.items():
        have = {v.split(":")[1]: v.split(":")[0] for v in compose[service].get("volumes", [])}
        for target, source in want.items():
            if have.get(target) != source:
                problems.append(f"compose.yaml: {service} should mount {source} at {target}")
    for d in datasources():
        host = urllib.parse.urlparse(d["url"]).hostname
        if host not in compose:
            problems.append(f"Grafana datasource {d['name']} points at {host}, no compose service")
    return problems


def check_metric_references(documented):
    """Every metric a rule or a panel names is in README's table."""
    problems = []
    for where, expr in [(f"rule {r.get('alert')}", r["expr"]) for r in alert_rules()] + \
                       [(f"panel {t!r}", e) for t, e in dashboard_targets()]:
        for name in referenced_metrics(expr, documented) - set(documented):
            problems.append(f"{where} uses {name}, which README's Metrics table does not list")
    return problems


def static_checks(bin_path, documented):
    log("promtool check config / check rules / test rules")
    print(run(["promtool", "check", "config", PROM_DIR / "prometheus.yml"]).rstrip())
    print(run(["promtool", "check", "rules", PROM_DIR / "alerts.yml"]).rstrip())
    print(run(["promtool", "test", "rules", PROM_DIR / "alerts.test.yml"]).rstrip())
    problems = (check_alert_rules(bin_path) + check_dashboards() + check_compose_mounts()
                + check_metric_references(documented))
    if problems:
        fail("static checks:\n  " + "\n  ".join(problems))


# ------------------------------------------------------------------------------------ live run

class Receiver(ThreadingHTTPServer):
    """The merchant's webhook endpoint: answers 200 and counts deliveries by webhook-id."""

    daemon_threads = True

    def __init__(self):
        self.delivered = set()
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), ReceiverHandler)


class ReceiverHandler(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.server.lock:
            self.server.delivered.add(self.headers.get("webhook-id"))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_):
        pass


def http(method, url, body=None, headers=None, timeout=10):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Prometheus:
    def __init__(self, url):
        self.url = url

    def api(self, path, **params):
        q = urllib.parse.urlencode(params)
        status, body = http("GET", f"{self.url}/api/v1/{path}{'?' + q if q else ''}")
        doc = json.loads(body)
        if status != 200 or doc.get("status") != "success":
            return None, doc.get("error", body.decode(errors="replace"))
        return doc["data"], None

    def query(self, expr):
        data, err = self.api("query", query=expr)
        if err:
            fail(f"Prometheus refused {expr!r}: {err}")
        return data["result"]

    def alerts(self):
        data, err = self.api("alerts")
        if err:
            fail(f"/api/v1/alerts: {err}")
        return data["alerts"]


class Run:
    """Everything the live run starts, so that `stop` can undo it."""

    def __init__(self, bin_path, amqp_tools):
        self.bin = bin_path
        self.amqp_tools = amqp_tools
        self.tmp = Path(tempfile.mkdtemp(prefix="ap-promcheck-"))
        tag = f"ap_promcheck_{os.getpid()}_{int(time.time())}"
        self.admin = os.environ.get("CHECK_DATABASE_URL", "postgres://postgres@127.0.0.1:5432")
        self.db = tag
        self.amqp_url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
        self.names = {
            "EXCHANGE": f"{tag}.payments", "QUEUE": f"{tag}.new", "ROUTING_KEY": f"{tag}.new",
            "DEAD_LETTER_EXCHANGE": f"{tag}.dlx", "DEAD_LETTER_QUEUE": f"{tag}.dead",
        }
        self.procs = {}  # name -> (Popen, log path)
        self.stopped = set()  # stopped on purpose: not a failure
        self.receiver = None
        self.db_created = False
        self.ports = {role: free_port() for role in ROLES}
        self.ports["prometheus"] = free_port()

    def env(self, role=None):
        env = dict(os.environ)
        env.update({
            "DATABASE_URL": f"{self.admin}/{self.db}",
            "AMQP_URL": self.amqp_url,
            "ASYNC_PAY__SERVER__BIND": f"127.0.0.1:{self.ports['serve']}",
            # Seconds of simulated gateway delay would only slow the check down.
            "ASYNC_PAY__GATEWAY__MIN_DELAY": "10ms",
            "ASYNC_PAY__GATEWAY__MAX_DELAY": "50ms",
            # The webhook receiver is on loopback.
            "ASYNC_PAY__WEBHOOK__ALLOW_PRIVATE_TARGETS": "true",
            "ASYNC_PAY__CONSUME__SHUTDOWN_TIMEOUT": "5s",
            "RUST_LOG": "info",
        })
        env.update({f"ASYNC_PAY__AMQP__{k}": v for k, v in self.names.items()})
        if role and role != "serve":
            env["ASYNC_PAY__METRICS__BIND"] = f"127.0.0.1:{self.ports[role]}"
        return env

    def target(self, role):
        return f"127.0.0.1:{self.ports[role]}"

    def spawn(self, name, argv, env=None):
        path = self.tmp / f"{name}.log"
        with open(path, "wb") as out:
            p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                 stdin=subprocess.DEVNULL)
        self.procs[name] = (p, path)
        return p

    def stop_proc(self, name):
        p, _ = self.procs[name]
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def assert_running(self):
        for name, (p, path) in self.procs.items():
            if p.poll() is not None and name not in self.stopped:
                fail(f"{name} exited with {p.returncode}; see {path}")

    def prometheus_config(self):
        """deploy/prometheus/prometheus.yml with its targets on this machine's ports."""
        deploy = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
        jobs = []
        for job in deploy["scrape_configs"]:
            name = job["job_name"]
            if name not in ROLES:
                fail(f"prometheus.yml has a job {name!r}, which is no role this check runs")
            local = {k: v for k, v in job.items()
                     if not k.endswith("_sd_configs") and k not in (
                         "static_configs", "scrape_interval", "scrape_timeout")}
            local["static_configs"] = [{"targets": [self.target(name)]}]
            jobs.append(local)
        missing = set(ROLES) - {j["job_name"] for j in jobs}
        if missing:
            fail(f"prometheus.yml scrapes no job for {sorted(missing)}")
        return {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "rule_files": [str(PROM_DIR / f) for f in deploy.get("rule_files", [])],
            "scrape_configs": jobs,
        }

    def start(self):
        log(f"database {self.db}, queues {self.names['QUEUE']} / {self.names['DEAD_LETTER_QUEUE']}")
        self.receiver = Receiver()
        threading.Thread(target=self.receiver.serve_forever, daemon=True).start()
        self.db_created = True
        run([self.bin, "migrate"], env=self.env())
        for role in ROLES:
            self.spawn(role, [self.bin, role], self.env(role))
        cfg = self.tmp / "prometheus.yml"
        cfg.write_text(yaml.safe_dump(self.prometheus_config(), sort_keys=False))
        (self.tmp / "data").mkdir()
        self.spawn("prometheus", [
            "prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={self.tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.ports['prometheus']}", "--log.level=warn",
        ])
        prom = Prometheus(f"http://127.0.0.1:{self.ports['prometheus']}")

        def ready():
            self.assert_running()
            try:
                return http("GET", f"{prom.url}/-/ready", timeout=2)[0] == 200, "not ready"
            except OSError as e:
                return False, e

        eventually("Prometheus ready", ready, 30)
        log(f"Prometheus {self.ports['prometheus']} scrapes "
            + ", ".join(f"{r} {self.target(r)}" for r in ROLES))
        return prom

    def stop(self):
        for name in list(self.procs):
            try:
                self.stop_proc(name)
            except Exception as e:  # keep stopping the others
                print(f"stopping {name}: {e}", file=sys.stderr)
        if self.receiver:
            self.receiver.shutdown()
        if self.db_created:
            subprocess.run(["psql", "-q", f"{self.admin}/postgres", "-c",
                            f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)'],
                           capture_output=True)
        try:
            failed = self.amqp_tools.delete(
                self.amqp_url,
                [self.names["QUEUE"], self.names["DEAD_LETTER_QUEUE"]],
                [self.names["EXCHANGE"], self.names["DEAD_LETTER_EXCHANGE"]])
            for f in failed:
                print(f"could not delete {f}", file=sys.stderr)
        except Exception as e:
            print(f"could not delete the queues: {e}", file=sys.stderr)

    def show_logs(self):
        for name, (_, path) in self.procs.items():
            lines = path.read_text(errors="replace").splitlines()[-25:]
            print(f"--- {name} ({path}), last {len(lines)} lines", file=sys.stderr)
            print("\n".join(lines), file=sys.stderr)


def drive_pipeline(r, prom):
    def targets_up():
        r.assert_running()
        data, err = prom.api("targets")
        if err:
            return False, err
        health = {(t["labels"]["job"], t["health"]) for t in data["activeTargets"]}
        return health == {(role, "up") for role in ROLES}, health

    eventually("every target up", targets_up, 30)
    log("every target is up: " + ", ".join(ROLES))

    api = f"http://127.0.0.1:{r.ports['serve']}/api/v1/payments"
    key = {"X-API-Key": API_KEY}
    hook = f"http://127.0.0.1:{r.receiver.server_address[1]}/hook"
    ids = []
    for i in range(PAYMENTS):
        status, body = http("POST", api, {"amount": f"{10 + i}.50", "currency": "EUR",
                                          "webhook_url": hook},
                            dict(key, **{"Idempotency-Key": str(uuid.uuid4())}))
        if status != 202:
            fail(f"POST {api}: {status} {body!r}")
        ids.append(json.loads(body)["payment_id"])
    # A refused request, so the error panels have a series too.
    status, _ = http("POST", api, {"amount": "-1", "currency": "EUR"},
                     dict(key, **{"Idempotency-Key": str(uuid.uuid4())}))
    if status != 422:
        fail(f"a negative amount answered {status}, not 422")

    # A poison message as RabbitMQ would dead-letter it: dlq-watch must record and count it.
    import pika
    with r.amqp_tools.connect(r.amqp_url) as conn:
        conn.channel().basic_publish(
            r.names["DEAD_LETTER_EXCHANGE"], r.names["DEAD_LETTER_QUEUE"], b"\x00poison",
            pika.BasicProperties(message_id=f"promcheck-poison-{uuid.uuid4()}"))

    def all_final():
        r.assert_running()
        pending = [i for i in ids
                   if json.loads(http("GET", f"{api}/{i}", headers=key)[1])["status"] == "pending"]
        with r.receiver.lock:
            hooks = len(r.receiver.delivered)
        return not pending and hooks >= PAYMENTS, f"{len(pending)} pending, {hooks} webhooks"

    eventually(f"{PAYMENTS} payments final, their webhooks delivered", all_final, 30)
    log(f"{PAYMENTS} payments final and their webhooks delivered; one poison message dead-lettered")


def check_series(r, prom, documented):
    def series_of(name, kind):
        return f'{name}_bucket' if kind == "histogram" else name

    def all_there():
        r.assert_running()
        missing = [n for n, kind in documented.items()
                   if not prom.query(f'count({{__name__="{series_of(n, kind)}"}})')]
        short = [what for expr, what in PIPELINE_FACTS if not prom.query(expr)]
        return not missing and not short, f"no series: {missing}; not reached: {short}"

    eventually("every documented metric has a series and the pipeline's counts arrived",
               all_there, 20)
    log(f"all {len(documented)} metrics of README's table have series; "
        + "; ".join(what for _, what in PIPELINE_FACTS) + ": counted")


def check_expressions(prom):
    exprs = [(f"rule {x.get('alert') or x.get('record')}", x["expr"]) for x in alert_rules()]
    exprs += [(f"panel {t!r}", grafana_to_promql(e)) for t, e in dashboard_targets()]
    errors = []
    for where, expr in exprs:
        _, err = prom.api("query", query=expr)
        if err:
            errors.append(f"{where}: {err}\n    {expr}")
    if errors:
        fail("expressions Prometheus refuses:\n  " + "\n  ".join(errors))
    log(f"{len(exprs)} expressions (rules and dashboard) evaluate without an error")


def check_alerts(r, prom):
    def active():
        return {(a["labels"]["alertname"], a["state"]) for a in prom.alerts()
                if a["labels"]["alertname"].startswith("AsyncPay")}

    # The dead letter fires its alert; a healthy pipeline trips no other one.
    expected = {("AsyncPayDeadLetters", "firing")}
    eventually("the dead-letter alert firing and no other alert active",
               lambda: (active() == expected, active()), 20)
    log("AsyncPayDeadLetters fires; no other alert is pending or firing")

    # A role that stops answering makes its target alert pending (firing needs a minute).
    r.stopped.add("dlq-watch")
    r.stop_proc("dlq-watch")

    def target_down():
        return any(a["labels"]["alertname"] == "AsyncPayTargetDown"
                   and a["labels"].get("job") == "dlq-watch" and a["state"] == "pending"
                   for a in prom.alerts()), active()

    eventually("AsyncPayTargetDown pending for the stopped dlq-watch", target_down, 20)
    log("dlq-watch stopped: AsyncPayTargetDown is pending for it")


def main():
    def on_term(*_):
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, on_term)
    ensure_prometheus()
    bin_path = binary()
    log(f"binary {bin_path.relative_to(ROOT) if bin_path.is_relative_to(ROOT) else bin_path}; "
        + run(["prometheus", "--version"]).splitlines()[0])
    documented = documented_metrics()
    static_checks(bin_path, documented)
    r = Run(bin_path, import_pika())
    ok = False
    try:
        prom = r.start()
        drive_pipeline(r, prom)
        check_series(r, prom, documented)
        check_expressions(prom)
        check_alerts(r, prom)
        ok = True
    finally:
        if not ok:
            r.show_logs()
        r.stop()
        shutil.rmtree(r.tmp, ignore_errors=True)
    log("prometheus-check passed")


if __name__ == "__main__":
    try:
        main()
    except CheckFailed as e:
        print(f"prometheus-check: {e}", file=sys.stderr)
        sys.exit(1)
