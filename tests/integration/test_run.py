"""`certrelay run` as a real process against a recording systemctl on PATH."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests import wait
from tests.conftest import HOOK
from tests.writeup import WRITE_UP_CERTIFICATES

WRITE_UP_ACTIONS = ["reload apache2.service", "restart dovecot.service", "restart exim4.service"]


def publish_write_up(relay):
    for name in WRITE_UP_CERTIFICATES:
        relay.publish(name)


def test_run_with_write_up_certificates_gives_exactly_three_actions(relay):
    publish_write_up(relay)

    result = relay.run()

    assert result.returncode == 0, result.stderr
    assert sorted(relay.calls()) == WRITE_UP_ACTIONS
    assert relay.entries("queue") == [] and relay.entries("claimed") == []
    assert "restart dovecot.service (herzbube.ch)" in result.stderr
    assert "reload apache2.service (francescamoser.ch, francescamoser.ch-0001, " in result.stderr


def test_run_with_empty_queue_does_nothing_and_succeeds(relay):
    result = relay.run()

    assert result.returncode == 0
    assert relay.calls() == []


def test_run_with_failed_restart_keeps_notification_and_next_run_retries_only_that_unit(relay):
    publish_write_up(relay)
    relay.behave("fail", "exim4.service")

    first = relay.run()

    assert first.returncode == 1
    assert sorted(relay.calls()) == WRITE_UP_ACTIONS
    assert "failed: restart exim4.service (herzbube.ch): exit status 1: Job for exim4.service failed" in first.stderr
    assert [entry.partition("@")[0] for entry in relay.entries("claimed")] == ["herzbube.ch"]
    assert relay.entries("queue") == []

    second = relay.run()

    assert second.returncode == 1
    assert relay.calls()[3:] == ["restart exim4.service"]

    os.unlink(os.path.join(relay.bin, "fail", "exim4.service"))
    third = relay.run()

    assert third.returncode == 0, third.stderr
    assert relay.calls()[4:] == ["restart exim4.service"]
    assert relay.entries("claimed") == []
    assert not os.path.exists(os.path.join(relay.state_dir, "progress.json")) or open(
        os.path.join(relay.state_dir, "progress.json")
    ).read().strip() == "{}"


def test_run_quiet_prints_nothing_on_success_and_only_errors_on_failure(relay):
    publish_write_up(relay)
    assert relay.run("--quiet").stderr == ""

    publish_write_up(relay)
    relay.behave("fail", "dovecot.service")
    result = relay.run("--quiet")

    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines and all(line.startswith("error: ") for line in lines)
    assert any("dovecot.service (herzbube.ch)" in line for line in lines)


def test_run_dry_run_prints_plan_and_changes_nothing(relay):
    publish_write_up(relay)
    queue_before = relay.entries("queue")

    result = relay.run("--dry-run")

    assert result.returncode == 0
    assert "would restart dovecot.service (herzbube.ch)" in result.stderr
    assert "would restart exim4.service (herzbube.ch)" in result.stderr
    assert relay.calls() == []
    assert relay.entries("queue") == queue_before
    assert not os.path.exists(relay.state_dir)


def test_run_with_invalid_rules_exits_2_and_leaves_queue_alone(relay):
    publish_write_up(relay)
    relay.write_rules('[[rule]]\nmatch = ["*"]\nrestart = ["apache*"]\n')

    result = relay.run()

    assert result.returncode == 2
    assert f"{relay.rules_path}:3: unit name 'apache*' has a glob character" in result.stderr
    assert relay.entries("queue") == sorted(WRITE_UP_CERTIFICATES)
    assert relay.calls() == []


def test_run_refuses_rules_file_inside_certbot_config_dir(relay):
    inside = os.path.join(relay.config_dir, "rules.toml")
    os.rename(relay.rules_path, inside)
    relay.rules_path = inside

    result = relay.run()

    assert result.returncode == 2
    assert "inside the certbot config dir" in result.stderr


def test_run_with_rules_writable_by_others_is_refused_as_root(relay):
    if os.geteuid() != 0:
        pytest.skip("the permission check applies only when running as root")
    os.chmod(relay.rules_path, 0o666)

    result = relay.run()

    assert result.returncode == 2
    assert "chmod go-w" in result.stderr


def test_run_does_not_pass_notify_socket_to_systemctl(relay):
    publish_write_up(relay)

    result = relay.run(NOTIFY_SOCKET="/run/systemd/notify", WATCHDOG_USEC="1000000", WATCHDOG_PID="1")

    assert result.returncode == 0 and len(relay.calls()) == 3
    assert not [call for call in relay.calls() if "leaked" in call]


def test_run_with_unmatched_certificate_warns_and_drops_it(relay):
    relay.write_rules('[[rule]]\nmatch = ["herzbube.ch"]\nrestart = ["dovecot"]\n')
    relay.publish("other.ch")

    result = relay.run()

    assert result.returncode == 0
    assert "warning: dropped the notification for other.ch: no rule matches it" in result.stderr
    assert relay.calls() == [] and relay.entries("claimed") == []


def test_run_with_hanging_systemctl_times_out_and_still_does_other_units(relay):
    relay.write_rules(
        '[settings]\ntimeout = 1\n\n[[rule]]\nmatch = ["herzbube.ch"]\nrestart = ["dovecot", "exim4"]\n'
    )
    relay.publish("herzbube.ch")
    relay.behave("hang", "dovecot.service")

    result = relay.run()

    assert result.returncode == 1
    assert "restart dovecot.service (herzbube.ch): timed out after 1 s" in result.stderr
    assert relay.calls() == ["restart dovecot.service", "restart exim4.service"]
    assert len(relay.entries("claimed")) == 1


def test_run_without_systemctl_says_so_and_keeps_notification(relay):
    os.unlink(os.path.join(relay.bin, "systemctl"))
    relay.publish("herzbube.ch")

    result = relay.run(PATH=relay.bin + ":/nonexistent")

    assert result.returncode == 1
    assert "systemctl not found on PATH" in result.stderr
    assert len(relay.entries("claimed")) == 1


def test_run_command_gets_placeholders_as_single_arguments_without_shell(relay):
    program, record = relay.argv_recorder()
    relay.write_rules(f'[[rule]]\nmatch = ["*"]\nrun = [["{program}", "{{name}}", "{{domains}}", "{{lineage}}"]]\n')
    relay.publish("herzbube.ch", "herzbube.ch *.herzbube.ch")

    result = relay.run()

    assert result.returncode == 0, result.stderr
    assert open(record).read().splitlines() == [
        "herzbube.ch", "herzbube.ch *.herzbube.ch", os.path.join(relay.config_dir, "live", "herzbube.ch"),
    ]


def waits_for_flock(pid, path):
    """Whether process `pid` is blocked in flock(2) on the file `path` (/proc/locks shows
    a waiter as "->")."""
    inode = os.stat(path).st_ino
    with open("/proc/locks", encoding="ascii") as file:
        for fields in (line.split() for line in file):
            if fields[1:3] == ["->", "FLOCK"] and fields[5] == str(pid) and fields[6].endswith(f":{inode}"):
                return True
    return False


def test_second_run_waits_for_the_first_then_processes_what_is_left(relay):
    relay.publish("herzbube.ch")
    relay.behave("block", "dovecot.service")
    first = relay.start()
    relay.wait_for_calls(1)
    relay.publish("moser-naef.ch")
    second = relay.start()

    def second_waits():
        assert second.poll() is None, f"the second run must wait for the lock: {second.communicate()[0]}"
        return waits_for_flock(second.pid, os.path.join(relay.state_dir, "lock"))

    wait.until(second_waits, what="the second run to block on the state lock")
    open(os.path.join(relay.bin, "release"), "w").close()
    assert first.wait(30) == 0 and second.wait(30) == 0
    assert "another certrelay run holds" in second.communicate()[0]
    assert relay.calls() == [
        "restart dovecot.service", "restart exim4.service", "reload apache2.service", "reload apache2.service",
    ]
    assert relay.entries("queue") == [] and relay.entries("claimed") == []


def test_notification_arriving_mid_run_is_left_for_the_next_run(relay):
    relay.publish("herzbube.ch")
    relay.behave("block", "dovecot.service")
    run = relay.start()
    relay.wait_for_calls(1)
    relay.publish("moser-naef.ch")
    relay.publish("herzbube.ch")
    open(os.path.join(relay.bin, "release"), "w").close()

    assert run.wait(30) == 0
    assert relay.entries("queue") == ["herzbube.ch", "moser-naef.ch"]
    assert relay.run().returncode == 0
    assert relay.entries("queue") == [] and relay.entries("claimed") == []
    assert relay.calls()[3:] == ["restart dovecot.service", "restart exim4.service", "reload apache2.service"]


@pytest.mark.parametrize(
    "killed_at", ["dovecot.service", "exim4.service", "apache2.service"],
    ids=["after-claim-in-first-action", "between-actions", "after-last-action-before-cleanup"],
)
def test_run_killed_at_any_step_loses_nothing_on_rerun(relay, killed_at):
    publish_write_up(relay)
    relay.behave("kill", killed_at)

    killed = relay.run()
    calls_before_rerun = len(relay.calls())

    assert killed.returncode == -signal.SIGKILL
    os.unlink(os.path.join(relay.bin, "kill", killed_at))
    rerun = relay.run()

    assert rerun.returncode == 0, rerun.stderr
    assert relay.calls()[calls_before_rerun - 1].endswith(killed_at)
    assert sorted(relay.calls()[calls_before_rerun:]) == WRITE_UP_ACTIONS
    assert relay.entries("queue") == [] and relay.entries("claimed") == []


def test_run_recovers_a_crashed_claim_half_done(relay):
    publish_write_up(relay)
    os.makedirs(os.path.join(relay.spool, "claimed"))
    for name in WRITE_UP_CERTIFICATES[:2]:
        os.rename(os.path.join(relay.spool, "queue", name), os.path.join(relay.spool, "claimed", f"{name}@1"))

    result = relay.run()

    assert result.returncode == 0, result.stderr
    assert sorted(relay.calls()) == WRITE_UP_ACTIONS
    assert relay.entries("claimed") == [] and relay.entries("queue") == []


def make_hostile_entries(queue):
    """Create one of each hostile kind of entry in `queue`; return how many."""
    os.symlink("/etc/shadow", os.path.join(queue, "shadow-link"))
    os.symlink(os.path.join(queue, "nowhere"), os.path.join(queue, "dangling"))
    os.mkfifo(os.path.join(queue, "fifo"))
    os.mkdir(os.path.join(queue, "directory"))
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(os.path.join(queue, "socket"))
    with open(os.path.join(queue, "huge"), "wb") as file:
        file.write(b"version=1\n" + b"x" * (65 * 1024))
    with open(os.path.join(queue, "binary"), "wb") as file:
        file.write(bytes(range(256)))
    for raw_name in (b"not-utf8-\xff", b"new\nline", b"$(reboot);`id`", b"x" * 254 + b"!", b".hidden"):
        with open(os.path.join(os.fsencode(queue), raw_name), "wb") as file:
            file.write(b"version=1\nname=x\nlineage=/x\ndomains=x\ntime=2026-01-01T00:00:00Z\n")
    with open(os.path.join(queue, "forged"), "w") as file:
        file.write("version=1\nname=herzbube.ch\nlineage=/x\ndomains=x\ntime=2026-01-01T00:00:00Z\n")
    return 13


def test_hostile_queue_entries_are_quarantined_and_valid_ones_still_processed(relay):
    publish_write_up(relay)
    count = make_hostile_entries(os.path.join(relay.spool, "queue"))

    result = relay.run()

    assert result.returncode == 1
    assert sorted(relay.calls()) == WRITE_UP_ACTIONS
    assert relay.entries("queue") == [] and relay.entries("claimed") == []
    assert len(relay.entries("quarantine")) == count
    assert result.stderr.count("error: quarantined spool entry") == count
    assert "'shadow-link': not a regular file (symbolic link)" in result.stderr
    assert "'fifo': not a regular file (FIFO)" in result.stderr
    assert "'forged': name 'herzbube.ch' does not match the file name" in result.stderr
    quarantined_link = [e for e in relay.entries("quarantine") if e.startswith("shadow-link@")][0]
    assert os.readlink(os.path.join(relay.spool, "quarantine", quarantined_link)) == "/etc/shadow"
    assert os.path.exists("/etc/shadow")


def test_run_empty_queue_on_error_moves_queue_aside_then_processes_it_once_rules_are_fixed(relay):
    publish_write_up(relay)
    good_rules = open(relay.rules_path).read()
    relay.write_rules("[[rule]]\nmatch = 1\n")

    broken = relay.run("--empty-queue-on-error")

    assert broken.returncode == 2
    assert relay.entries("queue") == []
    assert len(relay.entries("claimed")) == len(WRITE_UP_CERTIFICATES)
    assert relay.calls() == []
    relay.write_rules(good_rules)
    assert relay.run().returncode == 0
    assert sorted(relay.calls()) == WRITE_UP_ACTIONS and relay.entries("claimed") == []


def test_check_reports_missing_hook_and_exits_2_then_0_once_installed(relay):
    missing = relay.run(command="check")

    assert missing.returncode == 2
    assert "the deploy hook is not installed" in missing.stderr
    for kind, name in (("deploy", "certrelay-hook"), ("post", "certrelay-post-hook")):
        hook_dir = os.path.join(relay.config_dir, "renewal-hooks", kind)
        os.makedirs(hook_dir)
        shutil.copy(os.path.join(os.path.dirname(HOOK), name), os.path.join(hook_dir, name))
    assert relay.run(command="check").returncode == 0


def test_check_rules_only_reports_rule_problems_with_lines(relay):
    relay.write_rules('[[rule]]\nmatch = ["*"]\nrestart = ["-x"]\nfrobnicate = 1\n')

    result = relay.run("--rules-only", command="check")

    assert result.returncode == 2
    assert f"{relay.rules_path}:3: unit name '-x'" in result.stderr
    assert f"{relay.rules_path}:4: unknown key 'frobnicate'" in result.stderr


def test_explain_shows_matching_rules_and_planned_actions(relay):
    result = relay.run("herzbube.ch", command="explain")

    assert result.returncode == 0
    assert f"{relay.rules_path}:1: rule selects it" in result.stdout
    assert f"{relay.rules_path}:5: rule selects it" in result.stdout
    assert "would restart exim4.service (herzbube.ch)" in result.stdout


def test_run_acts_only_on_a_changed_certificate_unless_forced(relay):
    relay.publish("moser-naef.ch")
    assert relay.run().returncode == 0
    relay.publish("moser-naef.ch", renew=False)  # a replay, or --dry-run --run-deploy-hooks

    replay = relay.run()

    assert replay.returncode == 0
    assert "skipped moser-naef.ch: its certificate did not change" in replay.stderr
    assert relay.calls() == ["reload apache2.service"]
    relay.publish("moser-naef.ch", renew=False)
    assert relay.run("--force").returncode == 0
    assert relay.calls() == ["reload apache2.service"] * 2
    relay.publish("moser-naef.ch")
    assert relay.run().returncode == 0
    assert relay.calls() == ["reload apache2.service"] * 3


def test_run_with_state_dir_deleted_rebuilds_it_and_acts(relay):
    relay.publish("moser-naef.ch")
    assert relay.run().returncode == 0
    shutil.rmtree(relay.state_dir)
    relay.publish("moser-naef.ch", renew=False)

    assert relay.run().returncode == 0
    assert relay.calls() == ["reload apache2.service"] * 2
    assert os.path.exists(os.path.join(relay.state_dir, "ledger.json"))


@pytest.mark.parametrize(
    "plant",
    [
        pytest.param(lambda live: os.symlink("/etc/passwd", live / "cert.pem"), id="absolute-link-out"),
        pytest.param(lambda live: os.symlink("../../../../../../../etc/passwd", live / "cert.pem"), id="relative-link-out"),
        pytest.param(lambda live: os.mkfifo(live / "cert.pem"), id="fifo"),
        pytest.param(lambda live: None, id="missing"),
        pytest.param(lambda live: (live / "cert.pem").write_bytes(b"x" * 70000), id="huge"),
    ],
)
def test_run_refuses_a_live_certificate_it_cannot_read_safely(relay, plant):
    import pathlib

    live = pathlib.Path(relay.config_dir, "live", "forged.ch")
    live.mkdir(parents=True)
    plant(live)
    relay.publish("forged.ch", renew=False)

    result = relay.run()

    assert result.returncode == 1
    assert "dropped the notification for forged.ch: its live certificate cannot be read" in result.stderr
    assert relay.calls() == []
    assert relay.entries("claimed") == [] and relay.entries("queue") == []


#: `python3 -c FAKE_CLOCK ARGS` is `certrelay ARGS` with a clock that time.sleep() moves
#: forward at once instead of waiting: a min-interval of an hour costs no time.
FAKE_CLOCK = """\
import runpy, sys, time
real_time, slept = time.time, [0.0]
time.time = lambda: real_time() + slept[0]
time.sleep = lambda seconds: slept.__setitem__(0, slept[0] + seconds)
sys.argv[0] = "certrelay"
runpy.run_module("certrelay", run_name="__main__", alter_sys=True)
"""


def test_run_with_min_interval_waits_and_coalesces_a_flood_into_one_more_action(relay):
    # An hour: the second run comes well within it, however slow the machine.
    relay.write_rules('[settings]\nmin-interval = 3600\n\n[[rule]]\nmatch = ["*"]\nreload = ["apache2"]\n')
    units = os.path.join(relay.state_dir, "units.json")
    relay.publish("a.ch")
    assert relay.run().returncode == 0
    with open(units, encoding="utf-8") as file:
        first = json.load(file)["apache2.service"]
    for name in ("b.ch", "c.ch", "d.ch"):
        relay.publish(name)

    result = subprocess.run([sys.executable, "-c", FAKE_CLOCK, *relay.command()[3:]], env=relay.environment(),
                            capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    before, waiting, after = result.stderr.partition("waiting ")
    assert "deferred reload apache2.service (b.ch, c.ch, d.ch)" in before
    assert "done: reload" not in before
    assert 0 < int(after.split()[0]) <= 3600, waiting + after  # what is left of the interval
    assert "reload apache2.service (b.ch, c.ch, d.ch)" in after
    assert relay.calls() == ["reload apache2.service"] * 2
    assert relay.entries("claimed") == [] and relay.entries("queue") == []
    with open(units, encoding="utf-8") as file:
        assert json.load(file)["apache2.service"] >= first + 3600  # on the run's clock, not the test's


def test_run_removes_day_old_temporary_files_of_killed_hooks_and_nothing_else(relay, tmp_path):
    relay.publish("herzbube.ch")
    tmp = os.path.join(relay.spool, "tmp")
    outside = tmp_path / "outside"
    outside.write_text("host file\n")
    day_ago = time.time() - 86400 - 60
    for name in ("herzbube.ch.4242", "old-link"):
        path = os.path.join(tmp, name)
        if name == "old-link":
            os.symlink(outside, path)
        else:
            with open(path, "w") as file:
                file.write("version=1\nname=herzbube.ch\n")
        os.utime(path, (day_ago, day_ago), follow_symlinks=False)
    with open(os.path.join(tmp, "moser-naef.ch.4343"), "w") as file:
        file.write("being written right now\n")
    os.makedirs(os.path.join(tmp, "old-directory"))
    os.utime(os.path.join(tmp, "old-directory"), (day_ago, day_ago))

    result = relay.run("--verbose")

    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp)) == ["moser-naef.ch.4343", "old-directory"]
    assert outside.read_text() == "host file\n"
    assert f"removed {relay.spool}/tmp/herzbube.ch.4242, left by a hook killed over a day ago" in result.stderr


def test_a_notification_for_a_lineage_this_host_lacks_is_said_by_run_and_by_status_until_it_is_acted_on(relay):
    import json

    relay.publish("ghost.ch", renew=False)  # the container's volume is not this host's config dir, or a typo

    result = relay.run()
    text = relay.run(command="status")
    document = json.loads(relay.run("--json", command="status").stdout)
    relay.publish("ghost.ch")  # the lineage appears and is acted on
    acted = relay.run()
    after = relay.run(command="status")

    said = (f"there is no lineage ghost.ch under live/: the container wrote a notification for a certificate this"
            f" host does not have (is the container's /etc/letsencrypt {relay.config_dir}?)")
    assert result.returncode == 1 and f"error: dropped the notification for ghost.ch: {said}" in result.stderr
    assert text.returncode == 1 and f"ghost.ch: a notification was dropped at " in text.stdout and said in text.stdout
    assert [(dropped["name"], dropped["reason"]) for dropped in document["dropped"]] == [("ghost.ch", said)]
    assert acted.returncode == 0, acted.stderr
    assert after.returncode == 0 and "dropped" not in after.stdout, after.stdout


def test_check_warns_of_a_pending_notification_for_a_lineage_this_host_lacks(relay):
    relay.publish("ghost.ch", renew=False)

    result = relay.run(command="check")

    assert f"warning: {relay.spool}/queue/ghost.ch: a notification for ghost.ch, but there is no lineage ghost.ch" \
        f" under live/: is the container's /etc/letsencrypt {relay.config_dir}?" in result.stderr
