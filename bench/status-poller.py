#!/usr/bin/env python3
"""What an open status page asks of the metrics address, for SECS seconds:
api/history once, then api and api/connections?limit=500 once a second, on
one kept-alive connection (as a browser does).

usage: status-poller.py PORT SECS     (loopback only)
"""
import http.client
import sys
import time

port, secs = int(sys.argv[1]), float(sys.argv[2])
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)


def get(path):
    conn.request("GET", path)
    r = conn.getresponse()
    body = r.read()
    if r.status != 200:
        raise SystemExit("%s: %d %s" % (path, r.status, body[:200]))
    return len(body)


end = time.monotonic() + secs
get("/api/history")
polls = 0
while time.monotonic() < end:
    get("/api")
    get("/api/connections?limit=500")
    polls += 1
    time.sleep(max(0.0, min(1.0, end - time.monotonic())))
print("polls: %d" % polls)
