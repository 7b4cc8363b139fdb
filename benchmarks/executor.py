"""Throughput of the sandboxed executor: HumanEval canonical solutions (164 programs), problems/s.

    python benchmarks/executor.py [--workers 1,2] [--repeats 2] [--json out.json]

Each program runs in its own sandbox (supervisor process, private uid when root, fresh temp dir, rlimits), so
the cost per program is mostly interpreter start-up (~2 processes per program); the executor must still score
every canonical solution as passed (checked here too)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

from codellama.evaluation import humaneval
from codellama.evaluation.execution import Executor, Limits, default_isolation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    problems = humaneval.problems()
    programs = [p.program(p.reference) for p in problems]
    rows = []
    for workers in [int(w) for w in args.workers.split(",")]:
        rates = []
        with Executor(workers, Limits(timeout=10.0)) as ex:
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                results = ex.map(programs)
                dt = time.perf_counter() - t0
                passed = sum(r.passed for r in results)
                if passed != len(programs):
                    raise SystemExit(f"only {passed}/{len(programs)} canonical solutions passed")
                rates.append(len(programs) / dt)
        rows.append({"workers": workers, "problems": len(programs), "problems_per_s": round(statistics.median(rates), 2),
                     "runs": [round(r, 2) for r in rates]})
        print(f"workers={workers}: {rows[-1]['problems_per_s']:.1f} problems/s "
              f"(runs: {', '.join(f'{r:.1f}' for r in rates)}; 164/164 passed)")
    info = {"benchmark": "executor-humaneval-canonical", "isolation": default_isolation(),
            "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "python": platform.python_version(),
            "results": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=1)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
