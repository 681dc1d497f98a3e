"""What runs after a renewal, pinned at the run level: a real `certrelay run` against
the recording systemctl and a real TLS service on 127.0.0.1, whose served certificate
depends on what systemctl was asked to do to it.

Each test pins one promise a one-line change in certrelay would break without any
other test noticing: a failed verification reruns the rule's actions; a failed action
is never followed by a verification; only an endpoint serving an *old* certificate of
the lineage escalates a reload to a restart; a `run` command past its timeout is
killed with its children, and certrelay does not wait on a pipe they hold.
"""

import os
import signal
import socket
import ssl
import subprocess

import pytest

from tests import certs, wait
from tests.integration.test_probe import Server

UNIT = "tlsd.service"
NAME = "example.test"
GONE_WITHIN = 30  # seconds a killed process may take to disappear: a deadline, never a wait


class Service:
    """A daemon `UNIT` serving TLS on 127.0.0.1, as such daemons behave: it reads the
    certificate and key in `source` (cert.pem and privkey.pem, e.g. a live/NAME
    directory) when it starts, and again at each call of the recording systemctl on
    `UNIT` whose verb is in `loads_on` (by default only a restart: its reload does
    nothing, like a stray second instance). It counts the connections it accepts."""

    def __init__(self, relay, source, loads_on=("restart",)):
        self.relay, self.source, self.loads_on = relay, source, loads_on
        self.connections = 0
        self.seen = len(relay.calls())
        self.load()
        self.server = Server(self.handle, self.context)
        self.port = self.server.port

    def load(self):
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(os.path.join(self.source, "cert.pem"), os.path.join(self.source, "privkey.pem"))

    def handle(self, peer):
        """Serve one connection (on the server's thread), after the systemctl calls
        made since the last one took their effect."""
        self.connections += 1
        calls = self.relay.calls()
        if any(call in {f"{verb} {UNIT}" for verb in self.loads_on} for call in calls[self.seen:]):
            self.load()
        self.seen = len(calls)
        peer.server.context = self.context
        peer.finish_tls()


@pytest.fixture
def service(relay):
    """service(source, loads_on=("restart",)) starts a Service; each is stopped when
    the test ends."""
    started = []

    def start(source, loads_on=("restart",)):
        started.append(Service(relay, source, loads_on))
        return started[-1]

    yield start
    for each in started:
        each.server.stop()


def live(relay, name=NAME):
    return os.path.join(relay.config_dir, "live", name)


def rules(port, verb="reload", extra=""):
    """One rule for NAME: `verb` on UNIT, then verify the endpoint at `port`. A short
    verify-timeout: tests that expect an endpoint not to turn current wait it out."""
    return (f'[settings]\nmin-interval = 0\nverify-timeout = "2s"\n\n[[rule]]\nmatch = ["{NAME}"]\n'
            f'{verb} = ["{UNIT}"]\nverify = ["https://127.0.0.1:{port}?sni=www.{NAME}"]\n{extra}')


def renew_and_publish(relay):
    certs.renew(relay.config_dir, NAME)
    relay.publish(NAME, renew=False)


def kept(relay):
    return len(relay.entries("claimed"))


# --- a failed verification reruns the rule's actions -------------------------------------


def test_a_failed_verification_reruns_the_restart_at_every_run_until_the_endpoint_is_current(relay, service):
    certs.renew(relay.config_dir, NAME)
    stale = service(live(relay), loads_on=())  # its restart does not take: it keeps serving the old one
    relay.write_rules(rules(stale.port, verb="restart"))
    renew_and_publish(relay)

    first = relay.run()

    assert first.returncode == 1
    assert relay.calls() == [f"restart {UNIT}"]
    assert "still serves an OLD certificate of example.test" in first.stderr
    assert kept(relay) == 1

    second = relay.run()  # nothing changed: the retry restarts again, verifies again, keeps again

    assert second.returncode == 1
    assert relay.calls() == [f"restart {UNIT}"] * 2
    assert "done: restart tlsd.service (example.test)" in second.stderr
    assert "still serves an OLD certificate of example.test" in second.stderr
    assert kept(relay) == 1

    stale.loads_on = ("restart",)  # the admin fixes the service: a restart now reads the live files
    third = relay.run()

    assert third.returncode == 0, third.stderr
    assert relay.calls() == [f"restart {UNIT}"] * 3
    assert "serves the current certificate of example.test" in third.stderr
    assert kept(relay) == 0
    assert relay.run().returncode == 0 and len(relay.calls()) == 3  # settled: nothing more to do


# --- no verification after a failed action ---------------------------------------------


@pytest.mark.parametrize("failing", ["restart", "reload", "run"])
def test_no_endpoint_is_probed_while_an_action_of_its_rule_failed(relay, service, failing):
    certs.renew(relay.config_dir, NAME)
    endpoint = service(live(relay))
    flag = os.path.join(relay.root, "prepared")
    if failing == "run":  # the rule's run command fails; its restart succeeds
        relay.write_rules(rules(endpoint.port, verb="restart", extra=f'run = [["/usr/bin/test", "-e", "{flag}"]]\n'))
        failed = f"failed: run /usr/bin/test -e {flag} (example.test): exit status 1"
    else:
        relay.write_rules(rules(endpoint.port, verb=failing))
        relay.behave("fail", UNIT)
        failed = f"failed: {failing} {UNIT} (example.test): exit status 1: Job for {UNIT} failed"
    renew_and_publish(relay)

    first = relay.run()

    assert first.returncode == 1
    assert failed in first.stderr
    assert endpoint.connections == 0, f"probed although an action failed:\n{first.stderr}"
    assert relay.calls() == [f"{'restart' if failing == 'run' else failing} {UNIT}"]  # no escalation either
    assert kept(relay) == 1

    if failing == "run":
        open(flag, "w").close()
    else:
        os.unlink(os.path.join(relay.bin, "fail", UNIT))
    second = relay.run()  # the action succeeds: now the endpoint is verified

    assert second.returncode == 0, second.stderr
    assert endpoint.connections > 0
    assert "serves the current certificate of example.test" in second.stderr
    assert kept(relay) == 0


# --- only an OLD certificate escalates a reload ------------------------------------------


def source_of(relay, tmp_path, served):
    """Return the directory the endpoint reads its certificate from, or None for no
    endpoint at all."""
    if served == "old":  # NAME's live certificate now, archive/ once renewed
        return live(relay)
    if served == "other-lineage":
        certs.renew(relay.config_dir, "other.test")
        return live(relay, "other.test")
    if served == "no-lineage":
        certificate, key = certs.make_certificate(["stranger.test"])
        (tmp_path / "stranger").mkdir()
        (tmp_path / "stranger" / "cert.pem").write_bytes(certificate)
        (tmp_path / "stranger" / "privkey.pem").write_bytes(key)
        return str(tmp_path / "stranger")
    return None


@pytest.fixture
def closed_port():
    """A port on 127.0.0.1 that refuses connections: bound, never listening, held
    until the test ends so that nothing else takes it."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    yield holder.getsockname()[1]
    holder.close()


@pytest.mark.parametrize("served, says", [
    ("other-lineage", "serves the live certificate of other.test"),
    ("no-lineage", "serves a certificate of no lineage certrelay knows"),
    ("nothing", "unreachable (connection refused)"),
], ids=["other-lineage", "no-lineage", "closed-port"])
def test_a_reload_is_not_escalated_when_the_endpoint_serves_anything_but_an_old_certificate(
        relay, service, tmp_path, closed_port, served, says):
    certs.renew(relay.config_dir, NAME)
    source = source_of(relay, tmp_path, served)
    endpoint = service(source, loads_on=("reload", "restart")) if source else None
    relay.write_rules(rules(endpoint.port if endpoint else closed_port, verb="reload"))
    renew_and_publish(relay)

    result = relay.run()

    assert says in result.stderr, result.stderr  # the case at hand, as certrelay saw it
    assert relay.calls() == [f"reload {UNIT}"]  # a restart would not help: never escalated
    assert "escalating" not in result.stderr
    assert result.returncode == 1
    assert kept(relay) == 1


def test_a_reload_is_escalated_to_one_restart_when_the_endpoint_serves_an_old_certificate(relay, service, tmp_path):
    certs.renew(relay.config_dir, NAME)
    endpoint = service(source_of(relay, tmp_path, "old"))  # reads its files again only on a restart
    relay.write_rules(rules(endpoint.port, verb="reload"))
    renew_and_publish(relay)

    result = relay.run()

    assert relay.calls() == [f"reload {UNIT}", f"restart {UNIT}"]
    assert "still serves an OLD certificate of example.test" in result.stderr
    assert "escalating to a restart" in result.stderr
    assert result.returncode == 0, result.stderr
    assert kept(relay) == 0


# --- a command past its timeout is killed with its children -------------------------------


@pytest.fixture
def pid_files(tmp_path):
    """pid_files(name) is the path of a file a test's command writes a PID to; every
    process so recorded that still runs when the test ends is killed, by its PID."""
    made = []

    def path(name):
        made.append(tmp_path / name)
        return str(made[-1])

    yield path
    for pid_file in made:
        try:
            pid = int(pid_file.read_text())
        except (FileNotFoundError, ValueError):
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as file:
                ours = file.read().startswith((b"sleep\x00", b"/bin/sh\x00"))
        except FileNotFoundError:
            continue
        if ours and wait.alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("parent", ["sleeps", "exits"])
def test_a_command_past_its_timeout_is_killed_with_its_children_and_run_does_not_wait_on_their_pipe(
        relay, pid_files, tmp_path, parent):
    child, parent_pid = pid_files("child.pid"), pid_files("parent.pid")
    script = tmp_path / "leaves-a-child"
    # The child holds stdout, certrelay's pipe, open for an hour. The parent either
    # sleeps past the timeout itself, or exits at once, like a command that starts a
    # daemon without closing its output.
    script.write_text(f"#!/bin/sh\necho $$ > {parent_pid}\nsleep 3600 &\necho $! > {child}\n"
                      + ("exec sleep 3600\n" if parent == "sleeps" else "exit 0\n"))
    script.chmod(0o755)
    relay.write_rules(f'[settings]\nmin-interval = 0\ntimeout = "2s"\n\n[[rule]]\nmatch = ["{NAME}"]\n'
                      f'run = [["{script}"]]\n')
    renew_and_publish(relay)

    process = relay.start()
    try:
        output, _ = process.communicate(timeout=GONE_WITHIN)
    except subprocess.TimeoutExpired:
        pytest.fail("certrelay run hung: it waits on the pipe the command's child still holds")

    assert f"failed: run {script} (example.test): timed out after 2 s and was killed" in output, output
    assert process.returncode == 1
    assert kept(relay) == 1
    for pid_file in (parent_pid, child):
        pid = int(open(pid_file, encoding="ascii").read())
        wait.gone(pid, GONE_WITHIN, what=f"{pid_file}'s process {pid}, killed before certrelay run returned,")


# --- the single-file bind mount trap (dashpay/platform#4421) ------------------------------


@pytest.fixture
def single_file_mounts(relay, tmp_path):
    """mount(source file) -> a file bind-mounted on it, as `docker run -v FILE:FILE`
    does (root only); all unmounted when the test ends."""
    if os.geteuid() != 0:
        pytest.skip("a bind mount needs root")
    mounted = []

    def mount(source, target):
        open(target, "w").close()
        subprocess.run(["mount", "--bind", source, target], check=True, capture_output=True)
        mounted.append(target)

    yield mount
    for target in reversed(mounted):
        subprocess.run(["umount", target], check=True, capture_output=True)


def test_a_service_fed_by_single_file_bind_mounts_serves_the_old_certificate_and_is_told_to_mount_the_dir(
        relay, service, single_file_mounts, tmp_path):
    """A single-file bind mount resolves live/NAME/cert.pem's link when it is made and
    keeps that inode: after certbot's renewal the container still reads cert1.pem,
    whatever it is told. verify calls it old, and says what to change."""
    certs.renew(relay.config_dir, NAME)
    container = tmp_path / "container"
    container.mkdir()
    for part in ("cert.pem", "privkey.pem"):
        single_file_mounts(os.path.join(live(relay), part), str(container / part))
    daemon = service(str(container), loads_on=("reload", "restart"))  # it does reload
    relay.write_rules(rules(daemon.port, verb="reload"))
    renew_and_publish(relay)

    result = relay.run()

    assert result.returncode == 1
    assert relay.calls() == [f"reload {UNIT}", f"restart {UNIT}"]  # escalated: the restart cannot help either
    assert f"still serves an OLD certificate of {NAME}" in result.stderr
    assert "bind-mounted as a single file keeps the old file after every renewal, reload or not: mount the" \
        " directory (e.g. -v /etc/letsencrypt:/etc/letsencrypt:ro), not the file" in result.stderr
