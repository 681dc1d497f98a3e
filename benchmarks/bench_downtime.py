"""Downtime: requests that fail while a renewal reaches apache2 under load.

certrelay reloads a service where a reload picks up the new certificate, because a
restart drops connections. This shows what that choice is worth: apache2 serves
HTTPS under `wrk` load; half-way through, a certificate is renewed and certrelay calls
`systemctl reload apache2` (the rule says reload) or, as the baseline, `systemctl
restart apache2` (the rule says restart). Failed requests are wrk's socket errors plus
non-2xx answers; alongside, probe.py makes a fresh TLS handshake every 5 ms and gives
the longest outage. A run without a renewal is the control.

apache2 runs under systemd in the Debian container. Where no container boots, apache2
is started by hand in a private network namespace and certrelay's systemctl is a shim
running `apache2 -k graceful` or `-k restart`, and the table says so.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from harness import HERE, NOTES, PROCESSES, PYTHON, ROWS, Row, progress, ratio, require, seconds, wait_for
from sandbox import Sandbox, install_certrelay

TOOLS = ("wrk",)  # without one, the rows that need it say "not measured"
WRK_SECONDS = 10
WRK_CONNECTIONS = 4

WRK_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
WRK_REQUESTS = re.compile(r"(\d+) requests in")


def parse_wrk(text):
    errors = WRK_ERRORS.search(text)
    socket_errors = sum(int(value) for value in errors.groups()) if errors else 0
    non2xx = int(WRK_NON2XX.search(text).group(1)) if WRK_NON2XX.search(text) else 0
    requests = int(WRK_REQUESTS.search(text).group(1))
    detail = f"connect {errors.group(1)}, read {errors.group(2)}, write {errors.group(3)}, timeout {errors.group(4)}" \
        if errors else "no socket errors"
    return {"failed": socket_errors + non2xx, "requests": requests, "non2xx": non2xx, "detail": detail}


def load_run(wrk_prefix, trigger, label):
    """Run wrk for WRK_SECONDS; call `trigger()` half-way. Return parse_wrk's dict + trigger time."""
    argv = [*wrk_prefix, "wrk", "-t", "2", "-c", str(WRK_CONNECTIONS), "-d", f"{WRK_SECONDS}s", "https://127.0.0.1/"]
    progress(f"downtime: wrk {WRK_SECONDS} s, {WRK_CONNECTIONS} connections: {label}")
    process = PROCESSES.start(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    # A TLS handshake every 5 ms alongside, for the length of the outage.
    probe = PROCESSES.start([*wrk_prefix, PYTHON, str(HERE / "probe.py"), "127.0.0.1", "443", str(WRK_SECONDS - 1)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    time.sleep(WRK_SECONDS / 2)
    took = None
    if trigger is not None:
        started = time.monotonic()
        trigger()
        took = time.monotonic() - started
    output, _ = process.communicate(timeout=WRK_SECONDS + 30)
    text = output.decode(errors="replace")
    if process.returncode != 0 or not WRK_REQUESTS.search(text):
        raise RuntimeError(f"wrk failed ({process.returncode}):\n{text}")
    result = parse_wrk(text)
    result["took"] = took
    probed, _ = probe.communicate(timeout=30)
    try:
        result["probe"] = json.loads(probed.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RuntimeError(f"the outage probe failed ({probe.returncode}):\n{probed.decode(errors='replace')}") from None
    return result


def downtime_rows(results, how):
    def show(result):
        text = f"{result['failed']:,} failed of {result['requests']:,} ({result['detail']}, non-2xx {result['non2xx']})"
        probe = result["probe"]
        text += f"; TLS probe every 5 ms: {probe['failures']} of {probe['probes']} failed"
        if probe["failures"]:
            text += f", longest outage {seconds(probe['longest_outage'])}"
        if result["took"] is not None:
            text += f"; renewal + certrelay run took {seconds(result['took'])}"
        return text

    ROWS.append(Row("downtime", f"failed requests, {how[0]} via certrelay", show(results["reload"]),
                    f"{how[1]} via certrelay", show(results["restart"]),
                    ratio(results["reload"]["failed"], results["restart"]["failed"])))
    ROWS.append(Row("downtime", "failed requests, no renewal (control)", "", "wrk alone", show(results["control"])))


def apache2_rules(verb):
    """Return certrelay's rules that `verb` (reload or restart) apache2 on any renewal."""
    return f"[settings]\nmin-interval = 0\n\n[[rule]]\nmatch = [\"*\"]\n{verb} = [\"apache2\"]\n"


def run(work, get_container):
    missing = require(*TOOLS)
    if missing:
        ROWS.append(Row("downtime", "failed requests", f"not measured: {missing}"))
        return
    container, reason = get_container()
    if container is None:
        progress(f"downtime: no container ({reason}); apache2 in a network namespace instead")
        return run_netns(work, reason)
    container.run(["a2enmod", "-q", "ssl"])
    container.run(["a2ensite", "-q", "default-ssl"])
    container.run(["systemctl", "restart", "apache2"])
    probe = [*container.enter("n"), PYTHON, "-c",
             "import ssl, urllib.request; c = ssl._create_unverified_context();"
             " urllib.request.urlopen('https://127.0.0.1/', context=c, timeout=2).read()"]
    wait_for(lambda: subprocess.run(probe, capture_output=True).returncode == 0, 20, "apache2 to serve HTTPS", 0.2)
    wrapper = install_certrelay(container.root, "/opt/certrelay")
    results = {"control": load_run(container.enter("n"), None, "no renewal (control)")}
    for verb in ("reload", "restart"):
        site = container.host_path(f"/srv/downtime-{verb}")
        sandbox = Sandbox(site, apache2_rules(verb), systemctl=None, inside=f"/srv/downtime-{verb}")

        def trigger(sandbox=sandbox, verb=verb):
            sandbox.renew("example.org")
            sandbox.publish("example.org", ["example.org", "www.example.org"])
            done = container.run([str(wrapper), "run", *sandbox.arguments()], check=False)
            if done.returncode != 0 or f"done: {verb} apache2.service" not in done.stderr:
                raise RuntimeError(f"certrelay run ({verb}) failed ({done.returncode}):\n{done.stdout}{done.stderr}")

        container.run(["systemctl", "is-active", "apache2"])
        time.sleep(1.0)
        results[verb] = load_run(container.enter("n"), trigger, f"certrelay -> systemctl {verb} apache2")
    downtime_rows(results, ("`systemctl reload apache2`", "`systemctl restart apache2`"))
    NOTES.append(
        "downtime: apache2 2.4 (mpm_event, Debian's default-ssl site with the snakeoil certificate) under"
        " systemd in a booted Debian 12 container with its own network namespace; wrk (on the host, in that"
        f" namespace) -t2 -c{WRK_CONNECTIONS} -d{WRK_SECONDS}s https://127.0.0.1/; at {WRK_SECONDS / 2:g} s a"
        " certificate is renewed, a notification published, and `certrelay run` (inside the container) calls the"
        " real systemctl. Failed = wrk's socket errors (connect, read, write, timeout) + non-2xx responses."
        " Debian's apache2.service: reload = `apachectl graceful`, restart = graceful-stop + start. Alongside"
        " wrk, benchmarks/probe.py makes a fresh TLS handshake every 5 ms: the longest outage is the time from a"
        " failed handshake to the next good one."
    )


def run_netns(work, container_reason):
    """Fallback: apache2 started by hand in a private network namespace; certrelay's
    systemctl is a shim turning reload into `apache2 -k graceful`, restart into `-k restart`."""
    missing = require("apache2", "ip")
    if missing:
        ROWS.append(Row("downtime", "failed requests", f"not measured: no container ({container_reason}), and {missing}"))
        return
    namespace = f"certrelay-bench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", namespace, "ip", "link", "set", "lo", "up"], check=True)
        site = work / "apache"
        (site / "logs").mkdir(parents=True)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                        "-keyout", str(site / "key.pem"), "-out", str(site / "cert.pem"), "-days", "2",
                        "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
        (site / "htdocs").mkdir()
        (site / "htdocs" / "index.html").write_text("<html><body>" + "certrelay " * 1000 + "</body></html>\n")
        modules = "/usr/lib/apache2/modules"
        (site / "httpd.conf").write_text(f"""\
ServerRoot {site}
PidFile {site}/httpd.pid
ErrorLog {site}/logs/error.log
LoadModule mpm_event_module {modules}/mod_mpm_event.so
LoadModule authz_core_module {modules}/mod_authz_core.so
LoadModule mime_module {modules}/mod_mime.so
LoadModule dir_module {modules}/mod_dir.so
LoadModule socache_shmcb_module {modules}/mod_socache_shmcb.so
LoadModule ssl_module {modules}/mod_ssl.so
User www-data
Group www-data
Listen 127.0.0.1:443
ServerName 127.0.0.1
DocumentRoot {site}/htdocs
DirectoryIndex index.html
TypesConfig /etc/mime.types
SSLSessionCache shmcb:{site}/ssl_scache(512000)
<VirtualHost 127.0.0.1:443>
    SSLEngine on
    SSLCertificateFile {site}/cert.pem
    SSLCertificateKeyFile {site}/key.pem
</VirtualHost>
""")
        site.chmod(0o755)
        apache = [shutil.which("apache2"), "-f", str(site / "httpd.conf")]
        # The shim's systemctl: reload -> graceful (USR1), restart -> restart (HUP).
        shim = work / "shim-systemctl"
        shim.write_text("#!/bin/sh\ncase \"$1\" in reload) k=graceful;; restart) k=restart;; *) exit 0;; esac\n"
                        f"exec {' '.join(apache)} -k \"$k\"\n")
        shim.chmod(0o755)
        subprocess.run(["ip", "netns", "exec", namespace, *apache, "-k", "start"], check=True,
                       env=dict(os.environ, APACHE_RUN_DIR=str(site), APACHE_LOG_DIR=str(site / "logs")))
        pid_file = site / "httpd.pid"
        wait_for(pid_file.exists, 10, "apache2 to start", 0.05)
        apache_pid = int(pid_file.read_text())
        try:
            prefix = ["ip", "netns", "exec", namespace]
            wrapper = install_certrelay("", work / "install")
            results = {"control": load_run(prefix, None, "no renewal (control)")}
            for verb in ("reload", "restart"):
                sandbox = Sandbox(work / f"site-{verb}", apache2_rules(verb), systemctl=shim)

                def trigger(sandbox=sandbox, verb=verb):
                    sandbox.renew("example.org")
                    sandbox.publish("example.org", ["example.org"])
                    done = sandbox.certrelay(wrapper, "run", timeout=120)
                    if done.returncode != 0:
                        raise RuntimeError(f"certrelay run ({verb}) failed:\n{done.stderr}")
                    said = "SIGUSR1 received" if verb == "reload" else "SIGHUP received"
                    wait_for(lambda: said in (site / "logs" / "error.log").read_text(errors="replace"), 10,
                             f"apache2 to log {said!r}", 0.05)
                    (site / "logs" / "error.log").write_text("")

                time.sleep(1.0)
                results[verb] = load_run(prefix, trigger, "certrelay -> apache2 -k " + (
                    "graceful" if verb == "reload" else "restart"))
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(apache_pid, signal.SIGTERM)  # the apache2 parent we started
            wait_for(lambda: not Path(f"/proc/{apache_pid}").exists(), 15, "apache2 to stop", 0.05)
    finally:
        subprocess.run(["ip", "netns", "delete", namespace], check=False)
    downtime_rows(results, ("`apache2 -k graceful` (no systemd)", "`apache2 -k restart` (no systemd)"))
    NOTES.append(
        f"downtime: no systemd available ({container_reason}): apache2 started by hand in a private network"
        " namespace; certrelay's systemctl was a shim running `apache2 -k graceful` (reload) and `-k restart`"
        " (restart: SIGHUP, the parent keeps its listening socket, unlike systemctl restart)."
    )
