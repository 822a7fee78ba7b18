"""Hundreds of SIGKILL cycles against a VectorStore writer, on demand.

Each cycle forks a worker that adds, deletes, upserts and compacts in a loop, acknowledging
every committed write; the worker is killed at a random moment, and the store must open, pass
``verify()`` and hold exactly the acknowledged writes (or those plus the one in flight). The
test suite runs a few dozen cycles (tests/test_store_crash.py); this script runs as many as you
ask for and prints one line per cycle.

Run it from the repository root, as a module (it uses the test suite's worker):

    python -m benchmarks.crash_store                 # 300 cycles
    python -m benchmarks.crash_store --cycles 1000 --seed 7 --max-delay 0.5
"""

from __future__ import annotations

import argparse
import tempfile
import time

from tests.support import store_crash_worker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-delay", type=float, default=0.3, help="seconds before the kill, at most")
    parser.add_argument("--dir", default=None, help="where to put the store (default: a temporary directory)")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    args = parser.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="crash-store-", dir=args.dir) as work:
        totals = store_crash_worker.crash_cycles(
            work,
            args.cycles,
            seed=args.seed,
            max_delay=args.max_delay,
            log=None if args.quiet else lambda line: print(line, flush=True),
        )
    print(
        f"{totals['cycles']} kill cycles in {time.perf_counter() - t0:.0f} s: {totals['acked']} acknowledged "
        f"writes all present, {totals['in_flight_committed']} kills landed after a commit and before its "
        f"acknowledgement, {totals['rows']} rows at the end; no loss, no partial write"
    )


if __name__ == "__main__":
    main()
