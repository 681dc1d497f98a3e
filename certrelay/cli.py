"""The `certrelay` command: thin click wrappers over rules, batch and watch.

Exit status: 0 all done (or nothing pending), 1 something left undone (a failed
action, a quarantined entry), 2 usage or configuration error (nothing processed).
"""

import functools
import logging
import os
import shutil
import sys
import time

import click

from certrelay import __version__, batch, execute, state
from certrelay import plan as plan_module, rules as rules_module, spool as spool_module

EXIT_OK, EXIT_INCOMPLETE, EXIT_CONFIG = 0, 1, 2
HOOK_NAME = "certrelay-hook"
logger = logging.getLogger("certrelay")


class LevelPrefixFormatter(logging.Formatter):
    """Plain lines; errors and warnings say so, so that a cron mail reads well."""

    def format(self, record):
        message = super().format(record)
        if record.levelno >= logging.ERROR:
            return "error: " + message
        if record.levelno >= logging.WARNING:
            return "warning: " + message
        return message


def setup_logging(quiet, verbose):
    """Send certrelay's log to stderr: errors only with `quiet`, debug with `verbose`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LevelPrefixFormatter("%(message)s"))
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.ERROR if quiet else logging.DEBUG if verbose else logging.INFO)


def common_options(function):
    """Add the options every command shares; each also reads an environment variable."""
    options = [
        click.option(
            "--config-dir", envvar="CERTRELAY_CONFIG_DIR", default="/etc/letsencrypt", show_default=True,
            show_envvar=True, type=click.Path(file_okay=False), help="certbot's config dir (holds the spool).",
        ),
        click.option(
            "--rules", "rules_path", envvar="CERTRELAY_RULES", default="/etc/certrelay/rules.toml",
            show_default=True, show_envvar=True, type=click.Path(dir_okay=False), help="The rules file.",
        ),
        click.option(
            "--state-dir", envvar="CERTRELAY_STATE_DIR", default="/var/lib/certrelay", show_default=True,
            show_envvar=True, type=click.Path(file_okay=False), help="Lock and retry state.",
        ),
        click.option("--quiet", "-q", is_flag=True, envvar="CERTRELAY_QUIET", help="Print errors only."),
        click.option("--verbose", "-v", is_flag=True, envvar="CERTRELAY_VERBOSE", help="Print debug detail."),
    ]

    @functools.wraps(function)
    def wrapper(quiet, verbose, **options):
        setup_logging(quiet, verbose)
        return function(**options)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def load_rules(rules_path, config_dir, on_error=None):
    """Return the validated rules, or exit 2 printing every problem and how to fix it.

    Call `on_error()` before exiting, if given.
    """
    try:
        return rules_module.load(rules_path, config_dir=config_dir)
    except rules_module.RulesError as error:
        problems = error.problems
    for problem in problems:
        logger.error("%s", problem)
    logger.error("nothing was processed; fix the rules file, then check it: certrelay check")
    if on_error:
        on_error()
    sys.exit(EXIT_CONFIG)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="certrelay")
def main():
    """Restart or reload host systemd units when certbot (in a container) renews."""


@main.command()
@common_options
@click.option("--dry-run", "-n", is_flag=True, envvar="CERTRELAY_DRY_RUN", help="Print the plan; change nothing.")
@click.option(
    "--empty-queue-on-error", is_flag=True,
    help="On a configuration error, still move the queue into claimed/ (kept for the next run), so that"
    " a DirectoryNotEmpty= path unit does not fire again and again.",
)
@click.option("--force", is_flag=True, help="Act even on certificates that did not change since the last action.")
def run(config_dir, rules_path, state_dir, dry_run, empty_queue_on_error, force):
    """Process every pending notification once (for cron and the path unit)."""

    def keep_for_later():
        try:
            with state.locked(state_dir), spool_module.Spool(config_dir).opened(create=True) as spool:
                notifications, problems = spool.claim()
        except OSError as error:
            logger.error("cannot move the queue aside: %s: %s", error.filename, error.strerror)
            return
        for problem in problems:
            logger.error("%s", problem)
        logger.error("%d notification(s) kept in claimed/ until the rules are fixed", len(notifications))

    rules = load_rules(rules_path, config_dir, keep_for_later if empty_queue_on_error and not dry_run else None)
    ok = True
    try:
        while True:
            outcome = batch.process(config_dir, rules, state_dir, dry_run=dry_run, force=force)
            ok = ok and outcome.ok
            logger.log(logging.INFO if outcome.ok else logging.ERROR, "%s", outcome.summary())
            if dry_run or outcome.deferred_until is None:
                break
            # Units held back by min-interval: wait, then act on what is left (and on
            # whatever arrived meanwhile) in one more batch.
            wait = max(0.0, outcome.deferred_until - time.time())
            logger.info("waiting %.0f s for the min-interval of the deferred units", wait)
            time.sleep(wait)
    except OSError as error:
        logger.error("cannot use %s: %s", error.filename or "the spool or state dir", error.strerror)
        sys.exit(EXIT_CONFIG)
    sys.exit(EXIT_OK if ok else EXIT_INCOMPLETE)


@main.command()
@common_options
@click.option("--rules-only", is_flag=True, help="Check only the rules file (for ExecStartPre= and ExecReload=).")
def check(config_dir, rules_path, state_dir, rules_only):
    """Validate the rules file and the setup; exit 0 if usable, 2 if not."""
    rules = load_rules(rules_path, config_dir)
    if rules_only:
        logger.info("%s: ok, %d rule(s)", rules_path, len(rules.rules))
        return
    problems = []
    hook = os.path.join(config_dir, "renewal-hooks", "deploy", HOOK_NAME)
    if not os.path.isdir(config_dir):
        problems.append(f"{config_dir}: no such directory; pass certbot's config dir with --config-dir")
    elif not os.access(hook, os.X_OK) or not os.path.isfile(hook):
        problems.append(
            f"{hook}: the deploy hook is not installed (or not executable);"
            f" install it: make install-hook CONFIG_DIR={config_dir}"
        )
    spool = spool_module.Spool(config_dir)
    if not os.path.isdir(spool.queue):
        logger.info("%s does not exist yet: the hook creates it at the first renewal", spool.queue)
    if os.path.isdir("/run/systemd/system"):
        problems += unit_problems(rules)
    try:
        logger.info(
            "%d rule(s); %d pending, %d kept for retry; quarantine: %s",
            len(rules.rules), len(spool.pending_names()), spool.claimed_count(), spool.quarantine,
        )
    except OSError as error:
        problems.append(f"cannot use {error.filename}: {error.strerror}")
    for problem in problems:
        logger.error("%s", problem)
    if problems:
        logger.error("%d problem(s) found", len(problems))
        sys.exit(EXIT_CONFIG)
    logger.info("%s: ok", rules_path)


def unit_problems(rules):
    """Return a message for each unit of `rules` that systemd does not know."""
    if shutil.which("systemctl") is None:
        return ["systemctl not found on PATH, but systemd is running"]
    units = sorted({unit for rule in rules.rules for _, unit in rule.units})
    problems = []
    for unit in units:
        result = execute.run_command(["systemctl", "show", "--property=LoadState", "--value", unit], 30)
        if not result.ok or result.output.strip() != "loaded":
            state = result.output.strip() or result.detail
            problems.append(f"{rules.path}: unit {unit} is not known to systemd (LoadState: {state})")
    return problems


@main.command()
@common_options
@click.argument("name")
@click.argument("domains", nargs=-1)
def explain(config_dir, rules_path, state_dir, name, domains):
    """Show which rules select certificate NAME and what would be done.

    The certificate's DOMAINS come from the arguments, else from its pending
    notification, else none.
    """
    rules = load_rules(rules_path, config_dir)
    if not domains:
        with spool_module.Spool(config_dir).opened() as spool:
            pending = [n for n in spool.peek()[0] if n.name == name]
        domains = pending[-1].domains if pending else ()
    click.echo(f"certificate {name}, domains: {' '.join(domains) or '(none given)'}")
    matching = rules.matching(name, domains)
    for rule in matching:
        click.echo(f"  {rules.path}:{rule.line}: rule selects it")
    if not matching:
        click.echo("  no rule selects it: its notification would be dropped")
    notification = spool_module.Notification(entry=name, name=name, lineage="", domains=tuple(domains), time="")
    for action in plan_module.make_plan([notification], rules, config_dir).actions:
        click.echo(f"  would {action.describe()}")


@main.command()
@common_options
@click.option("--poll", type=click.FloatRange(min=0.1), default=None, envvar="CERTRELAY_POLL",
              help="Also rescan the queue every SECONDS (for NFS, where inotify sees no writes).")
def watch(config_dir, rules_path, state_dir, poll):
    """Watch the queue and process notifications as they land (systemd Type=notify)."""
    from certrelay import watch as watch_module  # pyinotify: only this command pays for it

    rules = load_rules(rules_path, config_dir)
    sys.exit(watch_module.Watcher(config_dir, rules_path, state_dir, rules, poll).run())
