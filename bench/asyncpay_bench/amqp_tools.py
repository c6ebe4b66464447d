"""RabbitMQ helpers for the bench, on pika (installed by the bench from PyPI into
target/bench/pydeps when it is not importable; the standard library has no AMQP client).

As a script it is the commit-to-broker probe:

    python3 bench/asyncpay_bench/amqp_tools.py probe AMQP_URL EXCHANGE ROUTING_KEY QUEUE OUT MAX_SECONDS

declares QUEUE as a quorum queue (like the service's own queue: a quorum queue hands a message to
consumers only once it is committed, i.e. durably stored, which is when the relay gets its
confirm), binds it to EXCHANGE with ROUTING_KEY (so it receives a copy of every event the relay
publishes), prints "ready", and records for every message its message id (the outbox id) and the
wall-clock time it arrived. It stops on SIGTERM/SIGINT or after MAX_SECONDS, writes
"message_id<TAB>epoch_seconds" lines to OUT, deletes QUEUE and exits.
"""

import signal
import sys
import time

import pika


def connect(url):
    """A blocking connection; `with connect(url) as conn:` closes it."""
    params = pika.URLParameters(url)
    params.heartbeat = 30
    params.blocked_connection_timeout = 30
    params.socket_timeout = 10
    return pika.BlockingConnection(params)


def server_version(url):
    with connect(url) as conn:
        props = conn._impl.server_properties or {}
        v = props.get("version", b"?")
        return v.decode() if isinstance(v, bytes) else str(v)


def purge(url, queue):
    with connect(url) as conn:
        return conn.channel().queue_purge(queue).method.message_count


def queue_depth(url, queue):
    with connect(url) as conn:
        return conn.channel().queue_declare(queue, passive=True).method.message_count


def delete(url, queues, exchanges):
    """Deletes the queues and exchanges; ones that do not exist are fine. Returns the names
    that could not be deleted, with the reason."""
    failed = []
    with connect(url) as conn:
        for kind, names in (("queue", queues), ("exchange", exchanges)):
            for name in names:
                # A failed delete closes the channel (404 on an unknown name in old brokers):
                # one channel per name.
                ch = conn.channel()
                try:
                    if kind == "queue":
                        ch.queue_delete(name)
                    else:
                        ch.exchange_delete(name)
                except pika.exceptions.ChannelClosedByBroker as e:
                    if e.reply_code != 404:
                        failed.append(f"{kind} {name}: {e}")
                    continue
                ch.close()
    return failed


def probe(url, exchange, routing_key, queue, out, max_seconds):
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    conn = connect(url)
    ch = conn.channel()
    ch.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    ch.queue_bind(queue, exchange, routing_key)
    seen = []

    def on_message(_channel, _method, props, _body):
        seen.append((props.message_id or "", time.time()))

    # auto_ack: no ack frame per message, so the probe keeps up at 2,000 events/s and beyond.
    ch.basic_consume(queue, on_message, auto_ack=True)
    print("ready", flush=True)
    deadline = time.monotonic() + max_seconds
    while not stop and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)
    with open(out, "w") as f:
        for mid, t in seen:
            f.write(f"{mid}\t{t:.6f}\n")
    try:
        ch.queue_delete(queue)
    finally:
        conn.close()


if __name__ == "__main__":
    if len(sys.argv) == 8 and sys.argv[1] == "probe":
        _, _, url, exchange, key, queue, out, secs = sys.argv
        probe(url, exchange, key, queue, out, float(secs))
    else:
        sys.exit(__doc__)
