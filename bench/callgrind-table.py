#!/usr/bin/env python3
"""Instructions per operation from the runs file of callgrind-compare.sh or
callgrind-observe.sh: one line per run, `VARIANT MODE REP IR OPS`; a
variant's idle run (start-up and shutdown) is subtracted from its loaded
runs. Prints every run, the medians, and each variant's ratio to the first.

    callgrind-table.py RUNS BASE VARIANT...
"""
import statistics
import sys

runs, base, others = sys.argv[1], sys.argv[2], sys.argv[3:]
rows = [line.split() for line in open(runs) if line.strip()]
idle = {v: int(ir) for v, m, _, ir, _ in rows if m == "idle"}
per = {}
for v, m, _, ir, ops in rows:
    if m != "idle":
        per.setdefault((m, v), []).append((int(ir) - idle[v]) / int(ops))
print("| load | variant | Ir per op, each run | median |")
print("|---|---|---|---:|")
modes = [m for m in ("lines", "churn") if (m, base) in per]
for m in modes:
    for v in [base] + others:
        vals = per[(m, v)]
        unit = "line" if m == "lines" else "connection"
        each = ", ".join("%.1f" % x for x in vals)
        print("| %s | %s | %s | %.1f per %s |" % (m, v, each, statistics.median(vals), unit))
for m in modes:
    b = statistics.median(per[(m, base)])
    for v in others:
        q = statistics.median(per[(m, v)])
        print("%s: %s / %s = %.4f (%+.2f %%, %+.1f Ir per op)" % (m, v, base, q / b, 100 * (q / b - 1), q - b))
print("idle (start-up + shutdown) Ir: %s" % idle)
