"""verify against the REAL daemons certrelay is written for: Postfix (smtp, submission,
smtps), Dovecot (imap, imaps, pop3, pop3s, ManageSieve) and Prosody (xmpp), each from
Debian, run with a throw-away configuration on 127.0.0.1 ports as a real process that
the test ends by its PID, serving a lineage's fullchain.pem. Each probe must end as the
daemon expects a polite client to end (the daemon's own log says so: a logout, never a
lost connection), the XMPP stream must be addressed to the certificate's domain, and a
Postfix given a copy of an old intermediate must be reported as a stale chain.

Also how a probe reaches a name's addresses (RFC 8305, Happy Eyeballs): a first address
that never answers must not hold up the second.

Needs root (the daemons drop their privileges themselves) and the Debian packages
postfix, dovecot-imapd, dovecot-pop3d, dovecot-managesieved and prosody (Makefile:
TEST_PACKAGES); a test skips, naming what is missing, without them.
"""

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from certrelay import endpoint as endpoint_module, plan, probe, verify
from tests import certs
from tests.integration.test_probe import Server, tls_server

NAME = "mail.test"
GENEROUS = 30  # seconds: a deadline for what happens in milliseconds, never a wait
POSTFIX_MASTER = "/usr/lib/postfix/sbin/master"
DOVECOT = "/usr/sbin/dovecot"
PROSODY = "/usr/bin/prosody"


def need(*paths, package):
    """Skip unless root and every one of `paths` exists (installed by Debian's `package`)."""
    if os.geteuid() != 0:
        pytest.skip(f"{package} needs root to start (it drops its privileges itself)")
    missing = [path for path in paths if not os.path.exists(path)]
    if missing:
        pytest.skip(f"{', '.join(missing)} missing: apt-get install {package}")


def free_port():
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        return unused.getsockname()[1]


def listening(port):
    """Whether something listens on 127.0.0.1:`port` (read from /proc/net/tcp, not by
    connecting: a daemon logs every connection)."""
    wanted = f"0100007F:{port:04X}"
    with open("/proc/net/tcp", encoding="ascii") as table:
        return any(fields[1] == wanted and fields[3] == "0A" for fields in (line.split() for line in table))


def wait_until(condition, what, deadline=GENEROUS):
    """Poll `condition()` until it is true; fail naming `what` after `deadline` seconds."""
    end = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < end, f"not within {deadline} s: {what}"
        time.sleep(0.02)


def alive(pid):
    """Whether process `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as file:
            return file.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def descendants(pid):
    """The PIDs of the processes below `pid` now, read from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as file:
                    parents[int(entry)] = int(file.read().rpartition(")")[2].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, its_parent in parents.items() if its_parent == parent]
        found += children
        frontier += children
    return found


class Daemon:
    """A daemon started in the foreground as a child of the test, its log a file."""

    def __init__(self, argv, log, ports, **popen):
        self.log, self.ports = log, ports
        self.output = open(os.path.join(os.path.dirname(log), "output"), "wb")
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.output,
                                        stderr=subprocess.STDOUT, **popen)
        try:
            for port in ports:
                wait_until(lambda port=port: listening(port) or self.process.poll() is not None,
                           f"{argv[0]} listening on 127.0.0.1:{port}")
                assert self.process.poll() is None, f"{argv[0]} exited {self.process.returncode}: {self.said()}"
        except BaseException:
            self.stop()
            raise

    def said(self):
        with open(self.output.name, "rb") as output:
            text = output.read().decode(errors="replace")
        return text + (self.lines(0)[1] if os.path.exists(self.log) else "")

    def mark(self):
        """Return where the log ends now, for `lines`."""
        return os.path.getsize(self.log) if os.path.exists(self.log) else 0

    def lines(self, mark):
        """Return (size, text) of the log after `mark`."""
        with open(self.log, "rb") as file:
            file.seek(mark)
            data = file.read()
        return mark + len(data), data.decode(errors="replace")

    def wait_for(self, mark, pattern):
        """Wait until the log after `mark` has a line matching `pattern` (a regex); return
        that part of the log."""
        found = []

        def logged():
            found[:] = [self.lines(mark)[1]]
            return re.search(pattern, found[0], re.MULTILINE)

        wait_until(logged, f"{pattern!r} in {self.log}; it has after the mark:\n{found and found[0]}")
        return found[0]

    def stop(self):
        """End the daemon by its PID (SIGTERM, then SIGKILL), and whatever it started
        that outlives it, each by its PID."""
        below = descendants(self.process.pid)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(GENEROUS)
            except subprocess.TimeoutExpired:
                self.process.send_signal(signal.SIGKILL)
                self.process.wait(GENEROUS)
        for pid in below:
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        wait_until(lambda: not any(alive(pid) for pid in below), "the daemon's children gone")
        self.output.close()


@pytest.fixture(scope="module")
def world():
    """A directory the daemons' users can traverse (pytest's tmp_path is 0700), with a
    certbot config dir holding lineage NAME: a leaf issued by intermediate R11 under
    a test root; "R3" is another intermediate of that root, for a stale chain."""
    directory = tempfile.mkdtemp(prefix="certrelay-daemons-")
    os.chmod(directory, 0o755)
    root = certs.Authority("Test Root X1")
    authorities = {"R3": certs.Authority("R3", root), "R11": certs.Authority("R11", root)}
    config_dir = os.path.join(directory, "letsencrypt")
    certs.renew_with_chain(config_dir, NAME, authorities["R11"])
    stale = os.path.join(directory, "stale-chain.pem")  # a copy of an intermediate that is no longer the lineage's
    with open(stale, "wb") as file:
        file.write(authorities["R3"].pem)
    yield {"dir": directory, "config_dir": config_dir, "live": os.path.join(config_dir, "live", NAME),
           "stale": stale}
    shutil.rmtree(directory)


def daemon_dir(world, name):
    path = os.path.join(world["dir"], name)
    os.makedirs(path, mode=0o755)
    return path


@pytest.fixture(scope="module")
def dovecot(world):
    need(DOVECOT, "/usr/lib/dovecot/imap-login", package="dovecot-imapd")
    need("/usr/lib/dovecot/pop3-login", package="dovecot-pop3d")
    need("/usr/lib/dovecot/managesieve-login", package="dovecot-managesieved")
    here = daemon_dir(world, "dovecot")
    ports = {scheme: free_port() for scheme in ("imap", "imaps", "pop3", "pop3s", "sieve")}
    log = os.path.join(here, "dovecot.log")
    config = os.path.join(here, "dovecot.conf")
    with open(config, "w", encoding="ascii") as file:
        file.write(f"""
instance_name = certrelay-test-{os.getpid()}
base_dir = {here}/run
state_dir = {here}/state
protocols = imap pop3 sieve
listen = 127.0.0.1
log_path = {log}
info_log_path = {log}
ssl = yes
ssl_cert = <{world["live"]}/fullchain.pem
ssl_key = <{world["live"]}/privkey.pem
passdb {{
  driver = static
  args = nopassword=y
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home=/nonexistent
}}
mail_location = mbox:/nonexistent
service imap-login {{
  inet_listener imap {{
    port = {ports["imap"]}
  }}
  inet_listener imaps {{
    port = {ports["imaps"]}
    ssl = yes
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = {ports["pop3"]}
  }}
  inet_listener pop3s {{
    port = {ports["pop3s"]}
    ssl = yes
  }}
}}
service managesieve-login {{
  inet_listener sieve {{
    port = {ports["sieve"]}
  }}
}}
""")
    daemon = Daemon([DOVECOT, "-F", "-c", config], log, ports.values())
    daemon.endpoints = ports
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def postfix(world):
    need(POSTFIX_MASTER, "/usr/lib/postfix/sbin/smtpd", package="postfix")
    here = daemon_dir(world, "postfix")
    ports = {scheme: free_port() for scheme in ("smtp", "submission", "smtps", "stale")}
    for path in ("conf", "data", "queue/pid", "queue/public", "queue/private"):
        os.makedirs(os.path.join(here, path))
    shutil.chown(os.path.join(here, "data"), "postfix")
    shutil.chown(os.path.join(here, "queue/public"), "postfix", "postdrop")
    os.chmod(os.path.join(here, "queue/public"), 0o710)
    shutil.chown(os.path.join(here, "queue/private"), "postfix")
    os.chmod(os.path.join(here, "queue/private"), 0o700)
    log = os.path.join(here, "maillog")
    live = world["live"]
    with open(os.path.join(here, "conf", "main.cf"), "w", encoding="ascii") as file:
        file.write(f"""compatibility_level = 3.6
queue_directory = {here}/queue
data_directory = {here}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = mail.test
mydomain = test
mydestination =
local_recipient_maps =
inet_interfaces = loopback-only
inet_protocols = ipv4
maillog_file = {log}
maillog_file_prefixes = {here}
smtpd_peername_lookup = no
smtpd_tls_chain_files = {live}/privkey.pem, {live}/fullchain.pem
smtpd_tls_security_level = may
""")
    with open(os.path.join(here, "conf", "master.cf"), "w", encoding="ascii") as file:
        file.write(f"""127.0.0.1:{ports["smtp"]} inet n - n - - smtpd
127.0.0.1:{ports["submission"]} inet n - n - - smtpd -o smtpd_tls_security_level=encrypt
127.0.0.1:{ports["smtps"]} inet n - n - - smtpd -o smtpd_tls_wrappermode=yes
127.0.0.1:{ports["stale"]} inet n - n - - smtpd -o smtpd_tls_wrappermode=yes
  -o smtpd_tls_chain_files={live}/privkey.pem,{live}/cert.pem,{world["stale"]}
anvil unix - - n - 1 anvil
tlsmgr unix - - n 1000? 1 tlsmgr
proxymap unix - - n - - proxymap
postlog unix-dgram n - n - 1 postlogd
""")
    # -d: the master stays in the foreground, a child of this test (postfix start-fg
    # does that only as PID 1).
    daemon = Daemon([POSTFIX_MASTER, "-c", os.path.join(here, "conf"), "-d"], log, ports.values())
    daemon.endpoints = ports
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def prosody(world):
    need(PROSODY, package="prosody")
    here = daemon_dir(world, "prosody")
    os.makedirs(os.path.join(here, "data"))
    shutil.chown(os.path.join(here, "data"), "prosody")
    port = free_port()
    log = os.path.join(here, "prosody.log")
    config = os.path.join(here, "prosody.cfg.lua")
    with open(config, "w", encoding="ascii") as file:
        file.write(f"""pidfile = "{here}/prosody.pid"
data_path = "{here}/data"
modules_enabled = {{ "tls"; "saslauth"; "disco"; }}
modules_disabled = {{ "s2s"; "posix"; }}
c2s_ports = {{ {port} }}
c2s_interfaces = {{ "127.0.0.1" }}
s2s_ports = {{ }}
c2s_require_encryption = true
log = {{ debug = "{log}" }}
VirtualHost "{NAME}"
  ssl = {{ certificate = "{world["live"]}/fullchain.pem"; key = "{world["live"]}/privkey.pem" }}
""")
    daemon = Daemon([PROSODY, "--config", config, "-F"], log, [port])
    daemon.endpoints = {"xmpp": port}
    yield daemon
    daemon.stop()


def check(url, domains=(NAME,)):
    endpoint = endpoint_module.parse_endpoint(url)
    return plan.Check(NAME, endpoint, endpoint_module.server_name(endpoint, list(domains)), (), True, frozenset())


def verified(world, url, domains=(NAME,)):
    [verdict] = verify.verify([check(url, domains)], world["config_dir"], GENEROUS, quiet=True, once=True)
    return verdict


# --- each scheme ends as the daemon expects ------------------------------------------------------

POSTFIX_SCHEMES = ["smtp", "submission", "smtps"]
DOVECOT_SCHEMES = {"imap": "imap-login", "imaps": "imap-login", "pop3": "pop3-login", "pop3s": "pop3-login",
                   "sieve": "managesieve-login"}


@pytest.mark.parametrize("scheme", POSTFIX_SCHEMES)
def test_postfix_logs_a_quit_not_a_lost_connection(world, postfix, scheme):
    mark = postfix.mark()

    verdict = verified(world, f"{scheme}://127.0.0.1:{postfix.endpoints[scheme]}")

    assert verdict.outcome == "current", verdict.describe()
    logged = postfix.wait_for(mark, r"smtpd\[\d+\]: disconnect from ")
    assert "lost connection" not in logged, logged
    assert re.search(r"disconnect from \S+ (ehlo=1 starttls=1 )?quit=1 commands=[13]$", logged, re.MULTILINE), logged


@pytest.mark.parametrize("scheme", list(DOVECOT_SCHEMES))
def test_dovecot_logs_a_logout_not_a_closed_connection(world, dovecot, scheme):
    mark = dovecot.mark()

    verdict = verified(world, f"{scheme}://127.0.0.1:{dovecot.endpoints[scheme]}")

    assert verdict.outcome == "current", verdict.describe()
    logged = dovecot.wait_for(mark, rf"{DOVECOT_SCHEMES[scheme]}: Info: Disconnected: ")
    assert "Disconnected: Aborted login by logging out (no auth attempts" in logged, logged
    assert "Connection closed" not in logged and "reset by peer" not in logged, logged
    assert ", TLS, session=<" in logged, logged  # over TLS, and the TLS layer was closed properly too


def test_prosody_logs_a_stream_closed_by_the_client(world, prosody):
    mark = prosody.mark()

    verdict = verified(world, f"xmpp://127.0.0.1:{prosody.endpoints['xmpp']}")

    assert verdict.outcome == "current", verdict.describe()
    logged = prosody.wait_for(mark, r"\tinfo\tClient disconnected: ")
    assert "Stream encrypted (TLS" in logged, logged  # the stream opened anew over TLS
    assert "Received </stream:stream>" in logged, logged
    assert "closed: session closed" in logged, logged
    assert "unexpected eof" not in logged, logged


@pytest.mark.parametrize("domains", [(NAME,), ("*.mail.test", NAME)], ids=["domain", "wildcard-first"])
def test_the_xmpp_stream_is_addressed_to_the_certificates_domain_never_the_address(world, prosody, domains):
    mark = prosody.mark()

    verdict = verified(world, f"xmpp://127.0.0.1:{prosody.endpoints['xmpp']}", domains)

    assert verdict.outcome == "current", verdict.describe()
    logged = prosody.wait_for(mark, r"\tinfo\tClient disconnected: ")
    # twice: the stream before STARTTLS and the one opened anew over TLS
    assert re.findall(r"Client sent opening <stream:stream> to (\S+)", logged) == [NAME, NAME], logged


def test_no_connection_is_made_for_an_xmpp_stream_without_a_domain(world, prosody):
    mark = prosody.mark()

    verdict = verified(world, f"xmpp://127.0.0.1:{prosody.endpoints['xmpp']}", domains=())

    assert verdict.outcome == "unreachable"
    assert verdict.served.error.startswith("no domain to address the XMPP stream to")
    assert "write xmpp://HOST?sni=DOMAIN" in verdict.describe()
    assert prosody.mark() == mark  # nothing connected: no line at all


def test_postfix_serving_a_copy_of_an_old_intermediate_is_a_stale_chain(world, postfix):
    verdict = verified(world, f"smtps://127.0.0.1:{postfix.endpoints['stale']}")

    assert verdict.outcome == "chain"
    assert "with a stale chain (intermediates served: CN=R3 (sha256 " in verdict.describe()
    assert "; chain.pem: CN=R11 (sha256 " in verdict.describe()


def test_certrelay_verify_finds_every_daemon_current(world, dovecot, postfix, prosody):
    endpoints = [f"{scheme}://127.0.0.1:{port}" for daemon in (dovecot, postfix, prosody)
                 for scheme, port in daemon.endpoints.items() if scheme != "stale"]
    rules = os.path.join(world["dir"], "rules.toml")
    with open(rules, "w", encoding="utf-8") as file:
        file.write(f'[[rule]]\nmatch = ["{NAME}"]\nreload = ["dovecot"]\nverify = {endpoints!r}\n'.replace("'", '"'))
    state = os.path.join(world["dir"], "state")
    os.makedirs(state, exist_ok=True)
    marks = [daemon.mark() for daemon in (dovecot, postfix, prosody)]

    result = subprocess.run(
        [sys.executable, "-m", "certrelay", "verify", "--config-dir", world["config_dir"], "--rules", rules,
         "--state-dir", state], capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))),
    )

    assert result.returncode == 0, result.stderr
    assert result.stderr.count(f"serves the current certificate of {NAME}") == len(endpoints), result.stderr
    dovecot.wait_for(marks[0], r"(?s)(Disconnected: .*){5}")
    postfix.wait_for(marks[1], r"(?s)(disconnect from .*){3}")
    prosody.wait_for(marks[2], r"Client disconnected: ")
    for daemon, mark in zip((dovecot, postfix, prosody), marks):
        logged = daemon.lines(mark)[1]
        for unclean in ("lost connection", "Connection closed", "reset by peer", "unexpected eof"):
            assert unclean not in logged, logged


# --- Happy Eyeballs ---------------------------------------------------------------------------


@pytest.fixture
def blackhole():
    """A port on 127.0.0.1 that never answers a SYN: its listener's queue is full (one
    connection nobody accepts, backlog 0), so the kernel drops further SYNs."""
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        filler.connect(listener.getsockname())
        yield listener.getsockname()[1]


def syn_sent_to(port):
    """How many of this host's connections to 127.0.0.1:`port` are still connecting."""
    wanted = f"0100007F:{port:04X}"
    with open("/proc/net/tcp", encoding="ascii") as table:
        return sum(fields[2] == wanted and fields[3] == "02" for fields in (line.split() for line in table))


def addresses(*ports):
    """A getaddrinfo for probe.getaddrinfo: every name has 127.0.0.1 at each of `ports`."""
    def resolve(host, port, *arguments, **options):
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", each)) for each in ports]
    return resolve


def test_a_first_address_that_never_answers_does_not_hold_up_the_second(blackhole, monkeypatch, leaf):
    context, der = leaf
    live = Server(tls_server, context)
    monkeypatch.setattr(probe, "getaddrinfo", addresses(blackhole, live.port))
    served = []
    thread = threading.Thread(target=lambda: served.append(
        probe.fetch(endpoint_module.parse_endpoint("tls://mail.test:443"), NAME, 60)), daemon=True)

    thread.start()  # a 60 s timeout: waiting on the dead address first would take all of it
    thread.join(GENEROUS)
    live.stop()

    assert served, f"no result within {GENEROUS} s of a 60 s timeout: the dead first address held the probe up"
    assert (served[0].error, served[0].der) == (None, der)
    assert syn_sent_to(blackhole) == 0  # the attempt that lost the race was closed


def test_every_address_failing_reports_the_failure(monkeypatch):
    closed = []
    for _ in range(2):
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            closed.append(unused.getsockname()[1])
    monkeypatch.setattr(probe, "getaddrinfo", addresses(*closed))

    served = probe.fetch(endpoint_module.parse_endpoint("imaps://mail.test"), NAME, GENEROUS)

    assert (served.der, served.error, served.failure) == (None, "connection refused", "refused")


def test_addresses_are_tried_with_the_families_interleaved():
    v6 = [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (f"2001:db8::{n}", 25, 0, 0)) for n in (1, 2, 3)]
    v4 = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (f"192.0.2.{n}", 25)) for n in (1, 2)]

    assert probe._interleaved(v6 + v4) == [v6[0], v4[0], v6[1], v4[1], v6[2]]
    assert probe._interleaved(v4 + v6) == [v4[0], v6[0], v4[1], v6[1], v6[2]]


# --- the goodbye, pinned in-process: what keeps the daemons' logs clean without a race ----------


@pytest.fixture
def leaf(tmp_path):
    """(a server-side TLS context serving a new self-signed leaf for NAME, its DER)."""
    certificate, key = certs.make_certificate([NAME])
    (tmp_path / "cert.pem").write_bytes(certificate)
    (tmp_path / "key.pem").write_bytes(key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return context, ssl.PEM_cert_to_DER_cert(certificate.decode())


def test_after_quit_the_client_reads_until_the_server_hangs_up_then_sends_close_notify(leaf):
    """A client that closes right after QUIT races the server's 221 (Postfix then logs
    "lost connection after QUIT" now and then); one that closes TCP without close_notify
    races Dovecot's reading of LOGOUT ("TLS: Connection closed")."""
    context, _ = leaf
    context.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF  # tell a close_notify from a bare TCP close

    def smtps(peer):
        peer.connection = context.wrap_socket(peer.connection, server_side=True, suppress_ragged_eofs=False)
        peer.send("220 mail.test ESMTP\r\n")
        peer.server.notes["goodbye"] = peer.line()
        peer.send("221 2.0.0 Bye\r\n")
        peer.server.notes["waited"] = peer.quiet(0.3)  # the client neither hung up nor spoke
        with socket.socket(fileno=os.dup(peer.connection.fileno())) as raw:
            raw.shutdown(socket.SHUT_WR)  # the server hangs up, as Postfix does after its 221
        try:
            peer.server.notes["then"] = peer.connection.recv(4096) or "close_notify"
        except ssl.SSLError as error:
            peer.server.notes["then"] = f"no close_notify: {error.reason}"

    server = Server(smtps, context)
    served = probe.fetch(endpoint_module.parse_endpoint(f"smtps://127.0.0.1:{server.port}"), NAME, GENEROUS)
    server.stop()

    assert served.error is None
    assert server.notes == {"goodbye": "QUIT", "waited": True, "then": "close_notify"}


def test_managesieve_reads_the_capabilities_sent_after_starttls_before_logout(leaf):
    """RFC 5804 2.2: after the handshake the server sends its capabilities again."""
    def sieve(peer):
        peer.send('"IMPLEMENTATION" "Dovecot Pigeonhole"\r\n"STARTTLS"\r\nOK "ready"\r\n')
        assert peer.line() == "STARTTLS"
        peer.send('OK "Begin TLS negotiation now."\r\n')
        peer.connection = peer.server.context.wrap_socket(peer.connection, server_side=True)
        peer.server.notes["quiet before the capabilities"] = peer.quiet(0.3)
        peer.send('"IMPLEMENTATION" "Dovecot Pigeonhole"\r\n"SASL" "PLAIN"\r\nOK "TLS negotiation successful."\r\n')
        peer.server.notes["goodbye"] = peer.line()
        peer.send('OK "Logout completed."\r\n')

    server = Server(sieve, leaf[0])
    served = probe.fetch(endpoint_module.parse_endpoint(f"sieve://127.0.0.1:{server.port}"), NAME, GENEROUS)
    server.stop()

    assert served.error is None
    assert server.notes == {"quiet before the capabilities": True, "goodbye": "LOGOUT"}
