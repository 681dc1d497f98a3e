"""The one place that runs commands: every systemctl call, `run` command and alert
(sendmail, `command`).

Each command runs with a timeout, without a shell, with stdin from /dev/null (an
alert's from its message), in its own session (so a timeout kills its children too),
and without NOTIFY_SOCKET: a child must not speak to systemd in the daemon's name.
"""

import dataclasses
import logging
import os
import shutil
import signal
import subprocess

logger = logging.getLogger(__name__)

#: Environment variables that belong to certrelay's own service, not to its children.
PRIVATE_ENVIRONMENT = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
OUTPUT_LIMIT = 400  # characters of a failed command's output repeated in the log


@dataclasses.dataclass(frozen=True)
class Result:
    """How a command ended: `ok`, and for a failure `detail` saying why."""

    ok: bool
    detail: str = ""
    output: str = ""


def run_command(argv, timeout, stdin=None, extra_environment=None):
    """Run `argv` (a sequence of strings) and wait at most `timeout` seconds; give it
    the bytes `stdin` (else /dev/null) and `extra_environment` (a dict) besides ours.

    Return a `Result`; never raise for a command that is missing, fails or hangs.
    """
    logger.debug("running %s", " ".join(argv))
    environment = child_environment()
    if extra_environment:
        environment = {**(os.environ if environment is None else environment), **extra_environment}
    try:
        process = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, env=environment, start_new_session=True,
        )
    except OSError as error:
        return Result(False, f"cannot run {argv[0]}: {error.strerror}")
    try:
        output, _ = process.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return Result(False, f"timed out after {timeout:g} s and was killed")
    text = output.decode("utf-8", "replace").strip()
    if process.returncode != 0:
        if process.returncode < 0:
            status = f"killed by signal {-process.returncode}"
        else:
            status = f"exit status {process.returncode}"
        return Result(False, status + (": " + text[-OUTPUT_LIMIT:] if text else ""), text)
    return Result(True, output=text)


def child_environment():
    """Return the environment for a child: None (ours, inherited) unless ours holds one
    of PRIVATE_ENVIRONMENT, then a copy without it. The daemon removes them from its
    own at start: copying os.environ costs more than the rest of a spawn's preparation."""
    if not any(key in os.environ for key in PRIVATE_ENVIRONMENT):
        return None
    return {key: value for key, value in os.environ.items() if key not in PRIVATE_ENVIRONMENT}


def systemctl(verb, unit, timeout):
    """Run `systemctl VERB UNIT` with the systemctl found on PATH; return a `Result`."""
    program = shutil.which("systemctl")
    if program is None:
        return Result(False, "systemctl not found on PATH; is this a systemd host?")
    return run_command([program, verb, unit], timeout)


def perform(action, timeout):
    """Carry out one planned run, precheck or unit action; return its `Result`."""
    if action.verb in ("run", "precheck"):
        return run_command(action.target, timeout)
    return systemctl(action.verb, action.target, timeout)


def apply(actions, perform, dry_run=False):
    """Carry out `actions` in order, each with `perform(action)` -> Result, logging one
    line per action and outcome. An action whose required actions failed is not
    done, and counts as failed.

    Return {action key: Result}. With `dry_run`, log what would be done and run nothing.
    """
    results = {}
    for action in actions:
        if dry_run:
            logger.info("would %s", action.describe())
            continue
        failed = sorted(key for key in action.requires if key in results and not results[key].ok)
        if failed:
            result = Result(False, "not done, because this failed first: " + ", ".join(failed))
        else:
            result = perform(action)
        if result.ok:
            logger.info("done: %s%s", action.describe(), f": {result.detail}" if result.detail else "")
        else:
            logger.error("failed: %s: %s", action.describe(), result.detail)
        results[action.key] = result
    return results
