"""An open-loop load generator for the soak: POSTs payments at a fixed rate over keep-alive
connections, standard library only (wrk keeps connections busy as fast as it can; a soak needs a
steady rate whatever the server does).

    python3 -m asyncpay_bench.loadgen URL --rate 1000 --secs 300 [--conns 64]
                                      [--key-prefix P] [--api-key KEY]

The i-th request is due at start + i / rate; a free connection sends it then (or, when every
connection is busy, as soon as one frees up: the lateness is reported). Latency counts from the
due time, so a slow server cannot hide queueing (no coordinated omission). Prints one line
"LOADGEN_JSON {...}" at the end: requests sent and answered, statuses, errors, the rate held,
latency percentiles, lateness, and answers per second.
"""

import argparse
import asyncio
import json
import math
import sys
import time
from urllib.parse import urlsplit

BODY = b'{"amount":"100.50","currency":"RUB","description":"Order #123","metadata":{"order_id":"123"}}'


def pct(values, p):
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]


class Load:
    def __init__(self, args):
        u = urlsplit(args.url)
        self.host, self.port = u.hostname, u.port or 80
        self.args = args
        self.statuses = {}
        self.errors = 0
        self.latency_ms = []
        self.late_ms = []
        self.per_second = {}
        self.sent = 0

    async def connect(self):
        return await asyncio.open_connection(self.host, self.port)

    def request(self, i):
        a = self.args
        return (f"POST /api/v1/payments HTTP/1.1\r\nHost: {self.host}\r\n"
                f"X-API-Key: {a.api_key}\r\nIdempotency-Key: {a.key_prefix}-{i}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n"
                ).encode() + BODY

    async def worker(self, jobs, t0):
        loop = asyncio.get_running_loop()
        conn = None
        while True:
            job = await jobs.get()
            if job is None:
                break
            i, due = job
            self.late_ms.append(max(0.0, (loop.time() - due) * 1000))
            try:
                if conn is None:
                    conn = await self.connect()
                reader, writer = conn
                writer.write(self.request(i))
                self.sent += 1
                status = int((await reader.readline()).split()[1])
                length = 0
                while (h := await reader.readline()) not in (b"\r\n", b""):
                    k, _, v = h.partition(b":")
                    if k.strip().lower() == b"content-length":
                        length = int(v)
                await reader.readexactly(length)
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
                self.errors += 1
                if conn is not None:
                    conn[1].close()
                conn = None
                continue
            now = loop.time()
            self.statuses[status] = self.statuses.get(status, 0) + 1
            self.latency_ms.append((now - due) * 1000)
            sec = int(now - t0)
            self.per_second[sec] = self.per_second.get(sec, 0) + 1
        if conn is not None:
            conn[1].close()

    async def run(self):
        a = self.args
        loop = asyncio.get_running_loop()
        jobs = asyncio.Queue()
        t0 = loop.time()
        workers = [asyncio.create_task(self.worker(jobs, t0)) for _ in range(a.conns)]
        total = int(a.rate * a.secs)
        for i in range(total):
            due = t0 + i / a.rate
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            jobs.put_nowait((i, due))
        for _ in workers:
            jobs.put_nowait(None)
        await asyncio.wait(workers, timeout=60)
        elapsed = loop.time() - t0
        answered = sum(self.statuses.values())
        secs = sorted(self.per_second)
        return {
            "target_rate": a.rate, "secs": a.secs, "due": total, "sent": self.sent,
            "answered": answered, "statuses": {str(k): v for k, v in self.statuses.items()},
            "errors": self.errors, "elapsed_s": round(elapsed, 3),
            "answered_per_s": round(answered / a.secs, 1),
            "latency_ms": {"p50": pct(self.latency_ms, 50), "p99": pct(self.latency_ms, 99),
                           "max": max(self.latency_ms, default=None)},
            "late_ms": {"p99": pct(self.late_ms, 99), "max": max(self.late_ms, default=None),
                        "over_100ms": sum(1 for x in self.late_ms if x > 100)},
            "answered_per_second": [self.per_second[k] for k in secs],
        }


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url")
    ap.add_argument("--rate", type=float, required=True, help="requests per second")
    ap.add_argument("--secs", type=float, required=True)
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--key-prefix", default=f"soak-{int(time.time())}")
    ap.add_argument("--api-key", default="secret-api-key")
    result = asyncio.run(Load(ap.parse_args()).run())
    print("LOADGEN_JSON " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
