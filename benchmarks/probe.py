"""Outage probe for the downtime benchmark: a TLS handshake with HOST:PORT every INTERVAL
seconds for DURATION seconds; print JSON: {"probes", "failures", "longest_outage"} (the
longest time, in seconds, from a failed handshake to the next good one).

Usage: python3 probe.py HOST PORT DURATION [INTERVAL]   (run in the server's network namespace)
"""

import json
import socket
import ssl
import sys
import time


def main(host, port, duration, interval=0.005):
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    probes = failures = 0
    longest = 0.0
    down_since = None
    end = time.monotonic() + duration
    while time.monotonic() < end:
        started = time.monotonic()
        probes += 1
        try:
            with socket.create_connection((host, port), timeout=1) as raw:
                with context.wrap_socket(raw, server_hostname=host):
                    pass
            if down_since is not None:
                longest = max(longest, started - down_since)
                down_since = None
        except OSError:
            failures += 1
            if down_since is None:
                down_since = started
        time.sleep(max(0.0, interval - (time.monotonic() - started)))
    if down_since is not None:
        longest = max(longest, time.monotonic() - down_since)
    print(json.dumps({"probes": probes, "failures": failures, "longest_outage": longest}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), *(float(a) for a in sys.argv[4:5]))
