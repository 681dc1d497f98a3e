"""`certrelay watch` as a real process, speaking sd_notify to a socket the test holds."""

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

from tests import wait
from tests.writeup import WRITE_UP_CERTIFICATES, WRITE_UP_RULES

FAST = "[settings]\nsettle = 0.5\nmax-wait = 5\nretry-min = 0.3\nretry-max = 1\nmin-interval = 0\n\n"


class NotifySocket:
    """A datagram socket standing in for systemd's notify socket; collects messages."""

    def __init__(self, path):
        self.path = str(path)
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(self.path)
        self.messages = []
        self.process = None  # the daemon, whose output a failed wait shows

    def wait_for(self, predicate, timeout=30):
        """Return the first message (str) for which `predicate` holds, reading as needed."""
        for message in self.messages:
            if predicate(message):
                return message
        deadline = time.monotonic() + timeout
        while True:
            exited = self.process is not None and self.process.poll() is not None
            remaining = deadline - time.monotonic()
            self.socket.settimeout(0 if exited else max(0, min(remaining, 1)))
            try:
                message = self.socket.recv(4096).decode("utf-8")
            except (TimeoutError, BlockingIOError):
                if exited or remaining <= 0:
                    output = self.process.communicate()[0] if exited else "(still running)"
                    pytest.fail(f"no matching sd_notify message in {self.messages}; daemon output: {output}")
                continue
            self.messages.append(message)
            if predicate(message):
                return message


@pytest.fixture
def notify(tmp_path):
    listener = NotifySocket(tmp_path / "notify")
    yield listener
    listener.socket.close()


def start_watch(relay, notify, *arguments, **environment):
    notify.process = relay.start(*arguments, command="watch", NOTIFY_SOCKET=notify.path, **environment)
    return notify.process


def test_watch_batches_a_burst_of_renewals_into_one_action_per_unit(relay, notify):
    relay.write_rules(FAST + WRITE_UP_RULES)
    start_watch(relay, notify)
    notify.wait_for(lambda m: "READY=1" in m)

    for name in WRITE_UP_CERTIFICATES:
        relay.publish(name)
    status = notify.wait_for(lambda m: "STATUS=last batch" in m and "5 notification(s)" in m)
    assert any(m.startswith("STATUS=") and " pending, batch in " in m for m in notify.messages)

    assert sorted(relay.calls()) == ["reload apache2.service", "restart dovecot.service", "restart exim4.service"]
    assert "3/3 action(s) done" in status
    assert relay.entries("queue") == [] and relay.entries("claimed") == []
    assert "NOTIFY_SOCKET leaked into systemctl" not in relay.calls()


def test_watch_processes_what_was_pending_before_it_says_ready(relay, notify):
    relay.publish("herzbube.ch")
    start_watch(relay, notify)

    notify.wait_for(lambda m: "READY=1" in m)

    assert sorted(relay.calls()) == ["reload apache2.service", "restart dovecot.service", "restart exim4.service"]


def test_watch_pings_the_watchdog_when_asked_to(relay, notify):
    relay.write_rules(FAST + WRITE_UP_RULES)
    start_watch(relay, notify, WATCHDOG_USEC="200000")
    notify.wait_for(lambda m: "READY=1" in m)

    for _ in range(3):
        notify.wait_for(lambda m: m == "WATCHDOG=1")
        notify.messages.clear()
    relay.publish("herzbube.ch")
    notify.wait_for(lambda m: "STATUS=last batch" in m and "3/3 action(s) done" in m)
    assert not [call for call in relay.calls() if "leaked" in call]  # the watchdog is the daemon's alone


def test_watch_ignores_a_watchdog_meant_for_another_process(relay, notify):
    process = start_watch(relay, notify, WATCHDOG_USEC="100000", WATCHDOG_PID="1")
    notify.wait_for(lambda m: "READY=1" in m)
    process.send_signal(signal.SIGTERM)
    notify.wait_for(lambda m: "STOPPING=1" in m)

    assert "WATCHDOG=1" not in notify.messages


def test_watch_reload_with_invalid_rules_keeps_the_old_ones(relay, notify):
    relay.write_rules(FAST + WRITE_UP_RULES)
    process = start_watch(relay, notify)
    notify.wait_for(lambda m: "READY=1" in m)
    notify.messages.clear()
    relay.write_rules('[[rule]]\nmatch = ["*"]\nrestart = ["bad unit"]\n')

    process.send_signal(signal.SIGHUP)
    notify.wait_for(lambda m: "RELOADING=1" in m)
    notify.wait_for(lambda m: "READY=1" in m)
    relay.publish("herzbube.ch")
    notify.wait_for(lambda m: "1 notification(s)" in m)

    assert sorted(relay.calls()) == ["reload apache2.service", "restart dovecot.service", "restart exim4.service"]


def test_watch_reload_with_valid_rules_uses_them(relay, notify):
    relay.write_rules(FAST + WRITE_UP_RULES)
    process = start_watch(relay, notify)
    notify.wait_for(lambda m: "READY=1" in m)
    relay.write_rules(FAST + '[[rule]]\nmatch = ["*"]\nrestart = ["nginx"]\n')

    process.send_signal(signal.SIGHUP)
    notify.wait_for(lambda m: "RELOADING=1" in m)
    relay.publish("herzbube.ch")
    notify.wait_for(lambda m: "1 notification(s)" in m)

    assert relay.calls() == ["restart nginx.service"]


def test_watch_stops_cleanly_on_sigterm(relay, notify):
    process = start_watch(relay, notify)
    notify.wait_for(lambda m: "READY=1" in m)

    process.send_signal(signal.SIGTERM)

    assert process.wait(timeout=wait.GENEROUS) == 0
    notify.wait_for(lambda m: "STOPPING=1" in m)


def test_watch_retries_a_failed_action_with_a_growing_delay(relay, notify):
    relay.write_rules(FAST + WRITE_UP_RULES)
    relay.behave("fail", "exim4.service")
    relay.publish("herzbube.ch")
    start_watch(relay, notify)

    notify.wait_for(lambda m: "retry in 0.3 s" in m)
    notify.wait_for(lambda m: "retry in 0.6 s" in m)
    notify.wait_for(lambda m: "retry in 1 s" in m)
    os.unlink(os.path.join(relay.bin, "fail", "exim4.service"))
    relay.publish("herzbube.ch")  # retried anyway; this one must not be lost either
    notify.wait_for(lambda m: "STATUS=last batch" in m and "retry" not in m and "notification" in m)

    calls = relay.calls()
    assert calls[:3] == ["restart dovecot.service", "restart exim4.service", "reload apache2.service"]
    assert set(calls[3:-3]) == {"restart exim4.service"}
    assert relay.entries("claimed") == [] and relay.entries("queue") == []


def test_watch_watches_a_removed_and_recreated_queue_again(relay, notify):
    relay.write_rules(FAST + WRITE_UP_RULES)
    start_watch(relay, notify)
    notify.wait_for(lambda m: "READY=1" in m)
    queue = os.path.join(relay.spool, "queue")
    notify.messages.clear()

    shutil.rmtree(queue)
    # The daemon says it made and watches the queue again (a batch is due), then runs
    # that batch: what is published after it, only the new watch can see.
    notify.wait_for(lambda m: m.startswith("STATUS=0 pending, batch in "))
    notify.wait_for(lambda m: m.startswith("STATUS=last batch"))
    relay.publish("herzbube.ch")
    notify.wait_for(lambda m: "1 notification(s)" in m)

    assert len(relay.calls()) == 3


def exchange(first, second):
    """Swap the two paths atomically: renameat2(2) with RENAME_EXCHANGE."""
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, rename_exchange = -100, 2
    if libc.renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error), str(first), None, str(second))


def test_watch_quarantines_a_queue_replaced_by_a_symlink_and_goes_on(relay, notify, tmp_path):
    relay.write_rules(FAST + WRITE_UP_RULES)
    process = start_watch(relay, notify)
    notify.wait_for(lambda m: "READY=1" in m)
    host = tmp_path / "host-directory"
    host.mkdir()
    (host / "shadow").write_text("secret\n")
    queue = os.path.join(relay.spool, "queue")

    # One atomic swap: with a rename, then a symlink, the daemon may make a new queue in
    # between, and the symlink fails (EEXIST).
    os.symlink(host, tmp_path / "link")
    exchange(tmp_path / "link", queue)
    wait.until(lambda: not os.path.islink(queue), what="the daemon to move the symlinked queue aside")
    relay.publish("herzbube.ch")
    notify.wait_for(lambda m: "1 notification(s)" in m)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=30)[0]

    assert sorted(os.listdir(host)) == ["shadow"] and (host / "shadow").read_text() == "secret\n"
    assert f"error: quarantined the spool directory {queue}: it was a symbolic link to '{host}'" in output
    assert [entry.partition("@")[0] for entry in relay.entries("quarantine")] == ["queue"]
    assert len(relay.calls()) == 3


def test_watch_survives_an_entry_whose_name_is_not_utf8(relay, notify):
    relay.write_rules(FAST + WRITE_UP_RULES)
    process = start_watch(relay, notify)
    notify.wait_for(lambda m: "READY=1" in m)

    with open(os.path.join(os.fsencode(relay.spool), b"queue", b"bad-\xff"), "wb") as file:
        file.write(b"x")
    notify.wait_for(lambda m: "1 quarantined" in m)
    relay.publish("moser-naef.ch")
    notify.wait_for(lambda m: "1 notification(s)" in m)

    assert process.poll() is None
    assert relay.calls() == ["reload apache2.service"]


def test_watch_poll_finds_notifications_inotify_cannot_see(relay, notify, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to bind-mount over the watched queue")
    relay.write_rules(FAST + WRITE_UP_RULES)
    start_watch(relay, notify, "--poll", "0.5")
    notify.wait_for(lambda m: "READY=1" in m)
    # Mount a copy of the spool over it: the watch stays on the old queue directory's
    # inode, so, as on NFS, inotify never sees what lands in the new one.
    hidden = tmp_path / "spool-copy"
    shutil.copytree(relay.spool, hidden)
    subprocess.run(["mount", "--bind", str(hidden), relay.spool], check=True)
    try:
        relay.publish("herzbube.ch")
        notify.wait_for(lambda m: "1 notification(s)" in m)
    finally:
        subprocess.run(["umount", relay.spool], check=True)

    assert len(relay.calls()) == 3


@pytest.mark.parametrize("killed_at", ["dovecot.service", "exim4.service", "apache2.service"])
def test_watch_killed_at_any_step_loses_nothing(relay, notify, killed_at):
    relay.write_rules(FAST + WRITE_UP_RULES)
    for name in WRITE_UP_CERTIFICATES:
        relay.publish(name)
    relay.behave("kill", killed_at)

    daemon = start_watch(relay, notify)

    assert daemon.wait(timeout=30) == -signal.SIGKILL
    os.unlink(os.path.join(relay.bin, "kill", killed_at))
    calls_before = len(relay.calls())
    restarted = start_watch(relay, notify)
    notify.wait_for(lambda m: "READY=1" in m)

    assert sorted(relay.calls()[calls_before:]) == [
        "reload apache2.service", "restart dovecot.service", "restart exim4.service",
    ]
    assert relay.entries("queue") == [] and relay.entries("claimed") == []
    assert restarted.poll() is None


def test_watch_reconciles_a_renewal_that_sent_no_notification_within_its_interval(relay, notify):
    from tests import certs

    relay.write_rules(FAST + 'reconcile-interval = "10s"\n\n' + WRITE_UP_RULES)
    certs.renew(relay.config_dir, "herzbube.ch")
    process = start_watch(relay, notify)
    notify.wait_for(lambda m: "READY=1" in m)
    assert relay.calls() == []  # seen for the first time: recorded, nothing done

    certs.renew(relay.config_dir, "herzbube.ch")  # the hook never runs
    notify.wait_for(lambda m: "1 renewal(s) found without one" in m, timeout=30)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=30)[0]

    assert sorted(relay.calls()) == ["reload apache2.service", "restart dovecot.service", "restart exim4.service"]
    assert "herzbube.ch: its live certificate changed but no notification came" in output


def test_watch_says_in_its_status_and_log_that_a_certificate_is_close_to_expiry(relay, notify):
    from tests import certs

    relay.write_rules(FAST + WRITE_UP_RULES)
    certs.renew(relay.config_dir, "herzbube.ch", days=90, age_days=85)
    process = start_watch(relay, notify)

    notify.wait_for(lambda m: "READY=1" in m and "1 certificate(s) close to expiry" in m)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=30)[0]

    assert "error: herzbube.ch: the live certificate expires in 5.0 days (critical" in output


def test_watch_sees_what_a_run_beside_it_recorded(relay, notify):
    """The daemon keeps its state files across batches; a `certrelay run` from cron
    that acted in between must not be undone or repeated."""
    from tests import certs

    relay.write_rules(FAST + WRITE_UP_RULES)
    start_watch(relay, notify)
    notify.wait_for(lambda m: "READY=1" in m)
    relay.publish("herzbube.ch")
    notify.wait_for(lambda m: "STATUS=last batch" in m and "3/3 action(s) done" in m)

    certs.renew(relay.config_dir, "herzbube.ch")  # the hook never runs; cron's run acts on it
    result = relay.run()
    assert result.returncode == 0 and "no notification came" in result.stderr, result.stderr
    assert len(relay.calls()) == 6

    relay.publish("herzbube.ch", renew=False)  # a late notification of what cron acted on
    status = notify.wait_for(lambda m: "STATUS=last batch" in m and "1 unchanged" in m)

    assert len(relay.calls()) == 6, status


def test_watch_reports_a_failed_renewal_as_soon_as_the_post_hook_records_it(relay, notify):
    """The post hook renames SPOOL/attempt into place after certbot's run: the daemon
    wakes for it (no notification comes for a failure), not at the next reconcile."""
    from tests import certs
    from tests.integration.test_attempts import record

    relay.write_rules(FAST + 'reconcile-interval = "7d"\noverdue-grace = "20d"\n\n' + WRITE_UP_RULES)
    certs.renew(relay.config_dir, "herzbube.ch", age_days=61)
    process = start_watch(relay, notify)
    notify.wait_for(lambda m: "READY=1" in m)

    record(relay, time.time() - 60, failed="herzbube.ch *.herzbube.ch")
    notify.wait_for(lambda m: "STATUS=last batch" in m and "1 renewal(s) failed in the container" in m)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=30)[0]

    assert "error: herzbube.ch: renewal FAILED in the container at " in output
