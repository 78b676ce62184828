#!/usr/bin/env python3
"""Runs the benchmark matrix for bench/compare.sh (which builds first).

For every case, each server (xps, tokio-peer, c-echo) runs as a FRESH process
in alternation (the order rotates every round), pinned to CPU 0 while the
load generator runs on CPU 1. The load generator measures the server's CPU
time (utime/stime from /proc/PID/stat) over exactly its measured window and
the server's RSS; this script adds the client's CPU time and an estimate of
the CPU that other processes on the machine took meanwhile (noise).

Writes OUT/results.json (every raw run) and then OUT/RESULTS.md and
OUT/chart.svg through report.py. Standard library only.
"""

import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
REL = os.path.join(ROOT, "target", "release")
BENCH = os.path.join(REL, "xps-bench")
sys.path.insert(0, HERE)
import report  # noqa: E402


def env_num(name, default, kind=float):
    v = os.environ.get(name)
    return kind(v) if v not in (None, "") else default


QUICK = os.environ.get("QUICK") == "1"
# Five rounds: on this shared VM one round of a case can be 20 % off the
# others, and the median of three moved the headline ratios by as much
# between full runs. The idle case measures RSS, which does not vary: three.
ROUNDS = env_num("ROUNDS", 1 if QUICK else 5, int)
IDLE_ROUNDS = min(ROUNDS, 3)
DURATION = env_num("DURATION", 1.0 if QUICK else 3.0)
WARMUP = env_num("WARMUP", 0.3 if QUICK else 0.5)
IDLE_CONNS = env_num("IDLE_CONNS", 2000 if QUICK else 10000, int)
IDLE_HOLD = env_num("IDLE_HOLD", 1.0 if QUICK else 3.0)
OUT = os.environ.get("OUT") or os.path.join(HERE, "results")
ONLY = [c for c in os.environ.get("CASES", "").split(",") if c]
# OBSERVE=1 runs only the observability comparison (OBSERVED below): xps with
# --metrics and --access-log against plain xps, instead of the peer matrix.
OBSERVE = os.environ.get("OBSERVE") == "1"
# NICE=-10 runs servers and load generator at a higher priority, so that other
# load on a shared machine disturbs the measurement less (needs root).
NICE = env_num("NICE", 0, int)


def niced(cmd):
    return (["nice", "-n", str(NICE)] if NICE else []) + cmd

SERVER_CPU = "0"
CLIENT_CPU = "1"

SERVERS = {
    "xps": {"cmd": [os.path.join(REL, "xps"), "--listen", "127.0.0.1:0"], "verify": "reverse"},
    "tokio-peer": {"cmd": [os.path.join(REL, "tokio-peer"), "127.0.0.1:0"], "verify": "reverse"},
    "c-echo": {"cmd": [os.path.join(REL, "c-echo"), "127.0.0.1:0"], "verify": "echo"},
}
PEERS = ["xps", "tokio-peer", "c-echo"]

# metric: the JSON field that is the case's headline number; per: the unit of
# work the server's CPU time is divided by.
CASES = [
    {"name": "lines-c1-p1", "title": "lines C=1 P=1 N=64",
     "args": ["lines", "--conns", "1", "--pipeline", "1", "--size", "64"],
     "metric": "lines_per_s", "unit": "lines/s", "per": "line"},
    {"name": "lines-c64-p16", "title": "lines C=64 P=16 N=64",
     "args": ["lines", "--conns", "64", "--pipeline", "16", "--size", "64"],
     "metric": "lines_per_s", "unit": "lines/s", "per": "line"},
    {"name": "lines-c512-p1", "title": "lines C=512 P=1 N=64",
     "args": ["lines", "--conns", "512", "--pipeline", "1", "--size", "64"],
     "metric": "lines_per_s", "unit": "lines/s", "per": "line"},
    {"name": "bulk-c1", "title": "bulk C=1 N=1024",
     "args": ["bulk", "--conns", "1", "--size", "1024"],
     "metric": "mb_per_s", "unit": "MB/s", "per": "MB"},
    {"name": "churn-c16", "title": "churn C=16 N=64",
     "args": ["churn", "--conns", "16", "--size", "64"],
     "metric": "conns_per_s", "unit": "conn/s", "per": "conn"},
    # The same churn behind PROXY v2: xps on a --listen-proxy listener, one
    # header per connection (the peers do not speak PROXY: xps only).
    {"name": "churn-proxy", "title": "churn C=16 N=64, PROXY v2 header per connection",
     "args": ["churn", "--conns", "16", "--size", "64", "--proxy-v2"],
     "metric": "conns_per_s", "unit": "conn/s", "per": "conn",
     "servers": {"xps": {"cmd": [os.path.join(REL, "xps"), "--listen-proxy", "127.0.0.1:0"],
                         "verify": "reverse"}}},
    {"name": "idle-c%d" % IDLE_CONNS, "title": "idle C=%d" % IDLE_CONNS,
     "args": ["idle", "--conns", str(IDLE_CONNS), "--hold", str(IDLE_HOLD), "--size", "64"],
     "metric": "rss_per_conn_bytes", "unit": "B/conn (RSS)", "per": None, "lower_is_better": True,
     "rounds": IDLE_ROUNDS},
]

# xps --workers 2 against --workers 1, nothing pinned: on a 2-CPU machine the
# load generator competes with the second worker for the same two CPUs.
SCALING = [
    {"name": "scale-lines-c64-p16", "title": "scaling: lines C=64 P=16 N=64, unpinned",
     "args": ["lines", "--conns", "64", "--pipeline", "16", "--size", "64"],
     "metric": "lines_per_s", "unit": "lines/s", "per": "line"},
    {"name": "scale-lines-c512-p1", "title": "scaling: lines C=512 P=1 N=64, unpinned",
     "args": ["lines", "--conns", "512", "--pipeline", "1", "--size", "64"],
     "metric": "lines_per_s", "unit": "lines/s", "per": "line"},
]
SCALING_SERVERS = {
    "xps-w1": {"cmd": SERVERS["xps"]["cmd"] + ["--workers", "1"], "verify": "reverse"},
    "xps-w2": {"cmd": SERVERS["xps"]["cmd"] + ["--workers", "2"], "verify": "reverse"},
}

# Observability on vs off: the same pinned cases, xps against xps with
# --metrics 127.0.0.1:0 and --access-log FILE (a fresh file per process, see
# run_one). "base" is the main case it copies; CASES accepts either name.
OBSERVED = [dict(c, name="obs-" + c["name"], base=c["name"],
                 title="observability: " + c["title"])
            for c in CASES if c["name"] in ("lines-c64-p16", "churn-c16")]
OBSERVED_SERVERS = {
    "xps": SERVERS["xps"],
    "xps-observed": {"cmd": SERVERS["xps"]["cmd"] + ["--metrics", "127.0.0.1:0"],
                     "verify": "reverse", "access_log": True},
}
ACCESS_DIR = None  # a temporary directory, made by main() when needed

HZ = os.sysconf("SC_CLK_TCK")


def log(msg):
    print(msg, file=sys.stderr, flush=True)


class Server:
    """A server process we started; we stop it by its PID only."""

    def __init__(self, name, cmd, cpus):
        full = niced((["taskset", "-c", cpus] if cpus else []) + cmd)
        self.name = name
        # taskset execs the server, so this PID is the server's.
        self.p = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, errors="replace")
        self.pid = self.p.pid
        self.log = []
        self.port = None
        self.metrics = None  # "127.0.0.1:PORT" when the server logged one
        self.ready = threading.Event()
        self.t = threading.Thread(target=self._drain, daemon=True)
        self.t.start()
        if not self.ready.wait(15) or self.port is None:
            self.stop()
            raise RuntimeError("%s did not report its port: %s" % (name, "".join(self.log[-5:])))

    def _drain(self):
        for line in self.p.stderr:
            self.log.append(line)
            # "metrics on http://HOST:PORT/metrics" comes before the listeners.
            if self.metrics is None and "metrics on http://" in line:
                self.metrics = line.split("metrics on http://", 1)[1].split("/", 1)[0]
            if self.port is None and "listening on port" in line:
                try:
                    self.port = int(line.split("listening on port", 1)[1].split()[0])
                except (ValueError, IndexError):
                    pass
                self.ready.set()
        self.ready.set()

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.t.join(2)
        return self.p.returncode


def proc_cpu_ticks(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return int(rest[11]) + int(rest[12])
    except (OSError, IndexError, ValueError):
        return None


def machine_ticks():
    """(busy, steal): user+nice+system of the whole machine (irq, softirq and
    steal are not attributed to processes), and the time the hypervisor ran
    something else on this VM's CPUs (steal)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return v[0] + v[1] + v[2], v[7]


def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def scrape_lines(addr):
    """xps_lines_total from a server's /metrics, or None."""
    try:
        with urllib.request.urlopen("http://%s/metrics" % addr, timeout=5) as r:
            for line in r.read().decode(errors="replace").splitlines():
                if line.startswith("xps_lines_total "):
                    return int(float(line.split()[1]))
    except (OSError, ValueError):
        pass
    return None


def count_lines(path):
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


def run_one(case, server_name, spec, rnd, pin):
    cmd = list(spec["cmd"])
    access_log = None
    if spec.get("access_log"):
        # A fresh, empty file for every process: the log's size does not grow
        # from round to round.
        access_log = os.path.join(ACCESS_DIR, "%s-%d.log" % (case["name"], rnd))
        if os.path.exists(access_log):
            os.remove(access_log)
        cmd += ["--access-log", access_log]
    srv = Server(server_name, cmd, SERVER_CPU if pin else None)
    time.sleep(0.2)
    args = case["args"] + ["--addr", "127.0.0.1:%d" % srv.port, "--verify", spec["verify"],
                           "--server-pid", str(srv.pid)]
    if case["args"][0] == "idle":
        args += ["--timeout", "60"]
        bound = 2 * 60 + IDLE_HOLD + 30
    else:
        args += ["--duration", str(DURATION), "--warmup", str(WARMUP)]
        bound = DURATION + WARMUP + 30
    cmd = niced((["taskset", "-c", CLIENT_CPU] if pin else []) + [BENCH] + args)
    la = loadavg()
    s0, (m0, st0) = proc_cpu_ticks(srv.pid), machine_ticks()
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    try:
        cp = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            errors="replace", timeout=bound)
        rc, out, err = cp.returncode, cp.stdout, cp.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = None, e.stdout or "", (e.stderr or "") + "\n(timed out)"
        if isinstance(out, bytes):
            out = out.decode(errors="replace")
        if isinstance(err, bytes):
            err = err.decode(errors="replace")
    wall = time.monotonic() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    s1, (m1, st1) = proc_cpu_ticks(srv.pid), machine_ticks()
    metrics_lines = scrape_lines(srv.metrics) if srv.metrics else None
    server_rc = srv.stop()
    access_log_records = None
    if access_log:
        access_log_records = count_lines(access_log)
        try:
            os.remove(access_log)
        except OSError:
            pass
    client_cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    server_cpu_all = (s1 - s0) / HZ if s0 is not None and s1 is not None else None
    other = None
    if server_cpu_all is not None:
        other = max(0.0, (m1 - m0) / HZ - server_cpu_all - client_cpu)
    j = None
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            try:
                j = json.loads(line)
            except ValueError:
                pass
            break
    run = {
        "case": case["name"], "server": server_name, "round": rnd, "pinned": pin,
        "cmd": " ".join(os.path.basename(a) if a == BENCH else a for a in cmd),
        "server_cmd": " ".join(os.path.basename(spec["cmd"][0]) if i == 0 else a
                               for i, a in enumerate(cmd)),
        "exit_code": rc, "server_exit_code": server_rc, "wall_s": round(wall, 3),
        "loadavg_before": la, "client_cpu_s": round(client_cpu, 3),
        "server_cpu_whole_run_s": server_cpu_all,
        "other_cpu_s": None if other is None else round(other, 3),
        "steal_s": round((st1 - st0) / HZ, 3),
        "result": j,
        "stderr": err.strip().splitlines()[-5:] if err.strip() else [],
        "server_log_tail": [line.rstrip() for line in srv.log[-3:]],
    }
    if srv.metrics:
        # Sanity: the counters moved (whole run, warm-up included).
        run["metrics_lines_total"] = metrics_lines
    if access_log:
        run["access_log_records"] = access_log_records
    run["derived"] = report.derive(case, j) if j else None
    ok = rc == 0 and j is not None
    m = run["derived"]["main"] if run["derived"] else None
    log("  %-22s %-10s round %d: %s %s%s" % (
        case["name"], server_name, rnd,
        report.fmt(m), case["unit"],
        "" if ok else "  FAILED rc=%s %s" % (rc, " | ".join(run["stderr"][-2:]))))
    return run


def machine_info():
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass

    def first_line(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.splitlines()[0]
        except (OSError, IndexError):
            return None

    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "loadavg_start": loadavg(),
        "rustc": first_line(["rustc", "--version"]),
        "gcc": first_line(["gcc", "--version"]),
        "git_commit": first_line(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"]),
        "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }


def main():
    global ACCESS_DIR
    for b in [BENCH] + [s["cmd"][0] for s in SERVERS.values()]:
        if not os.access(b, os.X_OK):
            sys.exit("compare.py: %s missing; run bench/compare.sh (it builds first)" % b)
    os.makedirs(OUT, exist_ok=True)
    if OBSERVE:
        ACCESS_DIR = tempfile.mkdtemp(prefix="xps-bench-access-")
    info = machine_info()
    config = {"quick": QUICK, "rounds": ROUNDS, "idle_rounds": IDLE_ROUNDS, "duration_s": DURATION, "warmup_s": WARMUP,
              "idle_conns": IDLE_CONNS, "idle_hold_s": IDLE_HOLD, "nice": NICE, "observe": OBSERVE,
              "server_cpu": SERVER_CPU, "client_cpu": CLIENT_CPU}
    log("== machine: %s" % json.dumps(info))
    log("== config: %s" % json.dumps(config))
    runs = []
    t_start = time.monotonic()
    if OBSERVE:
        plan = [(c, OBSERVED_SERVERS, list(OBSERVED_SERVERS), True) for c in OBSERVED]
    else:
        plan = [(c, c.get("servers", SERVERS), list(c.get("servers", PEERS)), True) for c in CASES] + \
               [(c, SCALING_SERVERS, list(SCALING_SERVERS), False) for c in SCALING]
    for case, servers, order, pin in plan:
        if ONLY and case["name"] not in ONLY and case.get("base") not in ONLY:
            continue
        log("== %s" % case["title"])
        for rnd in range(case.get("rounds", ROUNDS)):
            k = rnd % len(order)
            for name in order[k:] + order[:k]:
                try:
                    runs.append(run_one(case, name, servers[name], rnd, pin))
                except Exception as e:  # a server that will not start: record, go on
                    log("  %s %s round %d: ERROR %s" % (case["name"], name, rnd, e))
                    runs.append({"case": case["name"], "server": name, "round": rnd,
                                 "pinned": pin, "exit_code": None, "error": str(e),
                                 "result": None, "derived": None})
    if ACCESS_DIR:
        try:
            os.rmdir(ACCESS_DIR)
        except OSError:
            pass
    info["loadavg_end"] = loadavg()
    info["total_s"] = round(time.monotonic() - t_start, 1)
    doc = {"machine": info, "config": config,
           "cases": [{k: v for k, v in c.items()}
                     for c in (OBSERVED if OBSERVE else CASES + SCALING)],
           "runs": runs}
    path = os.path.join(OUT, "results.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    log("== wrote %s" % path)
    report.write(doc, OUT)
    failed = [r for r in runs if r.get("exit_code") != 0]
    if failed:
        log("== %d run(s) failed; see results.json" % len(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
