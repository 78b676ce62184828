#!/usr/bin/env python3
"""Reproducer: a client that resets mid-reply leaks its replies to another client.

    scripts/repro_reset_leak.py PORT [SECONDS]

Against an xps on 127.0.0.1:PORT, loops for SECONDS (default 10):

* client A connects, sends a few KB of lines marked "SECRET-A", and resets the
  connection at once (SO_LINGER 0, close) without reading;
* client B connects, sends "hello\\n" and reads 6 bytes; the reply must be
  "olleh\\n".

Any other reply to B is another connection's data: it is printed and counted.
Exits 1 if any leak was seen, 0 otherwise. Loopback only; bounded in time.
"""

import socket
import struct
import sys
import time


def main() -> int:
    port = int(sys.argv[1])
    secs = float(sys.argv[2]) if len(sys.argv) > 2 else 10.0
    addr = ("127.0.0.1", port)
    payload = b"".join(b"SECRET-A line %d\n" % i for i in range(300))
    deadline = time.monotonic() + secs
    tries = leaks = 0
    while time.monotonic() < deadline:
        tries += 1
        a = socket.create_connection(addr, timeout=5)
        a.sendall(payload)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        a.close()
        b = socket.create_connection(addr, timeout=5)
        b.sendall(b"hello\n")
        # Read until B's own reply has come (after any foreign bytes).
        got = b""
        b.settimeout(2)
        try:
            while not got.endswith(b"olleh\n") and len(got) < 1 << 16:
                chunk = b.recv(4096)
                if not chunk:
                    break
                got += chunk
        except OSError as e:
            got += b"<%s>" % str(e).encode()
        b.close()
        if got != b"olleh\n":
            leaks += 1
            if leaks <= 5:
                print(f"try {tries}: B sent b'hello\\n', got {len(got)} bytes: {got[:80]!r}...")
    print(f"{tries} tries, {leaks} replies to B carried other data")
    return 1 if leaks else 0


if __name__ == "__main__":
    sys.exit(main())
