"""Alarms: what a person must hear of although no notification asked, once a day each.

expiry    a live certificate a rule selects is below `expiry-warning`: renewal is
          probably failing where certbot runs.
undated   the dates of a live certificate a rule selects cannot be read (it is
          unreadable or unparsable), so no expiry alarm can fire for it.
library   python3-cryptography is missing: no certificate's dates can be read.
overdue   a live certificate a rule selects was not renewed `overdue-grace` after the
          time certbot's own policy renews it (renewal.py): renewal is failing.
policy    its renewal/NAME.conf cannot be read, so overdue cannot be told.
failed    certbot's last attempt (attempts.py, from its post hook) failed to renew a
          selected lineage: said at once, then once a day, until the lineage renews.
stopped   a selected lineage has been due longer than `stopped-after` and certbot
          recorded no attempt since: certbot is not running (its timer, its cron line).

Each function here returns the problems that stand now (`Problem`s); `sound` logs
each as an error at most once a day (the time it was last raised is kept in
STATE_DIR/status.json, "alarms"), so that `run` exits 1 and cron mails once a day, and
alerts.py sends them through the [alert] channels.
"""

import dataclasses
import logging
import os
import time

from certrelay import attempts, certificate, durations, renewal

logger = logging.getLogger(__name__)

ALARM_EVERY = 86400  # seconds: an alarm is raised at most once a day
LIBRARY = "*cryptography"  # the "alarms" key of the library alarm: no lineage name has a "*"
OVERDUE, POLICY, FAILED = "overdue ", "policy ", "failed "  # key prefixes: no lineage name has a space
STOPPED, ATTEMPT = "*stopped", "*attempt"
RENEWED_SINCE = 2 * 3600  # a certificate issued this long before an attempt counts as from it (CAs backdate)
POST_HOOK = "renewal-hooks/post/certrelay-post-hook"


@dataclasses.dataclass(frozen=True)
class Problem:
    """A problem that stands now: `key` names it across runs (a lineage name, or one of
    the prefixes above and a name), `subject` in a few words, `message` in full.
    `since`: when this occurrence began, for one said at once even if said within the
    day (a new failed attempt); 0 for "once a day"."""

    key: str
    subject: str
    message: str
    since: float = 0
    level: str = "error"  # or "warning", for alerts (alerts.py)


def sound(problems, recorder, now):
    """Log each of `problems` as an error unless it was raised in the last day (or a
    new occurrence, `since`, is not yet said); return how many were logged."""
    raised = recorder.data["alarms"]
    count = 0
    for problem in problems:
        if (problem.since and raised.get(problem.key + " at", 0) < problem.since) or due(recorder, problem.key, now):
            raised[problem.key] = now
            if problem.since:
                raised[problem.key + " at"] = problem.since
            logger.error("%s", problem.message)
            count += 1
    return count


def due(recorder, key, now):
    """Return True, and note `now` in `recorder` (status.Recorder), if the alarm `key`
    was not raised in the last ALARM_EVERY seconds."""
    if now - recorder.data["alarms"].get(key, 0) < ALARM_EVERY:
        return False
    recorder.data["alarms"][key] = now
    return True


def expiry_alarms(scanned, rules, now):
    """Return a Problem for every live certificate of `scanned` (lineages.Lineage)
    selected by `rules` that is below the expiry warning at `now`."""
    found = []
    settings = rules.settings
    for lineage in scanned:
        if lineage.facts is None:
            continue
        level = durations.level(lineage, now, settings["expiry-warning"], settings["expiry-critical"])
        if level == "ok" or not rules.selects(lineage.name, lineage.domains):
            continue
        days = lineage.info.days_left(now)
        state_words = "has EXPIRED" if days < 0 else f"expires in {days:.1f} days"
        found.append(Problem(lineage.name, f"{lineage.name} {state_words}", level=level if days >= 0 else "error",
                             message=(
            f"{lineage.name}: the live certificate {state_words} ({level}, not after {utc(lineage.info.not_after)}):"
            " renewal is probably failing where certbot runs; look at its log (e.g. docker logs,"
            " /var/log/letsencrypt/letsencrypt.log) for the DNS or account error, then run certbot renew")))
    return found


def undated(scanned, rules, config_dir):
    """Return [(Problem, certificates)] for the lineages of `scanned` whose dates cannot
    be read: one for all when python3-cryptography is missing (their domains are
    unknown too, so every lineage counts), and one for each other that a rule selects
    by name."""
    from certrelay import certinfo

    missing = [lineage.name for lineage in scanned if lineage.no_cryptography]
    found = []
    if missing:
        names = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        found.append((Problem(LIBRARY, "certificates without dates (python3-cryptography)",
                              f"{len(missing)} certificate(s) ({names}) without dates: {certinfo.NO_CRYPTOGRAPHY}"),
                      len(missing)))
    for lineage in scanned:
        if lineage.facts is None and not lineage.no_cryptography and rules.selects(lineage.name, ()) \
                and not readable_now(config_dir, lineage.name):
            found.append((Problem(lineage.name, f"{lineage.name} without dates",
                                  f"{lineage.name}: the dates of the live certificate cannot be read, so no"
                                  f" expiry alarm can fire for it: {lineage.error}"), 1))
    return found


def readable_now(config_dir, name):
    """Return True if live/NAME/cert.pem reads and parses now: a scan that met it in the
    middle of a renewal (certbot replaces the link) is no reason for an alarm."""
    from certrelay import certinfo

    try:
        certinfo.from_pem(certificate.live_certificate(config_dir, name))
    except (certificate.CertificateError, certinfo.CertificateParseError):
        return False
    return True


def undated_alarms(scanned, rules, config_dir):
    """Return (the Problems of `undated(scanned, rules, config_dir)`, the number of
    certificates without dates)."""
    found = undated(scanned, rules, config_dir)
    return [problem for problem, _ in found], sum(count for _, count in found)


def overdue_alarms(scanned, rules, config_dir, now):
    """Return the Problems at `now`: each lineage of `scanned` selected by `rules` that
    is overdue (not renewed `overdue-grace` after certbot's policy renews it), and each
    whose policy cannot be read.

    Return (the Problems, the names overdue, the first time after now at which another
    selected lineage becomes overdue, or None, and {name: when certbot's policy renews
    it} for the selected lineages whose policy was read).
    """
    if rules.subscribe:  # a fleet host: renewing is the certbot host's, which alarms for it
        return [], [], None, {}
    grace, problems, overdue, upcoming = rules.settings["overdue-grace"], [], [], []
    with certificate.Tree(config_dir) as tree:  # config dir and renewal/ opened once, not per lineage
        found = [(lineage, *policy_of(config_dir, lineage, tree)) for lineage in scanned
                 if lineage.facts is not None and rules.selects(lineage.name, lineage.domains)]
    due_at = {lineage.name: renew_at for lineage, renew_at, _, error in found if error is None and renew_at}
    for lineage, renew_at, policy, error in found:
        if error is not None:
            problems.append(Problem(POLICY + lineage.name, f"{lineage.name}: renewal policy unreadable",
                                    f"{lineage.name}: cannot tell whether its renewal is overdue: {error}"))
            continue
        if renew_at is None:
            continue
        if renew_at + grace > now:
            upcoming.append(renew_at + grace)
            continue
        overdue.append(lineage.name)
        problems.append(Problem(OVERDUE + lineage.name, f"renewal of {lineage.name} overdue", (
            f"{lineage.name}: renewal OVERDUE: certbot should have renewed it from {utc(renew_at)}"
            f" ({policy.describe()}) and has not for {durations.format_duration(now - renew_at)}; look at the"
            " output of the certbot container (docker logs, or the mail of the README's cron line) for the DNS"
            " or account error, then run certbot renew")))
    return problems, overdue, min(upcoming, default=None), due_at


def attempt_alarms(scanned, rules, config_dir, due_at, now):
    """Return the Problems at `now` of certbot's renewal attempts: each selected
    lineage of `scanned` whose renewal failed at certbot's last recorded attempt and
    that has not renewed since (said at once for a new attempt), and certbot having
    stopped trying (`due_at`: {name: when certbot's policy renews it}, from
    overdue_alarms). Before the first recorded attempt, nothing.

    Return (the Problems, the names whose renewal failed).
    """
    problems, failed = [], []
    try:
        attempt = attempts.read(config_dir)
    except attempts.AttemptError as error:
        return [Problem(ATTEMPT, "renewal attempts unreadable",
                        f"cannot tell whether certbot's renewals fail: {error}")], failed
    if attempt is None:
        return problems, failed
    said = utc(attempt.time)
    stopped = []
    for lineage in scanned:
        if lineage.facts is None or not rules.selects(lineage.name, lineage.domains):
            continue
        # Where certbot names the failed domains, a certificate issued before the attempt
        # is the one that failed to renew (even one issued minutes before); a renewal
        # since then by `certbot renew` records a new attempt. Where it does not, one
        # issued up to RENEWED_SINCE before the attempt counts as renewed by it.
        renewed_since = lineage.not_before > attempt.time - (0 if attempt.known else RENEWED_SINCE)
        renew_at = due_at.get(lineage.name)
        if renew_at is not None and attempt.time < renew_at and now - renew_at > rules.settings["stopped-after"]:
            stopped.append((renew_at, lineage.name))
        if renewed_since or not (set(lineage.domains) & set(attempt.failed) if attempt.known
                                 else renew_at is not None and renew_at <= attempt.time):
            continue
        failed.append(lineage.name)
        why = ("certbot's post hook named its domains as failed" if attempt.known else
               "it was due and did not change; this certbot does not say which renewals failed")
        problems.append(Problem(FAILED + lineage.name, f"renewal of {lineage.name} FAILED", (
            f"{lineage.name}: renewal FAILED in the container at {said} ({why}); look at the output of the"
            " certbot container for the DNS or account error, then run certbot renew"), since=attempt.time))
    if stopped and os.path.exists(os.path.join(config_dir, POST_HOOK)):
        renew_at, name = min(stopped)
        problems.append(Problem(STOPPED, "certbot stopped renewing", (
            f"certbot has recorded no renewal attempt since {said}, though {name} has been due since"
            f" {utc(renew_at)}: is the container's cron line, or certbot-docker-renew.timer, still running?")))
    return problems, failed


def utc(seconds):
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(seconds))


def policy_of(config_dir, lineage, tree):
    """Return (renew_at, Policy, None) for `lineage`, or (None, None, the PolicyError)."""
    try:
        return (*renewal.renew_at(config_dir, lineage, tree), None)
    except renewal.PolicyError as error:
        return None, None, error


def warning_due(scanned, rules, before):
    """Return when the first certificate of `scanned` (lineages.Lineage) selected by
    `rules` stops being "ok" (durations.ok_until), if before `before` (epoch seconds),
    else `before`. Rules are matched only for the few lineages that come close."""
    warning, critical = rules.settings["expiry-warning"], rules.settings["expiry-critical"]
    crossings = []
    for lineage in scanned:
        if lineage.facts is not None:
            crossing = durations.ok_until(lineage, warning, critical)
            if crossing < before:
                crossings.append((crossing, lineage.name, lineage.domains))
    for crossing, name, domains in sorted(crossings):
        if rules.selects(name, domains):
            return crossing
    return before
