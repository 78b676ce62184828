#!/usr/bin/env python3
"""A small scripted load to look at the status page with (it made
docs/status-page.png). Start xps first:

    xps -w 2 -l 127.0.0.1:8001 -l 127.0.0.1:8002 --listen-proxy 127.0.0.1:8003 --idle-timeout 0 \\
        --metrics 127.0.0.1:8004
    scripts/status-demo.py [SECONDS]      # default 400

then open http://127.0.0.1:8004/. It keeps about 30 connections open on
loopback: clients that chat at a rate that rises and falls, idle ones, one
that sends without reading (paused by flow control), PROXY clients naming
documentation addresses, one that never sends its PROXY header, and a
client that connects, sends a line and leaves a few times a second.
"""
import math
import socket
import sys
import threading
import time

HOST = "127.0.0.1"
END = time.monotonic() + (float(sys.argv[1]) if len(sys.argv) > 1 else 400)


def alive():
    return time.monotonic() < END


def connect(port, proxy_from=None):
    s = socket.create_connection((HOST, port))
    if proxy_from:
        src, sport = proxy_from
        s.sendall(b"PROXY TCP4 %s %s %d %d\r\n" % (src.encode(), HOST.encode(), sport, port))
    return s


def chat(port, phase, proxy_from=None):
    """Lines at a rate that rises and falls over a minute, replies read."""
    s = connect(port, proxy_from)
    s.settimeout(10)
    while alive():
        rate = 40 + 35 * math.sin(time.monotonic() / 60 * 2 * math.pi + phase)
        line = b"the quick brown fox %d\n" % int(rate)
        s.sendall(line * 50)
        got = 0
        while got < len(line) * 50:
            got += len(s.recv(65536))
        time.sleep(5 / max(rate, 1))


def idle(port):
    s = connect(port)
    while alive():
        time.sleep(1)
    s.close()


def flood(port):
    """Sends and never reads: paused once 1 MiB of replies wait."""
    s = connect(port)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    s.settimeout(1)
    chunk = b"0123456789abcdef\n" * 4096
    while alive():
        try:
            s.sendall(chunk)
        except socket.timeout:
            pass


def no_header(port):
    """Never sends its PROXY header: reopened before the 5 s deadline."""
    while alive():
        s = connect(port)
        time.sleep(4)
        s.close()


def churn(port):
    while alive():
        s = connect(port)
        s.sendall(b"hello\n")
        s.recv(64)
        s.close()
        time.sleep(0.3)


jobs = [(flood, (8001,))]  # first: its burst leaves the charts after 5 minutes
jobs += [(chat, (8001 + i % 2, i)) for i in range(10)]
jobs += [(chat, (8003, i, ("203.0.113.%d" % (10 + i), 40000 + i))) for i in range(4)]
jobs += [(idle, (8001 + i % 2,)) for i in range(8)]
jobs += [(no_header, (8003,)), (churn, (8002,))]
threads = [threading.Thread(target=f, args=a, daemon=True) for f, a in jobs]
for t in threads:
    t.start()
    time.sleep(0.2)
while alive():
    time.sleep(1)
