"""`python -m tulle.local.supervisor`: the process behind `tulle up --detach`.

It takes over the run lock from the CLI (an inherited fd), runs the Runner until
SIGTERM (from `tulle down`) and exits. Its stderr is `<state>/logs/supervisor.log`; when
it cannot start, its last line is `tulle: <why>`, which the waiting CLI shows.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

from tulle.local.runner import RunOptions, Runner, StartError
from tulle.local.state import StateDir, note_lock_holder
from tulle.log import setup_logging


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tulle.local.supervisor")
    p.add_argument("manifests")
    p.add_argument("--state-dir", required=True)
    p.add_argument("--isolation", choices=["netns", "none"], required=True)
    p.add_argument("--no-proxy", action="store_true")
    p.add_argument("--default-inbound-policy", default="all-unauthenticated")
    p.add_argument("--nats-tls", action="store_true")
    p.add_argument("--nats-cluster", type=int, default=1)
    p.add_argument("--lock-fd", type=int, required=True)
    args = p.parse_args(argv)
    setup_logging("local", fmt="json")
    note_lock_holder(args.lock_fd)
    opts = RunOptions(manifests=Path(args.manifests), state=StateDir.at(args.state_dir), isolation=args.isolation,
                      meshed=not args.no_proxy, default_inbound_policy=args.default_inbound_policy,
                      nats_tls=args.nats_tls, nats_cluster=args.nats_cluster)
    try:
        asyncio.run(serve(Runner(opts)))
    except StartError as e:
        print(f"tulle: {e}", file=sys.stderr, flush=True)
        return 1
    except Exception as e:  # logged with its traceback by the runner
        print(f"tulle: the supervisor failed: {type(e).__name__}: {e}; see {opts.state.log('supervisor')}",
              file=sys.stderr, flush=True)
        return 1
    finally:
        os.close(args.lock_fd)
    return 0


async def serve(runner: Runner) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, runner.stopping.set)
    await runner.run()


if __name__ == "__main__":
    sys.exit(main())
