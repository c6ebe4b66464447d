"""`just bench`: async-pay against the database's own ceiling. See bench/README.md.

    python3 bench/bench.py            # the full run, release build (about 15 minutes + the build)
    python3 bench/bench.py --quick    # a few seconds a step: checks the bench runs (CI)

Every step runs in this one process's lifetime, against the local PostgreSQL and RabbitMQ, on
databases and queues/exchanges whose names are unique to this run; all of them, and every process
the bench starts, are removed at the end, also after a failure or Ctrl-C (the processes are
started with PR_SET_PDEATHSIG, so even a SIGKILLed bench takes them along). Every wait has a
deadline. Standard library only, plus pika (AMQP), installed from PyPI into target/bench/pydeps
when it is missing.
"""

import argparse
import datetime
import os
import signal
import sys
import time

from . import api, consumer, pgbench, pipeline, relay, report, soak
from .common import BENCH, ROOT, Interrupted, Skipped, log
from .context import Context


def pipe(ctx):
    """The database steps 4a and 4b share (4b runs on the relay 4a started)."""
    if getattr(ctx, "pipe_stack", None) is None:
        ctx.pipe_stack = ctx.stack("pipe")
    return ctx.pipe_stack


def close_pipe(ctx):
    if getattr(ctx, "pipe_stack", None) is not None:
        ctx.pipe_stack.close()
        ctx.pipe_stack = None


STEPS = {
    "1": pgbench.step1_ceiling,
    "2": api.step2_3_api,
    "4a": lambda ctx: relay.step4a_relay(ctx, pipe(ctx)),
    "4b": lambda ctx: (pipeline.step4b_pipeline(ctx, pipe(ctx)), close_pipe(ctx)),
    "4c": relay.step4c_latency,
    "5": consumer.step5_consumer,
    "7": pipeline.step7_scale,
    "8": consumer.step8_http_gateway,
    "9": soak.step9_soak,
    "costs": pgbench.step_costs,
}
GROUPS = {"4": ["4a", "4b", "4c"]}
DEFAULT_STEPS = "1,2,4,5,7,8,9"


def parse_args():
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
    ap.add_argument("--steps", default=DEFAULT_STEPS,
                    help=f"which steps to run (default: {DEFAULT_STEPS}; 2 includes 3, 4 is "
                    "4a,4b,4c, 6 is part of 2, 5 and 8; `costs` (the commit-path cost of each "
                    "index and constraint, about 3 minutes) runs only when named)")
    ap.add_argument("--soak-rate", type=int, help="payments/s of the soak (step 9; default "
                    "1,000, quick 200)")
    ap.add_argument("--soak-secs", type=int, help="how long the soak runs (default 300, quick 10)")
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
    wanted = [x.strip() for x in args.steps.split(",") if x.strip()]
    wanted = [y for x in wanted for y in GROUPS.get(x, [x])]
    for x in wanted:
        if x not in STEPS:
            ap.error(f"unknown step {x!r} (steps: {', '.join(['4', *STEPS])}; 2 includes 3)")
    args.wanted = wanted
    return args


def main():
    args = parse_args()

    def interrupted(signum, _frame):
        raise Interrupted(signal.Signals(signum).name)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, interrupted)

    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.monotonic()
    ctx = Context(args)
    command = "just bench" + (" --quick" if args.quick else "")
    if args.profile:
        command += f" --profile {args.profile}"
    if args.steps != DEFAULT_STEPS:
        command += f" --steps {args.steps}"
    failure = None
    try:
        ctx.setup()
        for name, fn in STEPS.items():
            if name in args.wanted:
                try:
                    fn(ctx)
                except Skipped as e:
                    ctx.skipped[name] = str(e)
                    log(f"step {name} skipped: {e}")
    except (Interrupted, Exception) as e:  # noqa: BLE001 - report, clean up, exit 1
        failure = e
        log(f"FAILED: {type(e).__name__}: {e}")
    finally:
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)  # let the cleanup finish
        ctx.cleanup()
    if failure is not None:
        ctx.notes.append(f"the run FAILED: {type(failure).__name__}: {failure}")

    text, rows = report.render(ctx, command, started, time.monotonic() - t0)
    if args.out:
        out = os.path.abspath(args.out)
    elif args.quick:
        out = ROOT / "target" / "bench" / "results" / f"{started:%Y-%m-%d}-quick.md"
    else:
        out = BENCH / "results" / f"{started:%Y-%m-%d}.md"
    from pathlib import Path
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)

    header = ("step", "what", "measured", "target", "status")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(5)]
    print()
    for r in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print(f"\nwritten to {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    if ctx.quick:
        print("(quick run: checks that the bench runs; the figures are not measurements)")
    return 1 if failure is not None else 0


if __name__ == "__main__":
    sys.exit(main())
