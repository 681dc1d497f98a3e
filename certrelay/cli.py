"""The `certrelay` command: thin click wrappers over rules, batch and watch.

Exit status: 0 all done (or nothing pending), 1 something left undone (a failed
action, a quarantined entry), 2 usage or configuration error (nothing processed).
"""

import functools
import os
import sys
import time

import click

# Only what every command needs: each command imports the rest. `run` with nothing to
# do (idle.py) must start about as fast as click itself, so not even logging, json or
# the rules parser is imported here.
from certrelay import __version__

EXIT_OK, EXIT_INCOMPLETE, EXIT_CONFIG = 0, 1, 2
# Made once and shared by every command: each click.Path looks up its translated name,
# a few stat() calls that add up over the commands at every start.
DIRECTORY, FILE = click.Path(file_okay=False), click.Path(dir_okay=False)


class Logger:
    """The "certrelay" logger, looked up on first use (see setup_logging)."""

    def __getattr__(self, name):
        import logging

        return getattr(logging.getLogger("certrelay"), name)


logger = Logger()


def setup_logging(quiet, verbose):
    """Send certrelay's log to stderr: errors only with `quiet`, debug with `verbose`.
    Plain lines; errors and warnings say so, so that a cron mail reads well."""
    import logging

    def prefix(record):
        record.prefix = ("error: " if record.levelno >= logging.ERROR
                         else "warning: " if record.levelno >= logging.WARNING else "")
        return True

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(prefix)s%(message)s"))
    handler.addFilter(prefix)
    root = logging.getLogger("certrelay")
    root.handlers[:] = [handler]
    root.propagate = False
    root.setLevel(logging.ERROR if quiet else logging.DEBUG if verbose else logging.INFO)


def common_options(function, set_up_logging=True):
    """Add the options every command shares; each also reads an environment variable.
    Set up logging before the command runs, or, without `set_up_logging`, pass it
    `quiet` and `verbose` to do that itself."""
    options = [
        click.option(
            "--config-dir", envvar="CERTRELAY_CONFIG_DIR", default="/etc/letsencrypt", show_default=True,
            show_envvar=True, type=DIRECTORY, help="certbot's config dir (holds the spool).",
        ),
        click.option(
            "--rules", "rules_path", envvar="CERTRELAY_RULES", default="/etc/certrelay/rules.toml",
            show_default=True, show_envvar=True, type=FILE, help="The rules file.",
        ),
        click.option(
            "--state-dir", envvar="CERTRELAY_STATE_DIR", default="/var/lib/certrelay", show_default=True,
            show_envvar=True, type=DIRECTORY, help="Lock and retry state.",
        ),
        click.option("--quiet", "-q", is_flag=True, envvar="CERTRELAY_QUIET", help="Print errors only."),
        click.option("--verbose", "-v", is_flag=True, envvar="CERTRELAY_VERBOSE", help="Print debug detail."),
    ]

    @functools.wraps(function)
    def wrapper(quiet, verbose, **options):
        if not set_up_logging:
            return function(quiet=quiet, verbose=verbose, **options)
        setup_logging(quiet, verbose)
        return function(**options)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def load_rules(rules_path, config_dir, on_error=None):
    """Return the validated rules, or exit 2 printing every problem and how to fix it.

    Call `on_error()` before exiting, if given.
    """
    from certrelay import rules as rules_module

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
@functools.partial(common_options, set_up_logging=False)
@click.option("--dry-run", "-n", is_flag=True, envvar="CERTRELAY_DRY_RUN", help="Print the plan; change nothing.")
@click.option(
    "--empty-queue-on-error", is_flag=True,
    help="On a configuration error, still move the queue into claimed/ (kept for the next run), so that"
    " a DirectoryNotEmpty= path unit does not fire again and again.",
)
@click.option("--force", is_flag=True, help="Act even on certificates that did not change since the last action.")
def run(config_dir, rules_path, state_dir, quiet, verbose, dry_run, empty_queue_on_error, force):
    """Process every pending notification once (for cron and the path unit).

    When nothing changed since a batch that left nothing to do (the rules, live/ and
    the spool are as it saw them: STATE_DIR/idle), say "nothing pending" at once.
    """
    from certrelay import idle

    if not (dry_run or force) and idle.unchanged(config_dir, rules_path, state_dir):
        if not quiet:
            click.echo("nothing pending" + (f" (nothing changed since the last batch: {idle.MEMO_HELP})"
                                            if verbose else ""), err=True)
        sys.exit(EXIT_OK)
    setup_logging(quiet, verbose)
    from certrelay import batch, spool as spool_module, state

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
            (logger.info if outcome.ok else logger.error)("%s", outcome.summary())
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
    from certrelay import alarms, lineages, spool as spool_module

    rules = load_rules(rules_path, config_dir)
    if rules_only:
        logger.info("%s: ok, %d rule(s)", rules_path, len(rules.rules))
        return
    # On a fleet host the subscriber, not certbot's hooks, writes the notifications.
    problems = hook_problems(config_dir) if not rules.subscribe else []
    spool = spool_module.Spool(config_dir)
    if not os.path.isdir(spool.queue):
        logger.info("%s does not exist yet: the hook creates it at the first renewal", spool.queue)
    if os.path.isdir("/run/systemd/system"):
        problems += unit_problems(rules)
    problems += install_problems(rules, config_dir)
    problems += [problem.message for problem, _ in alarms.undated(lineages.Scanner(config_dir, None).scan(), rules,
                                                                  config_dir)]
    problems += rules.alert.problems() if rules.alert else []
    if rules.fleet or rules.subscribe:
        problems += fleet_commands.check_problems(rules)
    try:
        pending = spool.pending_names()
        logger.info("%d rule(s); %d pending, %d kept for retry; quarantine: %s",
                    len(rules.rules), len(pending), len(spool.claimed_entries()), spool.quarantine)
        for name in sorted(pending):
            if not os.path.isdir(os.path.join(config_dir, "live", name)):
                logger.warning("%s/%s: a notification for %s, but there is no lineage %s under live/: is the"
                               " container's /etc/letsencrypt %s? (the next run drops it)", spool.queue, name,
                               name, name, config_dir)
    except OSError as error:
        problems.append(f"cannot use {error.filename}: {error.strerror}")
    for problem in problems:
        logger.error("%s", problem)
    if problems:
        logger.error("%d problem(s) found", len(problems))
        sys.exit(EXIT_CONFIG)
    logger.info("%s: ok", rules_path)


def hook_problems(config_dir):
    """Return what is wrong with certrelay's hooks in `config_dir` (missing, or one that
    cannot be compared with the hook shipped with certrelay); log whether each is current."""
    from certrelay import hook as hook_module

    if not os.path.isdir(config_dir):
        return [f"{config_dir}: no such directory; pass certbot's config dir with --config-dir"]
    problems = []
    for hook in hook_module.HOOKS:
        path = hook_module.installed_path(config_dir, hook)
        try:
            hook_status = hook_module.status(config_dir, hook)
        except hook_module.HookError as error:
            problems.append(f"the {hook.kind} hook cannot be checked: {error}")
            continue
        if hook_status == hook_module.MISSING:
            problems.append(f"{path}: the {hook.kind} hook is not installed; install it:"
                            f" certrelay install-hook --config-dir {config_dir}")
        elif hook_status == hook_module.OUTDATED:
            logger.warning("%s: outdated (not the hook shipped with this certrelay): run certrelay install-hook", path)
        else:
            logger.info("%s: current", path)
    for path in hook_module.bash_hooks(config_dir):
        logger.warning("%s asks for bash (#!...bash): the certbot/dns-cloudflare image has none, so certbot in"
                       " the container gets exit status 127 from it and still exits 0; rewrite it for /bin/sh"
                       " (BusyBox ash there), or if it is certrelay's: certrelay install-hook --force", path)
    return problems


def install_problems(rules, config_dir):
    """Return a message for each install destination (for each lineage under live/
    its rule selects, else with NAME for {name}) that could not be written safely."""
    from certrelay import install, lineages, placeholders, spool as spool_module

    problems = []
    scanned = lineages.Scanner(config_dir, None).scan() if any(rule.install for rule in rules.rules) else []
    for rule in rules.rules:
        for specification in rule.install:
            selected = [lineage for lineage in scanned if rule.selects(lineage.name, lineage.domains)]
            notifications = [spool_module.Notification(entry="", name=lineage.name, lineage="",
                                                       domains=tuple(lineage.domains), time="")
                             for lineage in selected] or [spool_module.Notification("", "NAME", "", (), "")]
            paths = {specification.destination(placeholders.values(notification, config_dir))
                     for notification in notifications}
            for path in sorted(paths):
                problems += [f"{rules.path}:{specification.line}: {problem}"
                             for problem in install.destination_problems(specification, path)]
    return problems


def unit_problems(rules):
    """Return a message for each unit of `rules` that systemd does not know."""
    from certrelay import execute

    import shutil

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
    from certrelay import plan as plan_module, spool as spool_module

    rules = load_rules(rules_path, config_dir)
    if not domains:
        with spool_module.Spool(config_dir).opened() as spool:
            pending = [n for n in spool.peek()[0] if n.name == name]
        domains = pending[-1].domains if pending else ()
    click.echo(f"certificate {name}, domains: {' '.join(domains) or '(none given)'}")
    matching = rules.matching(name, domains)
    for rule in matching:
        click.echo(f"  {rules.path}:{rule.line}: rule selects it")
    hosts = rules.fleet.selecting(name, domains) if rules.fleet else ()
    for host in rules.fleet.hosts if hosts else ():
        if host.name in hosts:
            click.echo(f"  {rules.path}:{host.line}: fleet host {host.name} gets it")
    if not matching and not hosts:
        click.echo("  no rule selects it: its notification would be dropped")
    notification = spool_module.Notification(entry=name, name=name, lineage="", domains=tuple(domains), time="")
    explained = plan_module.make_plan([notification], rules, config_dir)
    for action in explained.actions:
        click.echo(f"  would {action.describe()}")
    for check in explained.checks.get(name, ()):
        sni = f" (SNI {check.server_name})" if check.server_name else ""
        click.echo(f"  would verify that {check.endpoint.url}{sni} serves the live certificate")


@main.command()
@common_options
@click.option("--test", is_flag=True, required=True, help="Send a test alert through every channel of [alert].")
def alert(config_dir, rules_path, state_dir, test):
    """Send a test alert through every channel of the rules file's [alert] table and
    ping its dead-man's switch; exit 0 if each took it, 1 if not, 2 without [alert]."""
    from certrelay import alerts

    rules = load_rules(rules_path, config_dir)
    if not rules.alert:
        logger.error("%s has no [alert] table: add one (mail, command, apprise, ping; see certrelay(8))", rules_path)
        sys.exit(EXIT_CONFIG)
    results = alerts.test(rules.alert, rules.settings["timeout"])
    for name, error in results.items():
        if error:
            logger.error("%s: NOT sent: %s", name, error)
        else:
            logger.info("%s: sent", name)
    sys.exit(EXIT_INCOMPLETE if any(results.values()) else EXIT_OK)


@main.command()
@common_options
@click.option("--poll", type=click.FloatRange(min=0.1), default=None, metavar="SECONDS", envvar="CERTRELAY_POLL",
              help="Also rescan the queue every SECONDS (for NFS, where inotify sees no writes).")
def watch(config_dir, rules_path, state_dir, poll):
    """Watch the queue and process notifications as they land (systemd Type=notify)."""
    try:
        from certrelay import watch as watch_module  # pyinotify: only this command pays for it
    except ImportError as error:
        logger.error("certrelay watch needs %s, which cannot be imported (%s): apt-get install python3-pyinotify"
                     " python3-sdnotify, or in a venv: pip install pyinotify sdnotify", error.name, error)
        sys.exit(EXIT_CONFIG)
    rules = load_rules(rules_path, config_dir)
    sys.exit(watch_module.Watcher(config_dir, rules_path, state_dir, rules, poll).run())


@main.command("install-hook")
@click.option(
    "--config-dir", envvar="CERTRELAY_CONFIG_DIR", default="/etc/letsencrypt", show_default=True,
    show_envvar=True, type=DIRECTORY, help="certbot's config dir (holds renewal-hooks/).",
)
@click.option("--force", is_flag=True,
              help="Create a missing config dir; replace a file there that is not a certrelay hook.")
def install_hook(config_dir, force):
    """Copy the hooks into CONFIG_DIR/renewal-hooks/ (atomically, mode 0755): the
    deploy hook into deploy/, the post hook into post/.

    certbot then runs the deploy hook after every renewal and the post hook after
    every renewal attempt. Run it again after an upgrade when `certrelay check` says a
    hook is outdated.
    """
    from certrelay import hook as hook_module

    setup_logging(False, False)
    failed = False
    for hook in hook_module.HOOKS:
        try:
            path, outcome = hook_module.install(config_dir, force, hook)
        except (hook_module.HookError, OSError) as error:
            logger.error("%s", error)
            failed = True
            continue
        logger.info("%s: %s", path, "already current" if outcome == hook_module.CURRENT else outcome)
    if failed:
        sys.exit(EXIT_CONFIG)


def selected_lineages(config_dir, rules, state_dir, names):
    """Return the `lineages.Lineage`s under live/ that `rules` select (only `names`
    if given); exit 2 naming any of `names` that is not there."""
    from certrelay import lineages

    scanner = lineages.Scanner(config_dir, state_dir)  # not saved: verify and status change nothing
    found = [lineage for lineage in scanner.scan() if rules.matching(lineage.name, lineage.domains)]
    if names:
        missing = sorted(set(names) - {lineage.name for lineage in found})
        if missing:
            logger.error("no lineage selected by the rules under %s/live: %s", config_dir, ", ".join(missing))
            sys.exit(EXIT_CONFIG)
        found = [lineage for lineage in found if lineage.name in names]
    return found


@main.command()
@common_options
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--nagios", is_flag=True, help="Print as a Nagios/Icinga plugin; exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.")
@click.argument("names", nargs=-1)
def verify(config_dir, rules_path, state_dir, as_json, nagios, names):
    """Check now, without acting, that every endpoint serves the live certificate.

    Exit 0 when all are current, 1 when any is not, 2 on a configuration error.
    """
    from certrelay import plan as plan_module, report, spool as spool_module, status, verify as verify_module

    if nagios:
        from certrelay import rules as rules_module

        try:
            rules = rules_module.load(rules_path, config_dir=config_dir)
        except rules_module.RulesError as error:
            code, text = report.nagios(status.snapshot(config_dir, None, state_dir, error="; ".join(error.problems)))
            click.echo(text)
            sys.exit(code)
    else:
        rules = load_rules(rules_path, config_dir)
    found = selected_lineages(config_dir, rules, state_dir, names)
    notifications = [spool_module.Notification(entry=lineage.name, name=lineage.name, lineage="",
                                               domains=tuple(lineage.domains), time="") for lineage in found]
    checks = [check for checks in plan_module.make_plan(notifications, rules, config_dir).checks.values()
              for check in checks]
    verdicts = verify_module.verify(checks, config_dir, verify_module.ATTEMPT_TIMEOUT, quiet=as_json or nagios,
                                    once=True, settings=rules.settings)
    if nagios:
        taken = status.snapshot(config_dir, rules, state_dir)
        current = {(verdict.check.name, verdict.check.endpoint.url): verdict for verdict in verdicts}
        for certificate in taken["certificates"]:
            certificate["endpoints"] = [
                {"endpoint": url, "outcome": verdict.outcome, "served_sha256": verdict.served.sha256,
                 "served_serial": None, "served_not_after": None, "error": verdict.error,
                 "checked": taken["time"]}
                for (name, url), verdict in current.items() if name == certificate["name"]
            ]
        code, text = report.nagios(taken)
        click.echo(text)
        sys.exit(code)
    if as_json:
        import json

        click.echo(json.dumps([
            {"name": verdict.check.name, "endpoint": verdict.check.endpoint.url, "sni": verdict.check.server_name,
             "outcome": verdict.outcome, "expected_sha256": verdict.expected, "served_sha256": verdict.served.sha256,
             "error": verdict.error} for verdict in verdicts
        ], indent=1))
    if not checks:
        logger.info("no endpoint to verify: add verify = [...] to the rules")
    sys.exit(EXIT_OK if all(verdict.ok for verdict in verdicts) else EXIT_INCOMPLETE)


@main.command()
@common_options
@click.option("--json", "as_json", is_flag=True, help="Print the state as JSON.")
def status(config_dir, rules_path, state_dir, as_json):
    """Show each certificate, what certrelay did about it, and what is pending or failed.

    Exit 0 when all is well, 1 when anything needs attention, 2 on a configuration error.
    """
    from certrelay import report, status as status_module

    rules = load_rules(rules_path, config_dir)
    taken = status_module.snapshot(config_dir, rules, state_dir)
    click.echo(report.as_json(taken) if as_json else report.table(taken))
    sys.exit(EXIT_INCOMPLETE if report.needs_attention(taken) else EXIT_OK)


# The fleet's commands live with the fleet; registered here, after what they use from cli.
from certrelay.fleet import commands as fleet_commands  # noqa: E402

main.add_command(fleet_commands.fleet)
main.add_command(fleet_commands.subscribe)
