#!/usr/bin/env python3
"""Turns bench/results/results.json into RESULTS.md and chart.svg.

    python3 bench/report.py [bench/results/results.json]

Standard library only; the chart is hand-written SVG.
"""

import json
import math
import os
import statistics
import sys
from html import escape

COLORS = {"xps": "#d9480f", "tokio-peer": "#1c7ed6", "c-echo": "#5c940d",
          "xps-w1": "#f08c00", "xps-w2": "#c2255c", "xps-observed": "#7048e8"}


def derive(case, j):
    """Per-run metrics computed from the load generator's JSON line."""
    ut, st = j.get("server_utime_s"), j.get("server_stime_s")
    stat_cpu = ut + st if ut is not None and st is not None else None
    # Exact on-CPU time from schedstat when available, else the tick-based sum.
    cpu = j.get("server_sched_cpu_s")
    if cpu is None:
        cpu = stat_cpu
    d = {
        "main": j.get(case["metric"]),
        "errors": j.get("errors"),
        "utime_s": ut, "stime_s": st, "cpu_s": cpu,
        "p50_us": j.get("p50_us"), "p99_us": j.get("p99_us"), "p999_us": j.get("p999_us"),
        "rss_kb": j.get("server_rss_kb"),
    }
    dur = j.get("duration") or 0
    if cpu is not None and dur > 0:
        d["server_cpu_pct"] = 100.0 * cpu / dur
    per = case.get("per")
    ops = {"line": j.get("lines"), "conn": j.get("connections"),
           "MB": (j.get("bytes") or 0) / 1e6}.get(per) if per else None
    if ops and cpu is not None:
        d["cpu_us_per_op"] = cpu * 1e6 / ops
    if ops and stat_cpu is not None:
        d["stat_cpu_us_per_op"] = stat_cpu * 1e6 / ops
        d["utime_us_per_op"] = ut * 1e6 / ops
        d["stime_us_per_op"] = st * 1e6 / ops
        if stat_cpu > 0 and cpu is not None:
            # The exact total split in utime/stime proportions (for the chart).
            d["cpu_user_part_us_per_op"] = cpu * 1e6 / ops * ut / stat_cpu
    if j.get("mode") == "idle":
        d["rss_before_kb"] = j.get("server_rss_before_kb")
        d["open"] = j.get("open")
        d["connect_s"] = j.get("connect_s")
        d["open_rate"] = j.get("conns_per_s")
        d["hold_cpu_ms"] = cpu * 1e3 if cpu is not None else None
    return d


def fmt(v):
    if v is None:
        return "–"
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return "–"
    a = abs(v)
    if a >= 100000:
        return "%.0f" % v
    if a >= 1000:
        return "%.0f" % v
    if a >= 100:
        return "%.1f" % v
    if a >= 10:
        return "%.2f" % v
    return "%.3g" % v


def rounds_text(cfg):
    """"5", or "5 (idle: 3)" when the idle case ran fewer rounds."""
    idle = cfg.get("idle_rounds", cfg["rounds"])
    return str(cfg["rounds"]) if idle == cfg["rounds"] else "%s (idle: %s)" % (cfg["rounds"], idle)


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def ratio(a, b):
    if a is None or b in (None, 0):
        return None
    return a / b


# (key, label, lower_is_better)
ROWS = [
    ("main", None, None),
    ("p50_us", "latency p50 (µs)", True),
    ("p99_us", "latency p99 (µs)", True),
    ("p999_us", "latency p99.9 (µs)", True),
    ("cpu_us_per_op", "server CPU µs per {per} (exact, schedstat)", True),
    ("stat_cpu_us_per_op", "server utime+stime µs per {per} (/proc/PID/stat)", True),
    ("utime_us_per_op", "server utime µs per {per}", True),
    ("stime_us_per_op", "server stime µs per {per}", True),
    ("server_cpu_pct", "server CPU % of the window", None),
    ("rss_kb", "server VmRSS (kB) at the end", True),
    ("rss_before_kb", "server VmRSS before connecting (kB)", True),
    ("open", "connections open and verified at the end", False),
    ("connect_s", "time to open + verify all (s)", True),
    ("open_rate", "open + verify rate (conn/s)", False),
    ("hold_cpu_ms", "server CPU while holding (ms)", True),
    ("other_cpu_s", "noise: CPU s used by other processes during the run", None),
    ("steal_s", "steal: CPU s the hypervisor gave to other guests during the run", None),
    ("client_cpu_s", "load generator CPU s (whole run)", None),
]


def summarize(doc):
    """{case: {server: {key: median}}} plus min/max of the main metric."""
    out = {}
    for r in doc["runs"]:
        d = dict(r.get("derived") or {})
        if r.get("exit_code") != 0:
            d = {}
        d["other_cpu_s"] = r.get("other_cpu_s")
        d["steal_s"] = r.get("steal_s")
        d["client_cpu_s"] = r.get("client_cpu_s")
        out.setdefault(r["case"], {}).setdefault(r["server"], []).append((r, d))
    s = {}
    for case, by_server in out.items():
        s[case] = {}
        for server, lst in by_server.items():
            keys = set()
            for _, d in lst:
                keys |= set(d)
            m = {k: med([d.get(k) for _, d in lst]) for k in keys}
            mains = [d.get("main") for _, d in lst if d.get("main") is not None]
            m["main_min"] = min(mains) if mains else None
            m["main_max"] = max(mains) if mains else None
            m["runs"] = len(lst)
            m["failed"] = sum(1 for r, _ in lst if r.get("exit_code") != 0)
            s[case][server] = m
    return s


def write_md(doc, s, path):
    info, cfg = doc["machine"], doc["config"]
    cases = {c["name"]: c for c in doc["cases"]}
    L = []
    L.append("# xps benchmark results\n")
    L.append("Generated by `bench/compare.sh` (raw runs: `results.json`; chart: `chart.svg`). "
             "Every number is the **median of %s round(s)** on fresh server processes run in "
             "alternation; servers pinned to CPU %s, the load generator (`xps-bench`, one "
             "thread) to CPU %s, except the scaling cases. Server CPU time is read from "
             "`/proc/PID/stat` (utime, stime; clock ticks of 1/%d s) and, exactly, from "
             "`/proc/PID/task/*/schedstat` at the start and end of the measured window; "
             "\"server CPU µs per op\" uses the exact schedstat total.\n" % (rounds_text(cfg), cfg["server_cpu"], cfg["client_cpu"],
                             os.sysconf("SC_CLK_TCK")))
    L.append("| machine | |\n|---|---|")
    for k in ["nproc", "cpu_model", "kernel", "date", "rustc", "gcc", "git_commit",
              "loadavg_start", "loadavg_end", "total_s", "nofile_limit"]:
        L.append("| %s | %s |" % (k, info.get(k)))
    L.append("| config | rounds=%s, duration=%ss, warm-up=%ss, idle: %s conns held %ss%s%s |\n" % (
        rounds_text(cfg), cfg["duration_s"], cfg["warmup_s"], cfg["idle_conns"], cfg["idle_hold_s"],
        ", nice %s (servers and load generator)" % cfg["nice"] if cfg.get("nice") else "",
        ", QUICK" if cfg.get("quick") else ""))
    L.append("Peers: **tokio-peer** = idiomatic tokio (current-thread runtime, `BufReader::"
             "read_until` + `BufWriter`, flush when no complete line is buffered); **c-echo** = "
             "minimal C epoll echo server (no line logic, verified with `--verify echo`), the "
             "floor for what the kernel costs.\n")
    L.append("The machine is a shared 2-vCPU VM; other processes ran during the benchmark (see the "
             "noise and steal rows and the load averages). Throughput and tail latency are therefore noisy; "
             "**server CPU per operation is the most trustworthy comparison**.\n")
    L.append("How to read: the load generator keeps the pipe full, so when neither the server "
             "nor the load generator uses its whole CPU (\"server CPU % of the window\"), "
             "throughput is bound by wake-up latency (the CPU is shared with other runnable "
             "tasks), not by the server's code. \"noise\" is the CPU time (user+nice+system "
             "from /proc/stat) that neither the server nor the load generator used during the "
             "run; \"steal\" is the time the hypervisor ran other guests on this VM's CPUs "
             "(/proc/stat). Loopback receive processing partly runs in softirq context, which the kernel "
             "may not charge to either process; that share is missing from every server's CPU "
             "figures alike. Ratios are xps divided by the peer: above 1 means xps has more of "
             "the metric (better for throughput, worse for CPU, latency and memory).\n")

    main_cases = [c for c in doc["cases"] if not c["name"].startswith(("scale-", "obs-"))]
    peers = ["xps", "tokio-peer", "c-echo"]
    main_cases = [c for c in main_cases if c["name"] in s]
    if main_cases:
        L.append("## Summary (medians)\n")
        L.append("| case | metric | xps | tokio-peer | c-echo | xps/tokio | xps/c-echo |")
        L.append("|---|---|---:|---:|---:|---:|---:|")
    for c in main_cases:
        if c["name"] not in s:
            continue
        ss = s[c["name"]]
        for key, label in [("main", c["unit"] + (" (lower is better)" if c.get("lower_is_better") else "")),
                           ("cpu_us_per_op", "server CPU µs/" + (c.get("per") or "op")),
                           ("p99_us", "p99 µs")]:
            vals = [ss.get(p, {}).get(key) for p in peers]
            if all(v is None for v in vals):
                continue
            L.append("| %s | %s | %s | %s | %s | %s | %s |" % (
                c["title"], label, *[fmt(v) for v in vals],
                fmt(ratio(vals[0], vals[1])), fmt(ratio(vals[0], vals[2]))))
    if main_cases:
        L.append("")
        L.append("## Per case\n")
    for c in main_cases:
        if c["name"] not in s:
            continue
        ss = s[c["name"]]
        L.append("### %s\n" % c["title"])
        L.append("| metric (median) | xps | tokio-peer | c-echo | xps/tokio | xps/c-echo |")
        L.append("|---|---:|---:|---:|---:|---:|")
        for key, label, _lower in ROWS:
            vals = [ss.get(p, {}).get(key) for p in peers]
            if all(v is None for v in vals):
                continue
            if key == "main":
                label = c["unit"] + (" (lower is better)" if c.get("lower_is_better") else " (higher is better)")
            label = label.format(per=c.get("per") or "op")
            L.append("| %s | %s | %s | %s | %s | %s |" % (
                label, *[fmt(v) for v in vals], fmt(ratio(vals[0], vals[1])),
                fmt(ratio(vals[0], vals[2]))))
        L.append("| %s range over rounds | %s | %s | %s | | |" % (
            c["unit"], *["%s – %s" % (fmt(ss.get(p, {}).get("main_min")),
                                     fmt(ss.get(p, {}).get("main_max"))) for p in peers]))
        fails = {p: ss.get(p, {}).get("failed") for p in peers if ss.get(p, {}).get("failed")}
        if fails:
            L.append("\n**Failed runs**: %s" % ", ".join("%s: %d" % kv for kv in fails.items()))
        L.append("")

    scale = [c for c in doc["cases"] if c["name"].startswith("scale-") and c["name"] in s]
    if scale:
        L.append("## Scaling: xps --workers 2 vs --workers 1\n")
        L.append("Nothing pinned: the two workers and the single-threaded load generator share "
                 "the machine's %s CPUs, so a second worker can only help as far as the load "
                 "generator leaves a CPU free.\n" % info.get("nproc"))
        L.append("| case | metric | workers 1 | workers 2 | w2/w1 |")
        L.append("|---|---|---:|---:|---:|")
        for c in scale:
            ss = s[c["name"]]
            for key, label, _ in ROWS:
                a, b = ss.get("xps-w1", {}).get(key), ss.get("xps-w2", {}).get(key)
                if a is None and b is None:
                    continue
                if key == "main":
                    label = c["unit"]
                label = label.format(per=c.get("per") or "op")
                L.append("| %s | %s | %s | %s | %s |" % (c["title"].replace("scaling: ", ""),
                                                         label, fmt(a), fmt(b), fmt(ratio(b, a))))
        L.append("")

    obs = [c for c in doc["cases"] if c["name"].startswith("obs-") and c["name"] in s]
    if obs:
        L.append("## Observability: xps with --metrics and --access-log vs without\n")
        L.append("`xps-observed` = `xps --metrics 127.0.0.1:0 --access-log FILE` (a fresh "
                 "file per process); both pinned like the main cases and run in alternation. "
                 "Ratios are observed / plain: above 1 means observing costs that much more "
                 "CPU per operation.\n")
        L.append("| case | metric | xps | xps-observed | observed/xps |")
        L.append("|---|---|---:|---:|---:|")
        for c in obs:
            ss = s[c["name"]]
            for key, label, _ in ROWS:
                a, b = ss.get("xps", {}).get(key), ss.get("xps-observed", {}).get(key)
                if a is None and b is None:
                    continue
                if key == "main":
                    label = c["unit"]
                label = label.format(per=c.get("per") or "op")
                L.append("| %s | %s | %s | %s | %s |" % (c["title"].replace("observability: ", ""),
                                                         label, fmt(a), fmt(b), fmt(ratio(b, a))))
        L.append("")
        L.append("Server CPU µs per operation (schedstat) round by round, and the "
                 "observed/plain ratio of each round's pair:\n")
        L.append("| case | server | per round | median |")
        L.append("|---|---|---|---:|")
        for c in obs:
            for sv in ("xps", "xps-observed"):
                vals = [(r["round"], (r.get("derived") or {}).get("cpu_us_per_op"))
                        for r in doc["runs"] if r["case"] == c["name"] and r["server"] == sv]
                L.append("| %s | %s | %s | %s |" % (
                    c["title"].replace("observability: ", ""), sv,
                    ", ".join(fmt(v) for _, v in sorted(vals)),
                    fmt(s[c["name"]].get(sv, {}).get("cpu_us_per_op"))))
            by = {}
            for r in doc["runs"]:
                if r["case"] == c["name"] and r.get("exit_code") == 0 and r.get("derived"):
                    by.setdefault(r["round"], {})[r["server"]] = r["derived"].get("cpu_us_per_op")
            pair = [ratio(v.get("xps-observed"), v.get("xps")) for _, v in sorted(by.items())]
            L.append("| %s | observed/xps | %s | %s |" % (
                c["title"].replace("observability: ", ""),
                ", ".join(fmt(v) for v in pair), fmt(med(pair))))
            recs = [(r.get("access_log_records"), r.get("metrics_lines_total")) for r in doc["runs"]
                    if r["case"] == c["name"] and r["server"] == "xps-observed"]
            if recs:
                L.append("| %s | sanity per run: access-log records (after exit) / xps_lines_total (scraped before SIGTERM) | %s | |" % (
                    c["title"].replace("observability: ", ""),
                    ", ".join("%s / %s" % rc for rc in recs)))
        L.append("")

    failed = [r for r in doc["runs"] if r.get("exit_code") != 0]
    L.append("## Run health\n")
    L.append("%d runs, %d failed (non-zero exit of the load generator: wrong reply, connection "
             "error or timeout)." % (len(doc["runs"]), len(failed)))
    for r in failed:
        L.append("- %s / %s / round %s: exit %s; %s" % (
            r["case"], r["server"], r["round"], r.get("exit_code"),
            " | ".join(r.get("stderr") or [r.get("error", "")])))
    L.append("")
    with open(path, "w") as f:
        f.write("\n".join(L))


def _runs_values(doc, case, server, key):
    return [r["derived"].get(key) for r in doc["runs"]
            if r["case"] == case and r["server"] == server and r.get("exit_code") == 0
            and r.get("derived") and r["derived"].get(key) is not None]


def write_svg(doc, s, path):
    cases = [c for c in doc["cases"] if c["name"] in s]
    panel_w, panel_h, gap, head = 400, 170, 20, 22
    left, top = 20, 78
    row_h = head + panel_h + gap
    width = left + 2 * panel_w + gap + 20
    height = top + len(cases) * row_h + 10
    o = []
    o.append('<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" '
             'font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="11">' % (width, height))
    o.append('<rect width="100%" height="100%" fill="white"/>')
    info = doc["machine"]
    o.append('<text x="%d" y="22" font-size="15" font-weight="bold">xps vs tokio-peer vs c-echo: '
             'median of %s round(s); whiskers = min–max</text>' % (left, rounds_text(doc["config"])))
    o.append('<text x="%d" y="40" fill="#555">%s · %s vCPU · kernel %s · %s · server on CPU %s, '
             'load generator on CPU %s (scaling cases unpinned)</text>' % (
                 left, escape(str(info.get("cpu_model"))), info.get("nproc"),
                 escape(str(info.get("kernel"))), escape(str(info.get("date"))),
                 doc["config"]["server_cpu"], doc["config"]["client_cpu"]))
    o.append('<text x="%d" y="58" fill="#555">Right panels: server CPU per operation, darker part = '
             'user time, lighter part = system time (kernel).</text>' % left)
    for i, c in enumerate(cases):
        ss = s[c["name"]]
        if c["name"].startswith("scale-"):
            servers = ["xps-w1", "xps-w2"]
        elif c["name"].startswith("obs-"):
            servers = ["xps", "xps-observed"]
        else:
            servers = ["xps", "tokio-peer", "c-echo"]
        y_head = top + i * row_h
        o.append('<text x="%d" y="%d" font-size="13" font-weight="bold">%s</text>' % (
            left, y_head + 14, escape(c["title"])))
        y0 = y_head + head
        if c.get("per"):
            second = ("cpu_us_per_op", "server CPU µs per %s (lower is better)" % c["per"])
        else:
            second = ("rss_kb", "server VmRSS kB while holding (lower is better)")
        panels = [("main", "%s (%s is better)" % (
            c["unit"], "lower" if c.get("lower_is_better") else "higher")), second]
        for pj, (key, title) in enumerate(panels):
            x0 = left + pj * (panel_w + gap)
            o.append('<rect x="%d" y="%d" width="%d" height="%d" fill="#f8f9fa" stroke="#dee2e6"/>'
                     % (x0, y0, panel_w, panel_h))
            o.append('<text x="%d" y="%d">%s</text>' % (x0 + 8, y0 + 15, escape(title)))
            vals = [ss.get(sv, {}).get(key) for sv in servers]
            spans = []
            for sv in servers:
                vs = _runs_values(doc, c["name"], sv, key)
                spans.append((min(vs), max(vs)) if vs else (None, None))
            vmax = max([v for v in vals if v is not None] +
                       [hi for _, hi in spans if hi is not None] or [1]) or 1
            base = y0 + panel_h - 24
            plot_h = panel_h - 58
            bw = 64
            step = (panel_w - 40) / len(servers)
            for k, sv in enumerate(servers):
                bx = x0 + 20 + k * step + (step - bw) / 2
                v = vals[k]
                color = COLORS.get(sv, "#888")
                if v is not None:
                    h = plot_h * v / vmax
                    user = ss.get(sv, {}).get("cpu_user_part_us_per_op") if key == "cpu_us_per_op" else None
                    if user is not None:
                        uh = min(h, plot_h * user / vmax)
                        o.append('<rect x="%.1f" y="%.1f" width="%d" height="%.1f" fill="%s" '
                                 'fill-opacity="0.45"/>' % (bx, base - h, bw, h - uh, color))
                        o.append('<rect x="%.1f" y="%.1f" width="%d" height="%.1f" fill="%s"/>'
                                 % (bx, base - uh, bw, uh, color))
                    else:
                        o.append('<rect x="%.1f" y="%.1f" width="%d" height="%.1f" fill="%s"/>'
                                 % (bx, base - h, bw, h, color))
                    lo, hi = spans[k]
                    top_y = base - h
                    if lo is not None and hi is not None and hi > lo:
                        cx = bx + bw / 2
                        y_lo, y_hi = base - plot_h * lo / vmax, base - plot_h * hi / vmax
                        o.append('<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#212529"/>'
                                 % (cx, y_lo, cx, y_hi))
                        for yy in (y_lo, y_hi):
                            o.append('<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#212529"/>'
                                     % (cx - 6, yy, cx + 6, yy))
                        top_y = min(top_y, y_hi)
                    o.append('<text x="%.1f" y="%.1f" text-anchor="middle">%s</text>'
                             % (bx + bw / 2, top_y - 4, fmt(v)))
                else:
                    o.append('<text x="%.1f" y="%.1f" text-anchor="middle" fill="#999">n/a</text>'
                             % (bx + bw / 2, base - 4))
                o.append('<text x="%.1f" y="%.1f" text-anchor="middle">%s</text>' % (
                    bx + bw / 2, base + 15, escape(sv)))
            o.append('<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="#495057"/>' % (
                x0 + 10, base, x0 + panel_w - 10, base))
    o.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(o) + "\n")


def write(doc, out):
    s = summarize(doc)
    write_md(doc, s, os.path.join(out, "RESULTS.md"))
    write_svg(doc, s, os.path.join(out, "chart.svg"))
    print("report.py: wrote %s and %s" % (os.path.join(out, "RESULTS.md"),
                                          os.path.join(out, "chart.svg")), file=sys.stderr)


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", "results.json")
    with open(path) as f:
        doc = json.load(f)
    write(doc, os.path.dirname(os.path.abspath(path)))


if __name__ == "__main__":
    main()
