"""Pins for certrelay.execute that mutation testing (make mutants, docs/mutants.md)
found missing, in-process with small real commands: each way a command ends and the
Result it gives, the process group a timeout kills, what a child inherits, and the
log lines of apply()."""

import contextlib
import logging
import os
import signal

import pytest

from certrelay import execute, plan
from tests import wait


def test_a_command_that_succeeds_gives_its_output_stripped():
    assert execute.run_command(["/bin/sh", "-c", "echo '  out  '; echo err >&2"], 10) == execute.Result(
        True, "", "out  \nerr")


def test_a_command_that_fails_gives_its_status_and_the_end_of_its_output():
    long = "x" * 500 + "END"

    assert execute.run_command(["/bin/sh", "-c", "echo no; exit 3"], 10) == execute.Result(False, "exit status 3: no", "no")
    assert execute.run_command(["/bin/sh", "-c", "exit 1"], 10) == execute.Result(False, "exit status 1", "")
    assert execute.run_command(["/bin/sh", "-c", f"echo {long}; exit 2"], 10) == execute.Result(
        False, "exit status 2: " + long[-execute.OUTPUT_LIMIT:], long)


def test_a_command_killed_by_a_signal_says_which():
    assert execute.run_command(["/bin/sh", "-c", "kill -TERM $$"], 10) == execute.Result(False, "killed by signal 15", "")


def test_a_missing_program_is_a_result_not_an_exception():
    assert execute.run_command(["/nonexistent/certrelay-test"], 10) == execute.Result(
        False, "cannot run /nonexistent/certrelay-test: No such file or directory")


def test_output_that_is_not_utf8_is_replaced_and_stdin_is_empty():
    assert execute.run_command(["/bin/sh", "-c", "printf 'a\\377b'; cat"], 10) == execute.Result(True, "", "a\ufffdb")


def test_a_command_runs_in_its_own_session():
    result = execute.run_command(["/usr/bin/python3", "-c", "import os; print(os.getsid(0) == os.getpid())"], 10)

    assert result == execute.Result(True, "", "True")


def test_a_timeout_kills_the_command_and_its_children(tmp_path):
    pidfile = tmp_path / "pid"

    result = execute.run_command(["/bin/sh", "-c", f"sleep 3600 & echo $! > {pidfile}; wait"], 0.5)

    child = int(pidfile.read_text())
    try:
        assert result == execute.Result(False, "timed out after 0.5 s and was killed")  # not after the hour
        wait.gone(child, what="the command's child, after the timeout")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)  # ended by its PID, should the test have failed


@pytest.mark.parametrize("variable", execute.PRIVATE_ENVIRONMENT)
def test_a_child_never_inherits_what_belongs_to_certrelays_service(monkeypatch, variable):
    for other in execute.PRIVATE_ENVIRONMENT:
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv("CERTRELAY_PIN", "kept")
    assert execute.child_environment() is None

    monkeypatch.setenv(variable, "x")
    environment = execute.child_environment()
    shown = execute.run_command(["/bin/sh", "-c", f'echo "${{{variable}-unset}} $CERTRELAY_PIN"'], 10)

    assert variable not in environment and environment["CERTRELAY_PIN"] == "kept"
    assert shown.output == "unset kept"


def fake_systemctl(tmp_path, monkeypatch, status=0):
    bin_directory = tmp_path / "bin"
    bin_directory.mkdir()
    program = bin_directory / "systemctl"
    program.write_text(f'#!/bin/sh\necho "$*" >> {tmp_path}/calls\necho "said $*"\nexit {status}\n')
    program.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_directory))
    return tmp_path / "calls"


def test_systemctl_is_the_one_on_path(tmp_path, monkeypatch):
    calls = fake_systemctl(tmp_path, monkeypatch)

    assert execute.systemctl("reload", "apache2.service", 10) == execute.Result(True, "", "said reload apache2.service")
    assert calls.read_text() == "reload apache2.service\n"
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert execute.systemctl("reload", "apache2.service", 10) == execute.Result(
        False, "systemctl not found on PATH; is this a systemd host?")


def test_perform_runs_commands_and_asks_systemctl_for_units(tmp_path, monkeypatch):
    calls = fake_systemctl(tmp_path, monkeypatch)

    assert execute.perform(plan.Action("run", ("/bin/echo", "a"), ("a.ch",)), 10).output == "a"
    assert execute.perform(plan.Action("precheck", ("/bin/echo", "b"), ("a.ch",)), 10).output == "b"
    assert execute.perform(plan.Action("restart", "exim4.service", ("a.ch",)), 10).ok
    assert calls.read_text() == "restart exim4.service\n"


def test_apply_does_each_action_once_and_skips_what_a_failure_guards(caplog):
    precheck = plan.Action("precheck", ("/bin/false",), ("a.ch",))
    other = plan.Action("run", ("/bin/echo", "x"), ("a.ch",))
    guarded = plan.Action("reload", "haproxy.service", ("a.ch",), frozenset({precheck.key, other.key, "unit:gone"}))
    done = []

    def perform(action):
        done.append(action.key)
        if action is precheck:
            return execute.Result(False, "exit status 1")
        return execute.Result(True, "said so" if action is other else "")

    caplog.set_level(logging.INFO, logger="certrelay.execute")

    results = execute.apply([precheck, other, guarded], perform)

    assert done == [precheck.key, other.key]
    assert results == {
        precheck.key: execute.Result(False, "exit status 1"), other.key: execute.Result(True, "said so"),
        guarded.key: execute.Result(False, f"not done, because this failed first: {precheck.key}"),
    }
    assert [(record.levelname, record.getMessage()) for record in caplog.records] == [
        ("ERROR", "failed: precheck /bin/false (a.ch): exit status 1"),
        ("INFO", "done: run /bin/echo x (a.ch): said so"),
        ("ERROR", f"failed: reload haproxy.service (a.ch): not done, because this failed first: {precheck.key}"),
    ]


def test_apply_names_every_failure_that_held_an_action_back():
    first, second = (plan.Action("precheck", (f"/bin/{name}",), ("a.ch",)) for name in ("b", "a"))
    guarded = plan.Action("reload", "haproxy.service", ("a.ch",), frozenset({first.key, second.key}))

    results = execute.apply([first, second, guarded], lambda action: execute.Result(False, "no"))

    assert results[guarded.key].detail == f"not done, because this failed first: {second.key}, {first.key}"


def test_a_dry_run_applies_nothing_and_says_what_it_would(caplog):
    caplog.set_level(logging.INFO, logger="certrelay.execute")

    assert execute.apply([plan.Action("restart", "exim4.service", ("a.ch",))], pytest.fail, dry_run=True) == {}
    assert [record.getMessage() for record in caplog.records] == ["would restart exim4.service (a.ch)"]


def test_a_command_never_reads_certrelays_own_stdin():
    reading, writing = os.pipe()
    os.write(writing, b"typed at the terminal")
    os.close(writing)
    saved = os.dup(0)
    os.dup2(reading, 0)
    try:
        result = execute.run_command(["/bin/cat"], 10)
    finally:
        os.dup2(saved, 0)
        os.close(saved)
        os.close(reading)

    assert result == execute.Result(True, "", "")


def test_each_command_is_logged_at_debug_before_it_runs(caplog):
    caplog.set_level(logging.DEBUG, logger="certrelay.execute")

    execute.run_command(["/bin/true", "two words"], 10)

    assert [record.getMessage() for record in caplog.records] == ["running /bin/true two words"]


def test_an_action_done_without_detail_is_logged_as_just_done(caplog):
    action = plan.Action("reload", "apache2.service", ("a.ch",))
    caplog.set_level(logging.INFO, logger="certrelay.execute")

    execute.apply([action], lambda action: execute.Result(True))

    assert [record.getMessage() for record in caplog.records] == ["done: reload apache2.service (a.ch)"]
