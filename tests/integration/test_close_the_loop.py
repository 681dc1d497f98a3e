"""`certrelay run`, `verify` and `status` closing the loop, as real processes: a TLS
server in this process serves what a "restart" of its unit copied from the live
lineage, the recording systemctl does those restarts; reconcile, expiry alarms,
metrics and the Nagios plugin on real certificates."""

import json
import os
import shutil
import socket
import ssl
import threading

import pytest

from tests import certs

SERVED_UNIT = "tlsd.service"


class TlsServer:
    """Serves, on 127.0.0.1, the certificate and key in `directory` as they are at
    each connection (so a "restart" is copying new files there)."""

    def __init__(self, directory):
        self.directory = directory
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.running = True
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while self.running:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            with connection:
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                context.load_cert_chain(os.path.join(self.directory, "cert.pem"), os.path.join(self.directory, "key.pem"))
                try:
                    with context.wrap_socket(connection, server_side=True) as tls:
                        tls.recv(1)
                except (OSError, ssl.SSLError):
                    pass

    def stop(self):
        self.running = False
        self.listener.close()
        self.thread.join(timeout=5)


@pytest.fixture
def served(relay, tmp_path):
    """A TLS server for tlsd.service; the fake systemctl's `restart tlsd.service`
    copies the live example.test certificate into what it serves."""
    directory = tmp_path / "served"
    directory.mkdir()
    live = os.path.join(relay.config_dir, "live", "example.test")
    restart = os.path.join(relay.bin, "on-call")
    with open(restart, "w") as file:
        file.write(
            "#!/bin/sh\n"
            f'if [ "$1" = restart ] && [ "$2" = {SERVED_UNIT} ]; then\n'
            f'  cat {live}/cert.pem > {directory}/cert.pem && cat {live}/privkey.pem > {directory}/key.pem\n'
            "fi\n"
        )
    os.chmod(restart, 0o755)
    certs.renew(relay.config_dir, "example.test")
    shutil.copy(os.path.join(live, "cert.pem"), directory / "cert.pem")
    shutil.copy(os.path.join(live, "privkey.pem"), directory / "key.pem")
    server = TlsServer(str(directory))
    yield server
    server.stop()


def rules_for(server, verb="reload", extra=""):
    return (f'[settings]\nmin-interval = 0\nverify-timeout = "3s"\n\n[[rule]]\nmatch = ["example.test"]\n'
            f'{verb} = ["{SERVED_UNIT}"]\nverify = ["tls://127.0.0.1:{server.port}"]\n{extra}')


def publish_renewal(relay):
    certs.renew(relay.config_dir, "example.test")
    relay.publish("example.test", renew=False)


def test_run_verifies_that_the_endpoint_serves_the_renewed_certificate(relay, served):
    relay.write_rules(rules_for(served, verb="restart"))
    publish_renewal(relay)

    result = relay.run()

    assert result.returncode == 0, result.stderr
    assert relay.calls() == [f"restart {SERVED_UNIT}"]
    assert f"verified: tls://127.0.0.1:{served.port} (SNI example.test) serves the current certificate of example.test" in result.stderr


def test_run_escalates_a_reload_that_changed_nothing_to_one_restart(relay, served):
    relay.write_rules(rules_for(served, verb="reload"))
    publish_renewal(relay)

    result = relay.run()

    assert result.returncode == 0, result.stderr
    assert relay.calls() == [f"reload {SERVED_UNIT}", f"restart {SERVED_UNIT}"]
    assert "still serves an OLD certificate of example.test (serial " in result.stderr
    assert "not the live one (serial " in result.stderr  # what was served, against what should be
    assert "escalating to a restart" in result.stderr
    assert "serves the current certificate of example.test" in result.stderr
    assert relay.entries("claimed") == []


def test_run_with_escalate_false_keeps_the_notification_and_restarts_nothing(relay, served):
    relay.write_rules(rules_for(served, verb="reload", extra="escalate = false\n"))
    publish_renewal(relay)

    result = relay.run()

    assert result.returncode == 1
    assert relay.calls() == [f"reload {SERVED_UNIT}"]
    assert "not current: " in result.stderr and "OLD certificate" in result.stderr
    assert len(relay.entries("claimed")) == 1


def test_wrong_certificate_is_other_kept_never_looped_and_verify_says_so(relay, served, tmp_path):
    relay.write_rules(rules_for(served, verb="restart"))
    stranger, key = certs.make_certificate(["stranger.test"])
    os.unlink(os.path.join(relay.bin, "on-call"))  # the service reads another certificate
    (tmp_path / "served" / "cert.pem").write_bytes(stranger)
    (tmp_path / "served" / "key.pem").write_bytes(key)
    publish_renewal(relay)

    first = relay.run()

    assert first.returncode == 1
    assert relay.calls() == [f"restart {SERVED_UNIT}"]  # once: no escalation for "other"
    assert "serves a certificate of no lineage certrelay knows" in first.stderr
    assert len(relay.entries("claimed")) == 1
    checked = relay.run("--json", command="verify")
    assert checked.returncode == 1
    assert [entry["outcome"] for entry in json.loads(checked.stdout)] == ["other"]

    live = os.path.join(relay.config_dir, "live", "example.test")  # the admin fixes the service
    shutil.copy(os.path.join(live, "cert.pem"), tmp_path / "served" / "cert.pem")
    shutil.copy(os.path.join(live, "privkey.pem"), tmp_path / "served" / "key.pem")
    second = relay.run()

    assert second.returncode == 0, second.stderr
    assert relay.entries("claimed") == []
    assert relay.run(command="verify").returncode == 0


def test_precheck_failure_leaves_the_unit_untouched_and_keeps_the_notification(relay, served):
    relay.write_rules(rules_for(served, verb="restart", extra='precheck = [["/bin/false"]]\n'))
    publish_renewal(relay)

    result = relay.run()

    assert result.returncode == 1
    assert relay.calls() == []
    assert "failed: precheck /bin/false (example.test)" in result.stderr
    assert f"failed: restart {SERVED_UNIT} (example.test): not done, because this failed first" in result.stderr


def test_dry_run_and_explain_show_the_verification(relay, served):
    relay.write_rules(rules_for(served, verb="restart"))
    publish_renewal(relay)

    dry = relay.run("--dry-run")
    explained = relay.run("example.test", "example.test", command="explain")

    assert f"would verify that tls://127.0.0.1:{served.port} serves the live certificate of example.test" in dry.stderr
    assert f"would verify that tls://127.0.0.1:{served.port} (SNI example.test) serves the live certificate" in explained.stdout
    assert relay.calls() == []


# --- reconcile -------------------------------------------------------------------------


def test_first_run_records_existing_lineages_and_acts_on_nothing(relay):
    for name in ("herzbube.ch", "moser-naef.ch"):
        certs.renew(relay.config_dir, name)

    result = relay.run()

    assert result.returncode == 0, result.stderr
    assert relay.calls() == []
    assert "herzbube.ch: seen for the first time; recorded, nothing done" in result.stderr


def test_renewal_whose_notification_was_lost_is_acted_on_once_by_the_next_run(relay):
    certs.renew(relay.config_dir, "herzbube.ch")
    assert relay.run().returncode == 0
    certs.renew(relay.config_dir, "herzbube.ch")  # renewed, but the hook never ran

    result = relay.run()
    again = relay.run()

    assert result.returncode == 0, result.stderr
    assert "herzbube.ch: its live certificate changed but no notification came" in result.stderr
    assert sorted(relay.calls()) == ["reload apache2.service", "restart dovecot.service", "restart exim4.service"]
    assert again.returncode == 0 and len(relay.calls()) == 3
    assert "; acting as if notified" in result.stderr


def test_dry_run_says_it_would_act_on_a_renewal_without_notification(relay):
    certs.renew(relay.config_dir, "herzbube.ch")
    assert relay.run().returncode == 0
    certs.renew(relay.config_dir, "herzbube.ch")

    result = relay.run("--dry-run")

    assert "no notification came (is the deploy hook installed where certbot runs?); would act as if notified" \
        in result.stderr, result.stderr
    assert "would restart dovecot.service (herzbube.ch)" in result.stderr
    assert relay.calls() == []


# --- expiry, status, metrics, the monitoring plugin ----------------------------------


def test_certificate_past_the_warning_makes_run_fail_once_a_day(relay):
    certs.renew(relay.config_dir, "herzbube.ch", days=90, age_days=85)

    first = relay.run()
    second = relay.run()

    assert first.returncode == 1
    assert "error: herzbube.ch: the live certificate expires in 5.0 days (critical" in first.stderr
    assert "renewal is probably failing where certbot runs" in first.stderr
    assert second.returncode == 0 and "expires in" not in second.stderr


@pytest.mark.parametrize(
    "days, age, code, word",
    [(90, 10, 0, "OK"), (90, 75, 1, "WARNING"), (90, 85, 2, "CRITICAL"), (6, 7, 2, "CRITICAL"), (6, 5.2, 1, "WARNING")],
    ids=["fresh", "warning", "critical", "six-day-expired", "six-day-warning"],
)
def test_verify_nagios_status_follows_the_expiry_thresholds(relay, days, age, code, word):
    certs.renew(relay.config_dir, "herzbube.ch", days=days, age_days=age)

    result = relay.run("--nagios", command="verify")

    assert result.returncode == code, result.stdout + result.stderr
    assert result.stdout.startswith(f"CERTRELAY {word} - ")
    assert "'certificates'=1;;;0;" in result.stdout.splitlines()[0].partition("|")[2]
    assert " | 'herzbube.ch'=" in "\n".join(result.stdout.splitlines()[1:])  # in the long output


def test_status_json_and_metrics_after_runs(relay, tmp_path):
    metrics = tmp_path / "node-exporter" / "certrelay.prom"
    metrics.parent.mkdir()
    relay.write_rules(f'[settings]\nmin-interval = 0\nmetrics = "{metrics}"\n\n[[rule]]\nmatch = ["*"]\nreload = ["apache2"]\n')
    certs.renew(relay.config_dir, "herzbube.ch")
    relay.run()
    pem = certs.renew(relay.config_dir, "herzbube.ch")
    relay.publish("herzbube.ch", renew=False)
    assert relay.run().returncode == 0

    result = relay.run("--json", command="status")

    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    [certificate] = report["certificates"]
    assert certificate["name"] == "herzbube.ch" and certificate["state"] == "current"
    assert certificate["sha256"] == __import__("hashlib").sha256(ssl.PEM_cert_to_DER_cert(pem.decode())).hexdigest()
    assert certificate["not_after"].endswith("Z") and 89 < certificate["days_left"] <= 90
    assert report["units"][0]["unit"] == "apache2.service"
    text = metrics.read_text()
    assert 'certrelay_actions_total{unit="apache2.service",verb="reload",result="success"} 1' in text
    assert 'certrelay_notifications{state="pending"} 0' in text
    assert 'certrelay_certificate_not_after_timestamp_seconds{name="herzbube.ch"}' in text
    table = relay.run(command="status")
    assert table.returncode == 0 and "herzbube.ch" in table.stdout
    certs.renew(relay.config_dir, "herzbube.ch")
    relay.publish("herzbube.ch", renew=False)
    assert relay.run().returncode == 0
    # A counter: kept across runs, not reset by each.
    assert 'certrelay_actions_total{unit="apache2.service",verb="reload",result="success"} 2' in metrics.read_text()


# --- installs ---------------------------------------------------------------------------


def install_rules(destination, extra=""):
    return (f'[settings]\nmin-interval = 0\n\n[[rule]]\nmatch = ["example.test"]\nreload = ["haproxy"]\n\n'
            f'  [[rule.install]]\n  dest = "{destination}/{{name}}.pem"\n  content = ["fullchain", "privkey"]\n'
            f'  mode = "0640"\n{extra}')


def test_run_installs_before_the_reload_and_status_shows_where(relay, root):
    relay.write_rules(install_rules(root))
    pem = certs.renew(relay.config_dir, "example.test")
    relay.publish("example.test", renew=False)

    result = relay.run()

    assert result.returncode == 0, result.stderr
    installed = os.path.join(root, "example.test.pem")
    assert open(installed, "rb").read().startswith(pem)
    assert stat_mode(installed) == 0o640
    assert relay.calls() == ["reload haproxy.service"]
    assert result.stderr.index(f"done: install fullchain+privkey to {installed}") < result.stderr.index("done: reload")
    status = json.loads(relay.run("--json", command="status").stdout)
    assert [install["dest"] for install in status["certificates"][0]["installs"]] == [installed]


def test_install_of_a_mismatched_key_keeps_the_old_file_and_leaves_the_unit_alone(relay, root):
    relay.write_rules(install_rules(root))
    certs.renew(relay.config_dir, "example.test")
    relay.publish("example.test", renew=False)
    assert relay.run().returncode == 0
    installed = os.path.join(root, "example.test.pem")
    before = open(installed, "rb").read()
    certs.renew(relay.config_dir, "example.test")
    _, stranger_key = certs.make_certificate(["stranger.test"])
    key = os.path.realpath(os.path.join(relay.config_dir, "live", "example.test", "privkey.pem"))
    with open(key, "wb") as file:  # a broken lineage: the key belongs to no certificate here
        file.write(stranger_key)
    relay.publish("example.test", renew=False)

    result = relay.run()

    assert result.returncode == 1
    assert open(installed, "rb").read() == before
    assert relay.calls() == ["reload haproxy.service"]  # only the first run's
    assert "does not match" in result.stderr
    assert "failed: reload haproxy.service (example.test): not done, because this failed first: install:" in result.stderr
    assert len(relay.entries("claimed")) == 1


def test_check_refuses_an_install_destination_that_is_a_symlink(relay, root):
    relay.write_rules(install_rules(root))
    certs.renew(relay.config_dir, "example.test")
    os.symlink("/etc/passwd", os.path.join(root, "example.test.pem"))

    result = relay.run(command="check")

    assert result.returncode == 2
    assert f"{relay.rules_path}:8: " in result.stderr and "is a symbolic link" in result.stderr


def stat_mode(path):
    return os.stat(path).st_mode & 0o7777


def test_verify_warns_about_a_served_certificate_close_to_expiry(relay, served, tmp_path):
    relay.write_rules(rules_for(served, verb="restart"))
    certs.renew(relay.config_dir, "example.test", days=90, age_days=86)
    live = os.path.join(relay.config_dir, "live", "example.test")
    shutil.copy(os.path.join(live, "cert.pem"), tmp_path / "served" / "cert.pem")
    shutil.copy(os.path.join(live, "privkey.pem"), tmp_path / "served" / "key.pem")

    result = relay.run(command="verify")

    assert result.returncode == 0, result.stderr  # current: only the expiry is wrong
    assert f"error: tls://127.0.0.1:{served.port} serves a certificate that expires in 4.0 days (critical)" in result.stderr


def test_status_tells_pending_kept_and_deferred_apart_and_says_why(relay):
    relay.write_rules('[[rule]]\nmatch = ["*"]\nrestart = ["dovecot"]\n')
    for name in ("herzbube.ch", "moser-naef.ch", "grunzwanzling.ch"):
        certs.renew(relay.config_dir, name)
    assert relay.run().returncode == 0  # first sight: recorded
    certs.renew(relay.config_dir, "herzbube.ch")
    relay.publish("herzbube.ch", renew=False)
    relay.behave("fail", "dovecot.service")
    assert relay.run().returncode == 1  # kept: dovecot failed
    certs.renew(relay.config_dir, "grunzwanzling.ch")
    relay.publish("grunzwanzling.ch", renew=False)  # claimed by a run that then died: deferred
    os.rename(os.path.join(relay.spool, "queue", "grunzwanzling.ch"),
              os.path.join(relay.spool, "claimed", "grunzwanzling.ch@1"))
    certs.renew(relay.config_dir, "moser-naef.ch")
    relay.publish("moser-naef.ch", renew=False)  # not processed yet: pending

    result = relay.run("--json", command="status")
    table = relay.run(command="status")

    assert result.returncode == 1 and table.returncode == 1
    report = json.loads(result.stdout)
    states = {certificate["name"]: certificate["state"] for certificate in report["certificates"]}
    assert states == {"grunzwanzling.ch": "deferred", "herzbube.ch": "kept", "moser-naef.ch": "pending"}
    assert report["notifications"] == {"pending": 1, "kept": 1, "deferred": 1}
    [kept] = [certificate for certificate in report["certificates"] if certificate["name"] == "herzbube.ch"][0]["kept"]
    assert kept["action"] == "restart dovecot.service" and kept["attempts"] == 1 and "exit status 1" in kept["error"]
    assert "kept: restart dovecot.service failed" in table.stdout
    [unit] = report["units"]
    assert (unit["unit"], unit["verb"], unit["result"]) == ("dovecot.service", "restart", "failure")
    assert "exit status 1: Job for dovecot.service failed" in unit["error"]


def test_first_sight_acts_only_where_an_endpoint_does_not_serve_the_live_certificate(relay, served, tmp_path):
    relay.write_rules(rules_for(served, verb="restart"))

    serving = relay.run()  # the endpoint serves the live certificate: recorded only

    assert serving.returncode == 0, serving.stderr
    assert relay.calls() == []
    assert "example.test: seen for the first time; recorded, nothing done" in serving.stderr

    stranger, key = certs.make_certificate(["stranger.test"])
    (tmp_path / "served" / "cert.pem").write_bytes(stranger)
    (tmp_path / "served" / "key.pem").write_bytes(key)
    shutil.rmtree(relay.state_dir)  # certrelay installed anew on a host whose service is stale

    stale = relay.run()

    assert stale.returncode == 0, stale.stderr  # the restart made it serve the live one
    assert relay.calls() == [f"restart {SERVED_UNIT}"]
    assert "example.test: seen for the first time, and an endpoint does not serve its live certificate" in stale.stderr
