"""Alerts ([alert]: command, ping, apprise) from real `certrelay run` processes: each
problem once when it appears, again a day later, once when it clears; an alert a
channel refuses is kept and sent by the next run; the dead-man's switch pings after
every run, /fail after one that did not end well; `certrelay alert --test`.

Mail goes to the local MTA on loopback: the end-to-end test delivers it through a real
exim4 (tests/e2e/test_e2e.py)."""

import http.server
import json
import os
import threading
import time

import pytest

from tests import certs

NAME = "herzbube.ch"


class Recorder(http.server.BaseHTTPRequestHandler):
    """Records each request as (method, path, body) on the server."""

    def do_GET(self):
        self.record(b"")

    def do_POST(self):
        self.record(self.rfile.read(int(self.headers.get("Content-Length", 0))))

    def record(self, body):
        self.server.seen.append((self.command, self.path, body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *arguments):
        pass


@pytest.fixture
def server():
    """An HTTP server on loopback recording what it is sent; shut down after the test."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    httpd.seen = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


class Pager:
    """An alert `command`: records each message (level, subject, body) as a JSON line;
    refuses (exit 1) while the file `refuse` exists."""

    def __init__(self, root):
        self.program, self.record, self.refuse = (os.path.join(root, name) for name in ("pager", "paged", "refuse"))
        with open(self.program, "w", encoding="utf-8") as file:
            file.write(f"""#!/usr/bin/python3
import json, os, sys
if os.path.exists({self.refuse!r}):
    sys.exit("pager: down")
with open({self.record!r}, "a") as file:
    file.write(json.dumps([os.environ["CERTRELAY_ALERT_LEVEL"], os.environ["CERTRELAY_ALERT_SUBJECT"],
                           sys.stdin.read()]) + "\\n")
""")
        os.chmod(self.program, 0o755)

    def messages(self):
        try:
            with open(self.record, encoding="utf-8") as file:
                return [json.loads(line) for line in file]
        except FileNotFoundError:
            return []


@pytest.fixture
def pager(relay):
    return Pager(relay.root)


def rules(pager=None, ping=None, apprise=None):
    channels = "[alert]\n"
    if pager:
        channels += f'command = [["{pager.program}"]]\n'
    if ping:
        channels += f'ping = "{ping}"\n'
    if apprise:
        channels += f'apprise = ["{apprise}"]\n'
    return f'{channels}\n[settings]\nmin-interval = 0\n\n[[rule]]\nmatch = ["{NAME}"]\nrestart = ["dovecot"]\n'


def age_alerts(relay, seconds):
    """Move every standing problem's last alert `seconds` into the past, as if that
    much time had gone by (no test waits a day)."""
    path = os.path.join(relay.state_dir, "alerts.json")
    with open(path, encoding="utf-8") as file:
        data = json.load(file)
    for said in data["active"].values():
        said["sent"] -= seconds
    with open(path, "w", encoding="utf-8") as file:
        json.dump(data, file)


def test_a_problem_alerts_once_then_a_day_later_then_once_resolved(relay, pager):
    relay.write_rules(rules(pager))
    certs.renew(relay.config_dir, NAME, age_days=62)  # overdue: certbot renews 90-day certificates at day 60

    first = relay.run()
    second = relay.run()
    age_alerts(relay, 86400)
    third = relay.run()
    messages = pager.messages()
    certs.renew(relay.config_dir, NAME)  # certbot renewed at last (no notification: reconcile finds it)
    fourth = relay.run()
    fifth = relay.run()

    assert first.returncode == 1 and "renewal OVERDUE" in first.stderr
    assert second.returncode == 0 and third.returncode == 0  # the log line: once a day by status.json
    assert len(messages) == 2, messages
    level, subject, body = messages[0]
    assert level == "error"
    assert subject == f"certrelay on {os.uname().nodename}: renewal of {NAME} overdue"
    assert body.startswith(f"{NAME}: renewal OVERDUE: certbot should have renewed it from ")
    assert "look at the output of the certbot container" in body and "certrelay status" in body
    assert messages[1] == messages[0]
    assert fourth.returncode == 0, fourth.stderr
    resolved = pager.messages()[2:]
    assert [(level, subject) for level, subject, _ in resolved] == [
        ("resolved", f"certrelay on {os.uname().nodename}: resolved: renewal of {NAME} overdue")]
    assert fifth.returncode == 0


def test_a_kept_notification_alerts_with_what_failed_and_resolves_when_done(relay, pager):
    relay.write_rules(rules(pager))
    relay.behave("fail", "dovecot.service")
    relay.publish(NAME)

    kept = relay.run()
    os.unlink(os.path.join(relay.bin, "fail", "dovecot.service"))
    done = relay.run()

    assert kept.returncode == 1 and done.returncode == 0, done.stderr
    (level, subject, body), (resolved, resolved_subject, _) = pager.messages()
    assert (level, subject) == ("error", f"certrelay on {os.uname().nodename}: {NAME}: action or verification failed")
    assert f"{NAME} renewed, but this failed (tried 1 time(s); each run tries again):\n- restart dovecot.service: " \
        "exit status 1" in body
    assert resolved == "resolved"
    assert resolved_subject == f"certrelay on {os.uname().nodename}: resolved: {NAME}: action or verification failed"


def test_an_alert_the_channel_refuses_is_kept_and_sent_by_the_next_run(relay, pager):
    relay.write_rules(rules(pager))
    certs.renew(relay.config_dir, NAME, age_days=62)
    open(pager.refuse, "w").close()

    refused = relay.run()
    with open(os.path.join(relay.state_dir, "alerts.json"), encoding="utf-8") as file:
        outbox = json.load(file)["outbox"]
    waiting = relay.run("--json", command="status")
    os.unlink(pager.refuse)
    sent = relay.run()
    after = relay.run("--json", command="status")

    assert refused.returncode == 1
    assert f"not sent through command {pager.program}: exit status 1: pager: down; kept in " in refused.stderr
    assert "1 alert(s) not sent" in refused.stderr
    assert [message["channels"] for message in outbox] == [[f"command {pager.program}"]]
    assert sent.returncode == 0, sent.stderr  # the overdue line was said in the first run: once a day
    # status says a message waits, and stops saying it once sent
    assert json.loads(waiting.stdout)["unsent_alerts"] == [f"certrelay on {os.uname().nodename}: renewal of {NAME} overdue"]
    assert any("1 alert(s) not sent yet" in problem for problem in json.loads(waiting.stdout)["problems"])
    assert json.loads(after.stdout)["unsent_alerts"] == []
    assert [subject for _, subject, _ in pager.messages()] == [
        f"certrelay on {os.uname().nodename}: renewal of {NAME} overdue"]


def test_the_ping_says_fail_after_a_run_with_a_problem_and_success_after_each_good_one(relay, server):
    url = f"http://127.0.0.1:{server.server_port}/ping/uuid"
    relay.write_rules(rules(ping=url))
    relay.behave("fail", "dovecot.service")
    relay.publish(NAME)

    failed = relay.run()
    os.unlink(os.path.join(relay.bin, "fail", "dovecot.service"))
    good, idle = relay.run(), relay.run()

    assert (failed.returncode, good.returncode, idle.returncode) == (1, 0, 0)
    # every run pings, the idle one too: with a ping no run skips the batch
    assert server.seen == [("GET", "/ping/uuid/fail", b""), ("GET", "/ping/uuid", b""), ("GET", "/ping/uuid", b"")]


def test_a_ping_that_cannot_be_sent_never_fails_the_run(relay, server):
    port = server.server_port
    server.shutdown()
    server.server_close()  # nothing listens there now
    relay.write_rules(rules(ping=f"http://127.0.0.1:{port}/uuid"))
    relay.publish(NAME)

    result = relay.run()

    assert result.returncode == 0, result.stderr
    assert f"warning: ping http://127.0.0.1:{port}/uuid: " in result.stderr


def test_apprise_delivers_through_its_own_url(relay, server):
    pytest.importorskip("apprise", reason="apprise is not installed: apt-get install apprise")
    relay.write_rules(rules(apprise=f"json://127.0.0.1:{server.server_port}/hook"))
    certs.renew(relay.config_dir, NAME, age_days=62)

    result = relay.run()

    assert result.returncode == 1 and "not sent" not in result.stderr, result.stderr
    ((method, path, body),) = server.seen
    posted = json.loads(body)
    assert (method, path) == ("POST", "/hook")
    assert posted["title"] == f"certrelay on {os.uname().nodename}: renewal of {NAME} overdue"
    assert posted["message"].startswith(f"{NAME}: renewal OVERDUE") and posted["type"] == "failure"


def test_alert_test_sends_through_every_channel_and_says_which_failed(relay, pager, server):
    relay.write_rules(rules(pager, ping=f"http://127.0.0.1:{server.server_port}/uuid"))

    sent = relay.run("--test", command="alert")
    open(pager.refuse, "w").close()
    refused = relay.run("--test", command="alert")

    assert sent.returncode == 0, sent.stderr
    assert f"command {pager.program}: sent" in sent.stderr and "ping: sent" in sent.stderr
    ((level, subject, body),) = pager.messages()
    assert (level, subject) == ("warning", f"certrelay on {os.uname().nodename}: test alert")
    assert server.seen == [("GET", "/uuid", b"")] * 2
    assert refused.returncode == 1
    assert f"error: command {pager.program}: NOT sent: exit status 1: pager: down" in refused.stderr


def test_alert_test_without_an_alert_table_says_what_to_add(relay):
    result = relay.run("--test", command="alert")

    assert result.returncode == 2
    assert f"{relay.rules_path} has no [alert] table: add one" in result.stderr


def test_an_alert_waiting_for_a_channel_taken_out_of_the_rules_is_dropped_saying_so(relay, pager, tmp_path):
    relay.write_rules(rules(pager))
    certs.renew(relay.config_dir, NAME, age_days=62)
    open(pager.refuse, "w").close()
    assert relay.run().returncode == 1  # kept for the pager
    os.makedirs(tmp_path / "other")
    other = Pager(str(tmp_path / "other"))
    relay.write_rules(rules(other))

    result = relay.run()

    assert result.returncode == 0, result.stderr
    assert f"no longer sent through command {pager.program}: not in [alert] any more" in result.stderr
    assert other.messages() == [] and pager.messages() == []  # said when it appeared; again tomorrow


def test_certbot_that_stopped_is_alerted_and_resolved_when_it_tries_again(relay, pager):
    """Issue 18's case: the container's timer stops; a mail (here: the pager) says so;
    certbot runs again and renews: one more says it is resolved."""
    from tests.integration.test_attempts import install_post_hook, record

    relay.write_rules(rules(pager).replace("[settings]\n", '[settings]\noverdue-grace = "20d"\n'))
    install_post_hook(relay)
    certs.renew(relay.config_dir, NAME, age_days=63)  # due since day 60
    record(relay, time.time() - 30 * 86400, renewed="old.example")  # the last attempt: a month ago

    stopped = relay.run()
    certs.renew(relay.config_dir, NAME)
    record(relay, time.time(), renewed=f"{NAME} *.{NAME}")  # the timer runs again
    resolved = relay.run()

    assert stopped.returncode == 1 and resolved.returncode == 0, resolved.stderr
    host = os.uname().nodename
    assert [(level, subject) for level, subject, _ in pager.messages()] == [
        ("error", f"certrelay on {host}: certbot stopped renewing"),
        ("resolved", f"certrelay on {host}: resolved: certbot stopped renewing")]
    assert "is the container's cron line, or certbot-docker-renew.timer, still running?" in pager.messages()[0][2]


def test_a_hand_edited_alerts_file_never_stops_a_batch(relay, pager):
    relay.write_rules(rules(pager))
    os.makedirs(relay.state_dir)
    with open(os.path.join(relay.state_dir, "alerts.json"), "w", encoding="utf-8") as file:
        json.dump({"active": {"x": "junk", "y": {}}, "outbox": ["junk", {"level": "error"}]}, file)
    relay.publish(NAME)

    result = relay.run()

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "dropped an unreadable message from the outbox" in result.stderr
    assert [(level, subject) for level, subject, _ in pager.messages()] == [
        ("resolved", f"certrelay on {os.uname().nodename}: resolved: y")]
