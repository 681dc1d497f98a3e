"""Pins for certrelay.batch that mutation testing (make mutants, docs/mutants.md) found
missing: the summary line, min-interval at its boundary, the idle memo a batch leaves
or removes, installs done through deliver, and what status.json records. In-process
(batch.process with the recording systemctl on PATH), so that they cost milliseconds
per mutant; test_run.py and test_idle.py check the same through `certrelay run`."""

import hashlib
import json
import logging
import marshal
import os
import socket
import ssl
import threading
import time

import pytest

from certrelay import batch, certificate, idle, rules as rules_module
from tests import certs



@pytest.fixture
def process(relay, monkeypatch):
    """Return process(**options): one batch.process of `relay` under its rules, in-process."""
    monkeypatch.setenv("PATH", relay.bin + os.pathsep + os.environ["PATH"])

    def run(**options):
        rules = rules_module.load(relay.rules_path, config_dir=relay.config_dir)
        return batch.process(relay.config_dir, rules, relay.state_dir, **options)

    return run


@pytest.fixture
def now():
    """The batch's clock where a test sets it: now, to the second."""
    return float(int(time.time()))


def at(monkeypatch, when):
    monkeypatch.setattr(batch.time, "time", lambda: when)


def memo(relay):
    path = os.path.join(relay.state_dir, idle.MEMO)
    if not os.path.exists(path):
        return None
    with open(path, "rb") as file:
        return marshal.load(file)


# --- the summary ----------------------------------------------------------------------------


@pytest.mark.parametrize(("counts", "line"), [
    ({}, "nothing pending"),
    ({"quarantined": 1}, "0 notification(s), 0/0 action(s) done, 1 quarantined"),
    ({"unannounced": 1, "actions": 1}, "0 notification(s), 1 renewal(s) found without one, 1/1 action(s) done"),
    ({"below_warning": 2}, "0 notification(s), 0/0 action(s) done, 2 certificate(s) close to expiry"),
    ({"failed_renewals": 1}, "0 notification(s), 0/0 action(s) done, 1 renewal(s) failed in the container"),
    ({"notifications": 9, "unannounced": 1, "actions": 5, "failed": 2, "verified": 3, "unverified": 1, "kept": 2,
      "deferred": 1, "unchanged": 4, "unmatched": 1, "unreadable": 1, "quarantined": 2, "below_warning": 1,
      "undated": 1, "overdue": 1},
     "9 notification(s), 1 renewal(s) found without one, 3/5 action(s) done, 3 endpoint(s) verified,"
     " 1 endpoint(s) NOT serving the live certificate, 2 kept for retry, 1 deferred by min-interval, 4 unchanged,"
     " 1 matched no rule, 1 without a readable certificate, 2 quarantined, 1 certificate(s) close to expiry,"
     " 1 certificate(s) whose dates cannot be read, 1 renewal(s) overdue"),
    ({"notifications": 2, "actions": 3, "dry_run": True}, "2 notification(s), 3 action(s) planned"),
])
def test_the_summary_names_every_count_that_is_not_zero(counts, line):
    assert batch.Outcome(**counts).summary() == line


# --- min-interval --------------------------------------------------------------------------


MIN_INTERVAL = '[settings]\nmin-interval = 60\n\n[[rule]]\nmatch = ["*"]\nreload = ["apache2"]\nrun = [["/bin/true"]]\n'


def test_min_interval_holds_a_unit_back_until_it_has_passed_and_not_a_moment_longer(relay, process, monkeypatch,
                                                                                     caplog, now):
    relay.write_rules(MIN_INTERVAL)
    relay.publish("a.ch")
    at(monkeypatch, now)
    assert process().done == 1
    relay.publish("b.ch")
    relay.publish("c.ch")
    at(monkeypatch, now + 59.5)
    caplog.set_level(logging.INFO, logger="certrelay.batch")

    held = process()

    assert (held.deferred, held.actions, held.deferred_until) == (2, 1, now + 60)  # /bin/true ran, apache2 waits
    assert "deferred reload apache2.service (b.ch, c.ch): its last action was less than min-interval (60 s) ago" in [
        record.getMessage() for record in caplog.records]
    assert relay.calls() == ["reload apache2.service"]
    at(monkeypatch, now + 60)
    assert process().done == 2
    assert relay.calls() == ["reload apache2.service"] * 2


def test_a_dry_run_says_it_would_defer(relay, process, monkeypatch, caplog, now):
    relay.write_rules(MIN_INTERVAL)
    relay.publish("a.ch")
    at(monkeypatch, now)
    process()
    relay.publish("b.ch")
    caplog.set_level(logging.INFO, logger="certrelay.batch")

    outcome = process(dry_run=True)

    assert outcome.deferred_until == now + 60
    assert ("would defer reload apache2.service (b.ch): its last action was less than min-interval (60 s) ago"
            in [record.getMessage() for record in caplog.records])


# --- the idle memo ------------------------------------------------------------------------


UNITS = '[[rule]]\nmatch = ["*"]\nreload = ["apache2"]\n'


def test_a_settled_batch_leaves_a_memo_due_a_day_later(relay, process, monkeypatch, now):
    relay.write_rules(UNITS)
    relay.publish("a.ch")
    at(monkeypatch, now)

    assert process().settled

    left = memo(relay)
    assert (left["config_dir"], left["rules_path"], left["until"]) == (relay.config_dir, relay.rules_path, now + 86400)
    with open(os.path.join(relay.state_dir, "status.json"), encoding="utf-8") as file:
        assert json.load(file)["last_run"] == now


@pytest.mark.parametrize("why", ["failed", "metrics", "close-to-expiry"])
def test_a_batch_that_leaves_something_or_writes_metrics_leaves_no_memo(relay, process, why):
    relay.write_rules(UNITS)
    relay.publish("a.ch")
    process()
    assert memo(relay) is not None
    if why == "failed":
        relay.behave("fail", "apache2.service")
        relay.publish("a.ch")
    elif why == "metrics":
        relay.write_rules(UNITS + f'\n[settings]\nmin-interval = 0\nmetrics = "{relay.root}/metrics.prom"\n')
    else:
        certs.renew(relay.config_dir, "b.ch", age_days=85)

    process()

    assert memo(relay) is None


def test_a_batch_with_installs_leaves_no_memo(relay, process, root):
    relay.write_rules(UNITS)
    relay.publish("a.ch")
    process()
    relay.write_rules(UNITS + f'  [[rule.install]]\n  dest = "{root}/{{name}}.pem"\n  content = ["fullchain", "privkey"]\n')
    certs.renew(relay.config_dir, "a.ch")
    relay.publish("a.ch", renew=False)

    outcome = process()

    assert (outcome.done, outcome.actions, outcome.failed) == (1, 2, 0)
    with open(os.path.join(root, "a.ch.pem"), "rb") as delivered, \
            open(os.path.join(relay.config_dir, "live", "a.ch", "privkey.pem"), "rb") as key:
        assert delivered.read().endswith(key.read())
    assert memo(relay) is None


def test_a_memo_that_cannot_be_removed_is_a_warning(relay, process, caplog):
    relay.write_rules(UNITS)
    relay.behave("fail", "apache2.service")
    relay.publish("a.ch")
    os.makedirs(os.path.join(relay.state_dir, idle.MEMO, "in-the-way"))
    caplog.set_level(logging.WARNING, logger="certrelay.batch")

    assert process().kept == 1

    path = os.path.join(relay.state_dir, idle.MEMO)
    assert f"cannot update {path}: Is a directory" in [record.getMessage() for record in caplog.records]


# --- what process() does by default ---------------------------------------------------------


def test_by_default_an_unchanged_certificate_is_skipped_and_a_forced_dry_run_would_act(relay, process, caplog):
    relay.write_rules(UNITS)
    relay.publish("a.ch")
    process()
    relay.publish("a.ch", renew=False)  # a replay: the live certificate is the one acted on
    caplog.set_level(logging.INFO, logger="certrelay")

    forced = process(dry_run=True, force=True)
    skipped = process()

    assert (forced.actions, forced.unchanged) == (1, 0)
    assert (skipped.actions, skipped.unchanged, skipped.done) == (0, 1, 0)
    assert relay.calls() == ["reload apache2.service"]
    assert "would reload apache2.service (a.ch)" in [record.getMessage() for record in caplog.records]


def test_a_temporary_file_a_killed_hook_left_a_day_ago_is_removed_and_said(relay, process, caplog):
    relay.write_rules(UNITS)
    relay.publish("a.ch")
    tmp = os.path.join(relay.spool, "tmp")
    os.makedirs(tmp, exist_ok=True)
    left = os.path.join(tmp, "a.ch.12345")
    open(left, "w").close()
    os.utime(left, (time.time() - 2 * 86400,) * 2)
    caplog.set_level(logging.DEBUG, logger="certrelay.batch")

    process()

    assert not os.path.exists(left)
    assert (f"removed {relay.spool}/tmp/a.ch.12345, left by a hook killed over a day ago"
            in [record.getMessage() for record in caplog.records])


# --- counting and dropping ------------------------------------------------------------------


def test_each_dropped_notification_is_counted_and_said_and_the_next_still_acted_on(relay, process, caplog):
    relay.write_rules('[[rule]]\nmatch = ["*.ch"]\nreload = ["apache2"]\n')
    for name in ("a.ch", "b.ch"):
        relay.publish(name)
    process()
    for name in ("a.ch", "b.ch"):  # replays: the certificates acted on
        relay.publish(name, renew=False)
    for name in ("c.org", "d.org"):  # no rule selects them
        relay.publish(name)
    for name in ("e.ch", "f.ch"):  # no live certificate to read
        relay.publish(name, renew=False)
    relay.publish("z.ch")
    caplog.set_level(logging.INFO, logger="certrelay.batch")

    outcome = process()

    for name in ("e.ch", "f.ch"):
        with pytest.raises(certificate.CertificateError):
            certificate.fingerprint(relay.config_dir, name)
    assert (outcome.notifications, outcome.unchanged, outcome.unmatched, outcome.unreadable, outcome.done) == (
        7, 2, 2, 2, 1)
    assert relay.calls() == ["reload apache2.service"] * 2
    said = [record.getMessage() for record in caplog.records]
    for name in ("a.ch", "b.ch"):
        assert f"skipped {name}: its certificate did not change since the last action (--force acts anyway)" in said
    for name in ("e.ch", "f.ch"):
        assert f"dropped the notification for {name}: there is no lineage {name} under live/: the container wrote a" \
            f" notification for a certificate this host does not have (is the container's /etc/letsencrypt" \
            f" {relay.config_dir}?)" in said


def test_a_batch_with_nothing_to_do_keeps_nothing(relay, process):
    relay.write_rules(UNITS)
    relay.publish("a.ch")
    process()

    process()
    process()

    path = os.path.join(relay.state_dir, "progress.json")
    assert not os.path.exists(path) or json.load(open(path, encoding="utf-8")) == {}


def test_a_renewal_that_failed_at_certbots_last_attempt_is_counted_and_alarmed(relay, process):
    """The post hook's record names herzbube.ch as failed (test_attempts.py: the same
    through `certrelay run`, which mutmut does not run)."""
    from tests.integration.test_attempts import record

    relay.write_rules('[settings]\nmin-interval = 0\noverdue-grace = "20d"\n\n[[rule]]\nmatch = ["*"]\n'
                      'reload = ["apache2"]\n')
    for name in ("herzbube.ch", "moser-naef.ch"):
        certs.renew(relay.config_dir, name, age_days=61)
    assert process().failed_renewals == 0
    record(relay, time.time() - 3600, failed="herzbube.ch *.herzbube.ch")

    outcome = process()

    assert (outcome.failed_renewals, outcome.alarmed) == (1, 1)


def test_a_batch_keeps_what_it_read_of_each_certificate_in_the_state_dir(relay, process):
    """lineages.json: the next run (a new process) parses only the certificates that changed."""
    relay.write_rules(UNITS)
    pem = certs.renew(relay.config_dir, "a.ch")

    process()

    with open(os.path.join(relay.state_dir, "lineages.json"), encoding="utf-8") as file:
        kept = json.load(file)
    assert list(kept) == ["a.ch"]
    assert kept["a.ch"]["sha256"] == hashlib.sha256(certificate.pem_to_der(pem)).hexdigest()


def test_status_json_records_what_was_acted_on_and_each_notification_kept(relay, process, monkeypatch, now, caplog):
    relay.write_rules('[settings]\nmin-interval = 0\n\n[[rule]]\nmatch = ["a.ch"]\nreload = ["apache2"]\n\n'
                      '[[rule]]\nmatch = ["c.ch", "d.ch"]\nrestart = ["exim4"]\n')
    relay.behave("fail", "exim4.service")
    for name in ("a.ch", "c.ch", "d.ch"):
        relay.publish(name)
    at(monkeypatch, now)
    caplog.set_level(logging.WARNING, logger="certrelay.batch")

    outcome = process()

    assert (outcome.done, outcome.kept) == (1, 2)
    claimed = os.path.join(relay.config_dir, "certrelay", "claimed")
    assert sorted(record.getMessage() for record in caplog.records if record.name == "certrelay.batch") == [
        f"kept the notification for {name} in {claimed}; a later run retries what failed" for name in ("c.ch", "d.ch")]
    with open(os.path.join(relay.state_dir, "status.json"), encoding="utf-8") as file:
        recorded = json.load(file)
    assert recorded["acted"]["a.ch"] == {"time": now, "sha256": certificate.fingerprint(relay.config_dir, "a.ch")}
    assert sorted((entry.partition("@")[0], kept["name"]) for entry, kept in recorded["kept"].items()) == [
        ("c.ch", "c.ch"), ("d.ch", "d.ch")]


def test_a_renewal_without_a_notification_is_counted_and_the_ledger_moves_only_once_acted_on(relay, process):
    relay.write_rules(UNITS)
    relay.publish("a.ch")
    process()
    acted_on = certificate.fingerprint(relay.config_dir, "a.ch")
    relay.renew("a.ch")  # the container's deploy hook did not run
    relay.behave("fail", "apache2.service")

    outcome = process()

    assert (outcome.unannounced, outcome.kept) == (1, 1)
    with open(os.path.join(relay.state_dir, "ledger.json"), encoding="utf-8") as file:
        assert json.load(file) == {"a.ch": acted_on}


def test_a_replay_of_a_notification_kept_from_a_flaky_unit_is_still_retried(relay, process):
    """a.ch@1 waits for exim4 (failed), a.ch@2 (a replay) for dovecot (failed now): when
    a.ch@1 is done the ledger holds the certificate, and a.ch@2 must not be dropped as
    unchanged, but retried."""
    relay.write_rules('[[rule]]\nmatch = ["*"]\nrestart = ["exim4", "dovecot"]\n')
    relay.publish("a.ch")
    relay.behave("fail", "exim4.service")
    assert process().kept == 1
    relay.publish("a.ch", renew=False)
    os.unlink(os.path.join(relay.bin, "fail", "exim4.service"))
    relay.behave("fail", "dovecot.service")
    assert (process().done, len(relay.entries("claimed"))) == (1, 1)
    os.unlink(os.path.join(relay.bin, "fail", "dovecot.service"))
    calls = len(relay.calls())

    outcome = process()

    assert (outcome.done, outcome.unchanged) == (1, 0)
    assert relay.calls()[calls:] == ["restart dovecot.service"]
    assert relay.entries("claimed") == []


def test_a_replay_against_a_ledger_an_older_certrelay_wrote_is_unchanged_and_the_ledger_taken_over(relay, process):
    relay.write_rules(UNITS)
    relay.publish("a.ch")
    process()
    with open(os.path.join(relay.config_dir, "live", "a.ch", "cert.pem"), "rb") as file:
        old = hashlib.sha256(file.read()).hexdigest()
    with open(os.path.join(relay.state_dir, "ledger.json"), "w", encoding="utf-8") as file:
        json.dump({"a.ch": old}, file)
    relay.publish("a.ch", renew=False)

    assert process().unchanged == 1

    with open(os.path.join(relay.state_dir, "ledger.json"), encoding="utf-8") as file:
        assert json.load(file) == {"a.ch": certificate.fingerprint(relay.config_dir, "a.ch")}


def test_a_dry_run_outcome_says_planned_and_what_it_would_verify(relay, process, caplog):
    relay.write_rules('[[rule]]\nmatch = ["*"]\nreload = ["apache2"]\nverify = ["https://127.0.0.1:8443"]\n')
    relay.publish("a.ch")
    caplog.set_level(logging.INFO, logger="certrelay.batch")

    outcome = process(dry_run=True)

    assert outcome.dry_run and outcome.summary() == "1 notification(s), 1 action(s) planned"
    assert "would verify that https://127.0.0.1:8443 serves the live certificate of a.ch" in [
        record.getMessage() for record in caplog.records]


# --- verification -----------------------------------------------------------------------------


class TlsServer:
    """Serves a certificate on 127.0.0.1: the handshake, then it closes."""

    def __init__(self, cert_file, key_file):
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert_file, key_file)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.running = True
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while self.running:
            try:
                connection, _ = self.listener.accept()
            except socket.timeout:
                continue
            connection.settimeout(2)
            try:
                with self.context.wrap_socket(connection, server_side=True) as tls:
                    tls.recv(1)
            except OSError:
                pass

    def stop(self):
        self.running = False
        self.thread.join()
        self.listener.close()


@pytest.fixture
def serve(relay):
    """serve(name) serves lineage `name`'s live certificate, as it is now."""
    servers = []

    def start(name):
        live = os.path.join(relay.config_dir, "live", name)
        servers.append(TlsServer(os.path.join(live, "fullchain.pem"), os.path.join(live, "privkey.pem")))
        return servers[-1].port

    yield start
    for server in servers:
        server.stop()


def test_a_verified_endpoint_settles_the_notification_and_is_recorded(relay, process, serve, monkeypatch, now):
    relay.renew("a.ch")
    port = serve("a.ch")
    relay.write_rules(f'[[rule]]\nmatch = ["a.ch"]\nreload = ["tlsd"]\nverify = ["tls://127.0.0.1:{port}"]\n')
    relay.publish("a.ch", renew=False)
    at(monkeypatch, now)

    outcome = process()

    assert (outcome.verified, outcome.unverified, outcome.done, outcome.kept) == (1, 0, 1, 0)
    with open(os.path.join(relay.state_dir, "status.json"), encoding="utf-8") as file:
        recorded = json.load(file)
    assert recorded["units"]["tlsd.service"]["time"] == now
    assert relay.entries("claimed") == []


def test_an_endpoint_serving_something_else_keeps_the_notification(relay, process, serve):
    relay.renew("other.ch")
    port = serve("other.ch")
    relay.write_rules(f'[settings]\nmin-interval = 0\nverify-timeout = "1s"\n\n[[rule]]\nmatch = ["a.ch"]\n'
                      f'reload = ["tlsd"]\nverify = ["tls://127.0.0.1:{port}"]\n')
    relay.publish("a.ch")

    outcome = process()

    assert (outcome.verified, outcome.unverified, outcome.done, outcome.kept) == (0, 1, 0, 1)
    assert [entry.partition("@")[0] for entry in relay.entries("claimed")] == ["a.ch"]


def test_a_dry_run_with_a_notification_no_rule_matches_still_says_what_it_would_verify(relay, process, caplog):
    relay.write_rules('[[rule]]\nmatch = ["a.ch"]\nreload = ["apache2"]\nverify = ["https://127.0.0.1:8443"]\n')
    relay.publish("z.org")  # no rule: the plan has no needs for it
    relay.publish("a.ch")
    caplog.set_level(logging.INFO, logger="certrelay.batch")

    outcome = process(dry_run=True)

    assert outcome.unmatched == 1
    assert "would verify that https://127.0.0.1:8443 serves the live certificate of a.ch" in [
        record.getMessage() for record in caplog.records]


def test_an_escalation_restart_is_recorded_with_its_time_for_min_interval_and_status(
        relay, process, serve, monkeypatch, now):
    relay.renew("a.ch")
    port = serve("a.ch")  # serves this certificate, and keeps serving it after the renewal: old
    relay.write_rules(f'[settings]\nmin-interval = 0\nverify-timeout = "1s"\n\n[[rule]]\nmatch = ["a.ch"]\n'
                      f'reload = ["tlsd"]\nverify = ["tls://127.0.0.1:{port}"]\n')
    relay.publish("a.ch")
    at(monkeypatch, now)

    outcome = process()

    assert relay.calls() == ["reload tlsd.service", "restart tlsd.service"]
    assert (outcome.verified, outcome.unverified, outcome.kept) == (0, 1, 1)
    with open(os.path.join(relay.state_dir, "units.json"), encoding="utf-8") as file:
        assert json.load(file) == {"tlsd.service": now}
    with open(os.path.join(relay.state_dir, "status.json"), encoding="utf-8") as file:
        recorded = json.load(file)
    assert {key: recorded["units"]["tlsd.service"][key] for key in ("verb", "result", "time")} == {
        "verb": "restart", "result": "success", "time": now}
    (endpoint,) = recorded["endpoints"]["a.ch"].values()
    assert (endpoint["outcome"], endpoint["checked"]) == ("old", now)


def test_a_unit_another_rule_restarted_is_not_restarted_again_for_an_old_certificate(relay, process, serve):
    relay.renew("a.ch")
    port = serve("a.ch")
    relay.write_rules(f'[settings]\nmin-interval = 0\nverify-timeout = "1s"\n\n'
                      f'[[rule]]\nmatch = ["a.ch"]\nreload = ["tlsd"]\nverify = ["tls://127.0.0.1:{port}"]\n\n'
                      f'[[rule]]\nmatch = ["a.ch"]\nrestart = ["tlsd"]\n')
    relay.publish("a.ch")

    outcome = process()

    assert relay.calls() == ["restart tlsd.service"]  # the strongest verb, once; no escalation after a restart
    assert (outcome.unverified, outcome.kept) == (1, 1)
