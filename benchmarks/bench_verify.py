"""Verify: `certrelay verify` of many endpoints, all serving their current certificate.

After a reload, certrelay checks that each service serves the new certificate; on a
host with many lineages that check must stay quick (the target: 100 endpoints in at
most 1 s). 100 lineages, each with its own certificate served by its own TLS server
on 127.0.0.1 in this process, one rule per lineage naming its endpoint, against the
obvious script: a sequential `openssl s_client | openssl x509` loop in sh. 5 rounds,
the two taking turns; medians. Where certrelay has no verify command, the row says
"not available".
"""

import contextlib
import selectors
import socket
import ssl
import statistics
import subprocess
import threading
import time

from harness import NOTES, ROWS, Row, progress, require, seconds, seconds_row
from sandbox import Sandbox, certificates, install_certrelay

VERIFY_ENDPOINTS = 100


class TLSServers:
    """TLS servers on 127.0.0.1, one port per (certificate file, key file), in this
    process: one thread accepts on every port, a thread per connection does the
    handshake (so that the servers are never the bottleneck) and answers one HTTP
    request with 200. `ports` lists the ports in the order of the pairs."""

    def __init__(self, pairs):
        self.selector = selectors.DefaultSelector()
        self.ports = []
        for certificate, key in pairs:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(certificate, key)
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            listener.listen(128)
            listener.setblocking(False)
            self.selector.register(listener, selectors.EVENT_READ, context)
            self.ports.append(listener.getsockname()[1])
        self.closing = threading.Event()
        self.acceptor = threading.Thread(target=self._accept, name="tls-accept", daemon=True)
        self.acceptor.start()

    def _accept(self):
        while not self.closing.is_set():
            for key, _ in self.selector.select(0.1):
                with contextlib.suppress(BlockingIOError):
                    connection, _ = key.fileobj.accept()
                    threading.Thread(target=self._serve, args=(connection, key.data), daemon=True).start()

    @staticmethod
    def _serve(connection, context):
        connection.setblocking(True)
        connection.settimeout(5)
        with contextlib.suppress(OSError), context.wrap_socket(connection, server_side=True) as tls:
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = tls.recv(4096)
                if not chunk:
                    return
                request += chunk
            tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    def close(self):
        self.closing.set()
        self.acceptor.join()
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()
        self.selector.close()


def run(work):
    wrapper = install_certrelay("", work / "install")
    pool = certificates(work.parent / "certificates")
    lineages = [(f"v{index:03d}.example", [f"v{index:03d}.example", f"www.v{index:03d}.example"])
                for index in range(VERIFY_ENDPOINTS)]
    sandbox = Sandbox(work / "site", "")
    pairs = []
    for name, domains in lineages:
        sandbox.renew(name, version=1, pem=pool.pem(name, domains))
        pairs.append((sandbox.config_dir / "live" / name / "cert.pem", pool.key_path))
    servers = TLSServers(pairs)
    try:
        rules = ["[settings]", "min-interval = 0", ""]
        for (name, _), port in zip(lineages, servers.ports):
            rules += ["[[rule]]", f'match = ["{name}"]', 'reload = ["apache2"]', f'verify = ["https://127.0.0.1:{port}"]', ""]
        sandbox.rules.write_text("\n".join(rules))
        probe = subprocess.run([str(wrapper), "verify", "--help"], env=sandbox.environment(),
                               capture_output=True, text=True, timeout=60)
        if probe.returncode != 0:
            reason = (probe.stderr.strip().splitlines() or ["exit status " + str(probe.returncode)])[-1]
            ROWS.append(Row("verify", f"{VERIFY_ENDPOINTS} endpoints, all current (target ≤ 1 s)",
                            f"not available: `certrelay verify --help`: {reason[:160]}"))
            return
        # Baseline: what an admin's script does, one endpoint after the other.
        missing = require("openssl")
        loop = ("for port in \"$@\"; do openssl s_client -connect 127.0.0.1:$port </dev/null 2>/dev/null"
                " | openssl x509 -noout -fingerprint -sha256 >/dev/null || exit 1; done")
        baseline = None if missing else ["/bin/sh", "-c", loop, "sh", *map(str, servers.ports)]
        walls = {"certrelay": [], "openssl": []}
        for round_number in range(5):
            progress(f"verify: certrelay verify of {VERIFY_ENDPOINTS} endpoints, round {round_number + 1} of 5")
            started = time.monotonic()
            done = sandbox.certrelay(wrapper, "verify", timeout=300)
            walls["certrelay"].append(time.monotonic() - started)
            if done.returncode != 0:
                raise RuntimeError(f"certrelay verify exited {done.returncode}:\n{done.stderr[-2000:]}")
            if baseline:
                started = time.monotonic()
                subprocess.run(baseline, check=True, timeout=300, stdin=subprocess.DEVNULL)
                walls["openssl"].append(time.monotonic() - started)
        ours = statistics.median(walls["certrelay"])
        metric = f"{VERIFY_ENDPOINTS} endpoints on 127.0.0.1, all current: wall time (target ≤ 1 s)"
        if baseline:
            theirs = statistics.median(walls["openssl"])
            ROWS.append(seconds_row("verify", metric, ours, "sequential `openssl s_client | openssl x509` loop (sh)",
                                    theirs))
        else:
            ROWS.append(Row("verify", metric, seconds(ours), "openssl loop", f"not measured: {missing}"))
        NOTES.append(
            f"verify: {VERIFY_ENDPOINTS} lineages, each with its own certificate ({pool.how}), each served by its"
            " own TLS server on 127.0.0.1 made in the benchmark process (python ssl, a thread per connection);"
            " one rule per lineage with `verify = [\"https://127.0.0.1:PORT\"]`. 5 rounds, interleaved; medians."
        )
    finally:
        servers.close()
