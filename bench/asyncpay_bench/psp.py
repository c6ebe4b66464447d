"""A payment-service-provider simulator for the bench: the HTTP contract of async-pay's `http`
gateway connector (README, "Payment gateway"), on the standard library's asyncio alone.

    python3 -m asyncpay_bench.psp --port 0 --api-key KEY [--min-delay 2] [--max-delay 5]
                                  [--decline-rate 0.1] [--seed 1]

prints "listening PORT" once it accepts connections, and serves until SIGTERM/SIGINT:

- `POST /v1/charges` with `Authorization: Bearer KEY`, `Idempotency-Key: <payment id>` and the
  JSON body `{"payment_id", "merchant", "amount", "currency", "description", "metadata"}`:
  after a delay uniform in min..max seconds, `200 {"status": "succeeded", "charge_id": "ch_…"}`,
  or (a `decline-rate` share) `200 {"status": "declined", "decline_code": "card_declined",
  "message": "…"}`. A repeated key gets the same answer, without a second charge: while the
  first request is still running, the repeat waits for it and gets its answer too.
- `GET /v1/charges/{payment_id}`: the recorded answer, `{"status": "processing"}` while the
  charge runs, or 404 when no charge with that key was ever received.
- Wrong or missing bearer key: 401. A body that is not that JSON: 422. Missing key: 400.
- `GET /_stats` (no auth): what it did, as JSON: requests, distinct charges, charges executed
  (the most for one payment must be 1), repeats, declines, peak concurrent connections.

Connections are HTTP/1.1 keep-alive, each served by its own coroutine, so thousands can be open
at once (the soft file-descriptor limit is raised to the hard one at start).
"""

import argparse
import asyncio
import json
import random
import resource
import signal
import sys
import uuid
from collections import Counter

REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
           405: "Method Not Allowed", 413: "Payload Too Large", 422: "Unprocessable Entity"}
MAX_BODY = 1 << 20
REQUIRED = ("payment_id", "merchant", "amount", "currency")


class Psp:
    def __init__(self, api_key, min_delay, max_delay, decline_rate, seed):
        self.auth = f"Bearer {api_key}"
        self.min_delay, self.max_delay = min_delay, max_delay
        self.decline_rate = decline_rate
        self.rng = random.Random(seed)
        self.charges = {}  # idempotency key -> future of the answer
        self.executed = Counter()  # payment id -> charges executed for it
        self.stats = Counter()
        self.connections = 0
        self.peak_connections = 0

    async def serve_connection(self, reader, writer):
        self.connections += 1
        self.peak_connections = max(self.peak_connections, self.connections)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                try:
                    method, target, _ = line.decode("latin-1").split(" ", 2)
                except ValueError:
                    break
                headers = {}
                while True:
                    h = await reader.readline()
                    if h in (b"\r\n", b"\n", b""):
                        break
                    k, _, v = h.decode("latin-1").partition(":")
                    headers[k.strip().lower()] = v.strip()
                length = int(headers.get("content-length") or 0)
                if length > MAX_BODY:
                    await self.respond(writer, 413, {"error": "payload_too_large"}, close=True)
                    break
                body = await reader.readexactly(length) if length else b""
                status, answer = await self.route(method, target, headers, body)
                close = headers.get("connection", "").lower() == "close"
                await self.respond(writer, status, answer, close)
                if close:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            self.connections -= 1
            writer.close()

    async def respond(self, writer, status, answer, close=False):
        body = json.dumps(answer).encode()
        head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}\r\n"
                "Content-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n"
                f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n")
        writer.write(head.encode() + body)
        await writer.drain()

    async def route(self, method, target, headers, body):
        self.stats["requests"] += 1
        path = target.split("?", 1)[0]
        if path == "/_stats" and method == "GET":
            return 200, self.report()
        if headers.get("authorization") != self.auth:
            self.stats["unauthorized"] += 1
            return 401, {"error": "unauthorized"}
        if path == "/v1/charges":
            if method != "POST":
                return 405, {"error": "method_not_allowed"}
            return await self.charge(headers, body)
        if path.startswith("/v1/charges/") and method == "GET":
            self.stats["status_queries"] += 1
            f = self.charges.get(path[len("/v1/charges/"):])
            if f is None:
                return 404, {"error": "not_found"}
            return 200, f.result() if f.done() else {"status": "processing"}
        return 404, {"error": "not_found"}

    async def charge(self, headers, body):
        key = headers.get("idempotency-key", "")
        if not key:
            self.stats["missing_key"] += 1
            return 400, {"error": "missing_idempotency_key"}
        try:
            req = json.loads(body)
            if not isinstance(req, dict) or any(not req.get(f) for f in REQUIRED):
                raise ValueError
        except ValueError:
            self.stats["unprocessable"] += 1
            return 422, {"error": "invalid_request"}
        if req["payment_id"] != key:
            self.stats["key_not_payment_id"] += 1
        f = self.charges.get(key)
        if f is not None:
            self.stats["repeats"] += 1
            return 200, await asyncio.shield(f)
        f = self.charges[key] = asyncio.get_running_loop().create_future()
        self.executed[req["payment_id"]] += 1
        self.stats["charges_executed"] += 1
        await asyncio.sleep(self.rng.uniform(self.min_delay, self.max_delay))
        if self.rng.random() < self.decline_rate:
            answer = {"status": "declined", "decline_code": "card_declined",
                      "message": "The card was declined."}
            self.stats["declined"] += 1
        else:
            answer = {"status": "succeeded", "charge_id": f"ch_{uuid.uuid4().hex[:24]}"}
            self.stats["succeeded"] += 1
        f.set_result(answer)
        return 200, answer

    def report(self):
        return dict(self.stats, distinct_charges=len(self.charges),
                    max_executed_per_payment=max(self.executed.values(), default=0),
                    payments_charged_more_than_once=sum(1 for v in self.executed.values() if v > 1),
                    connections=self.connections, peak_connections=self.peak_connections)


async def main(args):
    psp = Psp(args.api_key, args.min_delay, args.max_delay, args.decline_rate, args.seed)
    server = await asyncio.start_server(psp.serve_connection, args.host, args.port, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    print(f"listening {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    async with server:
        await stop.wait()
    print(json.dumps(psp.report()), flush=True)


def raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--api-key", required=True)
    ap.add_argument("--min-delay", type=float, default=2.0, help="seconds")
    ap.add_argument("--max-delay", type=float, default=5.0, help="seconds")
    ap.add_argument("--decline-rate", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=1)
    raise_fd_limit()
    try:
        asyncio.run(main(ap.parse_args()))
    except KeyboardInterrupt:
        sys.exit(0)
