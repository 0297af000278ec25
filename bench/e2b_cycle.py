"""Times Sandbox.create + commands.run("echo hi") + kill through the unmodified e2b SDK.

Run by scripts/bench-e2b with E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY set.
Usage: python3 e2b_cycle.py ITERATIONS TEMPLATE OUT.json
"""

import json
import statistics
import sys
import time

from e2b import Sandbox


def pct(values, p):
    values = sorted(values)
    k = max(0, min(len(values) - 1, round(p / 100 * (len(values) - 1))))
    return values[k]


def main():
    n, template, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    create, run, kill, cycle = [], [], [], []
    for i in range(n + 5):  # 5 warm-up cycles
        t0 = time.perf_counter()
        sbx = Sandbox.create(template, timeout=60)
        t1 = time.perf_counter()
        r = sbx.commands.run("echo hi")
        t2 = time.perf_counter()
        sbx.kill()
        t3 = time.perf_counter()
        assert r.stdout == "hi\n", r
        if i >= 5:
            create.append((t1 - t0) * 1000)
            run.append((t2 - t1) * 1000)
            kill.append((t3 - t2) * 1000)
            cycle.append((t3 - t0) * 1000)
    result = {
        name: {"median_ms": statistics.median(v), "p95_ms": pct(v, 95), "min_ms": min(v), "max_ms": max(v)}
        for name, v in [("create", create), ("run_echo", run), ("kill", kill), ("cycle", cycle)]
    }
    result["iterations"] = n
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    for name in ["create", "run_echo", "kill", "cycle"]:
        r = result[name]
        print(f"{name:<9} median {r['median_ms']:7.2f} ms   p95 {r['p95_ms']:7.2f} ms")


if __name__ == "__main__":
    main()
