"""The idle memo (idle.py): `certrelay run` skips the batch when nothing changed since
a batch that left nothing to do, and only then."""

import datetime
import json
import marshal
import os
import time

import pytest

from certrelay import alarms, batch, certinfo, idle, lineages, rules as rules_module
from tests import certs
from tests.writeup import WRITE_UP_CERTIFICATES

SKIPPED = "nothing changed since the last batch"


def settle(relay):
    """Publish the write-up's renewals (real certificates) and run; return the memo's path."""
    for name in WRITE_UP_CERTIFICATES:
        certs.renew(relay.config_dir, name)
        relay.publish(name, renew=False)
    assert relay.run().returncode == 0
    memo = os.path.join(relay.state_dir, idle.MEMO)
    assert os.path.isfile(memo), "a batch that left nothing to do leaves the memo"
    return memo


def skipped(relay, *arguments):
    """Run `certrelay run -v`; return (whether it skipped the batch, the result)."""
    result = relay.run("-v", *arguments)
    return SKIPPED in result.stderr, result


def test_run_after_a_settled_batch_skips_it_and_counts_as_the_last_run(relay):
    settle(relay)
    calls = relay.calls()
    before = time.time()

    was_skipped, result = skipped(relay)

    assert was_skipped, result.stderr
    assert result.returncode == 0 and result.stderr.startswith("nothing pending")
    assert relay.calls() == calls
    assert relay.run("-q").stderr == ""
    status = relay.run("--json", command="status")
    last_run = datetime.datetime.fromisoformat(json.loads(status.stdout)["last_run"].replace("Z", "+00:00"))
    assert last_run.timestamp() >= int(before)


def rewrite_memo(relay, **changes):
    path = os.path.join(relay.state_dir, idle.MEMO)
    with open(path, "rb") as file:
        memo = marshal.load(file)
    memo.update(changes)
    with open(path, "wb") as file:
        marshal.dump(memo, file)


def renew_without_notification(relay):
    certs.renew(relay.config_dir, "herzbube.ch")


def publish(relay):
    certs.renew(relay.config_dir, "moser-naef.ch")
    relay.publish("moser-naef.ch", renew=False)


def edit_rules(relay):
    with open(relay.rules_path, "a", encoding="utf-8") as file:
        file.write("# edited\n")


def leave_claimed(relay):
    open(os.path.join(relay.spool, "claimed", "herzbube.ch@1"), "w").close()


def leave_temporary(relay):
    open(os.path.join(relay.spool, "tmp", "herzbube.ch.123"), "w").close()


def replace_queue_by_link(relay):
    os.rmdir(os.path.join(relay.spool, "queue"))
    os.symlink("/etc", os.path.join(relay.spool, "queue"))


def add_lineage(relay):
    certs.renew(relay.config_dir, "new.example")


def remove_lineage(relay):
    os.unlink(os.path.join(relay.config_dir, "live", "grunzwanzling.ch", "cert.pem"))


def make_file_a_lineage(relay):
    os.rename(os.path.join(relay.config_dir, "live", "README"), os.path.join(relay.root, "README"))
    os.makedirs(os.path.join(relay.config_dir, "live", "README"))


def warning_due(relay):
    rewrite_memo(relay, until=time.time() - 1)


def other_python(relay):
    rewrite_memo(relay, version=["0", 0])


def corrupt_memo(relay):
    with open(os.path.join(relay.state_dir, idle.MEMO), "wb") as file:
        file.write(b"\x00garbage")


def other_rules_path(relay):
    rewrite_memo(relay, rules_path="/etc/certrelay/rules.toml")


CHANGES = [
    renew_without_notification, publish, edit_rules, leave_claimed, leave_temporary, replace_queue_by_link,
    add_lineage, remove_lineage, make_file_a_lineage, warning_due, other_python, corrupt_memo, other_rules_path,
]


@pytest.mark.parametrize("change", CHANGES, ids=[change.__name__ for change in CHANGES])
def test_any_change_makes_the_next_run_a_full_batch(relay, change):
    settle(relay)
    with open(os.path.join(relay.config_dir, "live", "README"), "w") as file:
        file.write("certbot's README\n")
    assert relay.run().returncode == 0  # a new entry in live/: a full batch, which settles
    assert skipped(relay)[0]

    change(relay)
    was_skipped, result = skipped(relay)

    assert not was_skipped, result.stderr


def test_renewal_without_notification_is_acted_on_though_a_memo_exists(relay):
    settle(relay)
    calls = len(relay.calls())

    certs.renew(relay.config_dir, "herzbube.ch")
    result = relay.run()

    assert result.returncode == 0, result.stderr
    assert sorted(relay.calls()[calls:]) == ["reload apache2.service", "restart dovecot.service",
                                             "restart exim4.service"]


def test_memo_holds_until_the_first_expiry_threshold(relay):
    """72 of 90 days gone, less an hour: the warning (a fifth left) falls due in an hour."""
    settle(relay)
    info = certinfo.from_pem(certs.renew(relay.config_dir, "grunzwanzling.ch", age_days=72 - 1 / 24))
    # certbot renews it at 10 days left: not overdue before the warning
    certs.write_renewal_conf(relay.config_dir, "grunzwanzling.ch", extra="renew_before_expiry = 10 days\n")
    assert relay.run().returncode == 0
    with open(os.path.join(relay.state_dir, idle.MEMO), "rb") as file:
        until = marshal.load(file)["until"]

    assert until == pytest.approx(info.not_after - 0.2 * (info.not_after - info.not_before), abs=1e-3)


def test_memo_holds_until_a_renewal_becomes_overdue(relay):
    """certbot 5 renews a 90-day certificate at 60 days; 60 days and a day (the grace)
    less an hour gone: overdue in an hour, long before the expiry warning."""
    settle(relay)
    info = certinfo.from_pem(certs.renew(relay.config_dir, "grunzwanzling.ch", age_days=61 - 1 / 24))
    assert relay.run().returncode == 0
    with open(os.path.join(relay.state_dir, idle.MEMO), "rb") as file:
        until = marshal.load(file)["until"]

    assert until == pytest.approx(info.not_before + 60 * 86400 + 86400, abs=1e-3)  # day 60, and the day of grace


@pytest.mark.skipif(os.geteuid() != 0, reason="the rules file's owner and mode are checked as root only")
def test_rules_writable_by_others_are_refused_though_a_memo_exists(relay):
    settle(relay)
    os.chmod(relay.rules_path, 0o666)

    result = relay.run()

    assert result.returncode == 2
    assert "is writable by group or others" in result.stderr


def test_batch_that_leaves_something_to_do_removes_the_memo(relay):
    memo = settle(relay)
    relay.behave("fail", "exim4.service")
    certs.renew(relay.config_dir, "herzbube.ch")
    relay.publish("herzbube.ch", renew=False)

    assert relay.run().returncode == 1
    assert not os.path.exists(memo)
    was_skipped, result = skipped(relay)
    assert not was_skipped and result.returncode == 1, "the retry runs"


def test_no_memo_with_metrics(relay, tmp_path):
    relay.write_rules(open(relay.rules_path).read() + f'metrics = "{tmp_path}/certrelay.prom"\n')
    for name in WRITE_UP_CERTIFICATES:
        certs.renew(relay.config_dir, name)
        relay.publish(name, renew=False)

    assert relay.run().returncode == 0
    assert not os.path.exists(os.path.join(relay.state_dir, idle.MEMO))
    assert not skipped(relay)[0]


@pytest.mark.parametrize("flag", ["--force", "--dry-run"])
def test_force_and_dry_run_always_look(relay, flag):
    settle(relay)

    assert not skipped(relay, flag)[0]


def touch_rules(relay):
    os.utime(relay.rules_path, (1, 1))


def forget_state(relay):
    for name in ("status.json", "lineages.json", "ledger.json"):
        os.unlink(os.path.join(relay.state_dir, name))


def archive_more(relay):
    open(os.path.join(relay.config_dir, "archive", "herzbube.ch", "privkey9.pem"), "w").close()


HARMLESS = [None, touch_rules, forget_state, archive_more]


@pytest.mark.parametrize("change", HARMLESS, ids=["none", *[change.__name__ for change in HARMLESS[1:]]])
def test_when_the_memo_says_unchanged_a_full_batch_does_nothing(relay, change):
    """The memo's promise, checked in-process: where `unchanged` is True, the full
    batch calls no systemctl and leaves nothing to do."""
    settle(relay)
    if change:
        change(relay)
    calls = relay.calls()

    assert idle.unchanged(relay.config_dir, relay.rules_path, relay.state_dir)
    os.environ["PATH"], path = relay.bin + os.pathsep + os.environ["PATH"], os.environ["PATH"]
    try:
        rules = rules_module.load(relay.rules_path, config_dir=relay.config_dir)
        outcome = batch.process(relay.config_dir, rules, relay.state_dir)
    finally:
        os.environ["PATH"] = path
    assert relay.calls() == calls
    assert outcome.settled and outcome.summary() == "nothing pending"


def test_warning_due_is_the_first_crossing_of_a_selected_lineage():
    """Fractions 0.2 and 0.1 of a 100-day lifetime: the warning is crossed 20 days before
    the end. An unselected lineage that crosses earlier does not count."""
    day = 86400.0
    rules = rules_module.parse(b'[[rule]]\nmatch = ["a*"]\nreload = ["apache2"]\n')

    def lineage(name, not_after):
        return lineages.Lineage(name, "f", {"domains": [], "not_before": not_after - 100 * day,
                                            "not_after": not_after})

    scanned = [lineage("b", 30 * day), lineage("a2", 50 * day), lineage("a1", 40 * day),
               lineages.Lineage("a0", error="unreadable")]

    assert alarms.warning_due(scanned, rules, 1000 * day) == 20 * day
    assert alarms.warning_due(scanned, rules, 15 * day) == 15 * day


@pytest.mark.skipif(os.geteuid() != 0, reason="installs are checked as root only")
def test_no_memo_with_installs(relay, root):
    """What loading an install checks (that its owner and group exist) is the host's,
    not the rules file's bytes: every run loads the rules again."""
    relay.write_rules(
        '[settings]\nmin-interval = 0\n\n[[rule]]\nmatch = ["example.test"]\nreload = ["haproxy"]\n\n'
        f'  [[rule.install]]\n  dest = "{root}/{{name}}.pem"\n  content = ["fullchain", "privkey"]\n'
        '  group = "root"\n'
    )
    certs.renew(relay.config_dir, "example.test")
    relay.publish("example.test", renew=False)

    assert relay.run().returncode == 0
    assert not os.path.exists(os.path.join(relay.state_dir, idle.MEMO))
    assert not skipped(relay)[0]
