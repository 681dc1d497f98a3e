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

Each is logged as an error at most once a day (the time it was last raised is kept in
STATE_DIR/status.json, "alarms"), so that `run` exits 1 and cron mails once a day.
"""

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


def due(recorder, key, now):
    """Return True, and note `now` in `recorder` (status.Recorder), if the alarm `key`
    was not raised in the last ALARM_EVERY seconds."""
    if now - recorder.data["alarms"].get(key, 0) < ALARM_EVERY:
        return False
    recorder.data["alarms"][key] = now
    return True


def expiry_alarms(scanned, rules, recorder):
    """Log an error for every live certificate of `scanned` (lineages.Lineage)
    selected by `rules` that is below the expiry warning, at most once a day per
    lineage.

    Return (the names alarmed now, the names below the warning): `run` exits 1 for the
    first, so that cron mails once a day; the daemon's STATUS counts the second.
    """
    now, alarmed, below = time.time(), [], []
    settings = rules.settings
    for lineage in scanned:
        if lineage.facts is None:
            continue
        level = durations.level(lineage, now, settings["expiry-warning"], settings["expiry-critical"])
        if level == "ok" or not rules.matching(lineage.name, lineage.domains):
            continue
        below.append(lineage.name)
        if not due(recorder, lineage.name, now):
            continue
        alarmed.append(lineage.name)
        days = lineage.info.days_left(now)
        state_words = "has EXPIRED" if days < 0 else f"expires in {days:.1f} days"
        logger.error(
            "%s: the live certificate %s (%s, not after %s): renewal is probably failing where certbot runs;"
            " look at its log (e.g. docker logs, /var/log/letsencrypt/letsencrypt.log) for the DNS or account"
            " error, then run certbot renew", lineage.name, state_words, level,
            time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(lineage.info.not_after)),
        )
    return alarmed, below


def undated(scanned, rules, config_dir):
    """Return [(alarm key, certificates, message)] for the lineages of `scanned` whose dates cannot
    be read: one for all when python3-cryptography is missing (their domains are
    unknown too, so every lineage counts), and one for each other that a rule selects
    by name."""
    from certrelay import certinfo

    missing = [lineage.name for lineage in scanned if lineage.no_cryptography]
    found = []
    if missing:
        names = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        found.append((LIBRARY, len(missing),
                      f"{len(missing)} certificate(s) ({names}) without dates: {certinfo.NO_CRYPTOGRAPHY}"))
    for lineage in scanned:
        if lineage.facts is None and not lineage.no_cryptography and rules.matching(lineage.name, ()) \
                and not readable_now(config_dir, lineage.name):
            found.append((lineage.name, 1, f"{lineage.name}: the dates of the live certificate cannot be read, so no"
                                        f" expiry alarm can fire for it: {lineage.error}"))
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


def undated_alarms(scanned, rules, recorder, config_dir):
    """Log each of `undated(scanned, rules, config_dir)` as an error, at most once a day each.

    Return (the keys alarmed now, the number of certificates without dates).
    """
    now, alarmed, count = time.time(), [], 0
    for key, certificates, message in undated(scanned, rules, config_dir):
        count += certificates
        if due(recorder, key, now):
            alarmed.append(key)
            logger.error("%s", message)
    return alarmed, count


def overdue_alarms(scanned, rules, recorder, config_dir):
    """Log an error, at most once a day per lineage, for each lineage of `scanned`
    selected by `rules` that is overdue (not renewed `overdue-grace` after certbot's
    policy renews it), and for each whose policy cannot be read.

    Return (the keys alarmed now, the names overdue, the first time after now at
    which another selected lineage becomes overdue, or None, and {name: when certbot's
    policy renews it} for the selected lineages whose policy was read).
    """
    now, grace, alarmed, overdue, upcoming = time.time(), rules.settings["overdue-grace"], [], [], []
    with certificate.Tree(config_dir) as tree:  # config dir and renewal/ opened once, not per lineage
        found = [(lineage, *policy_of(config_dir, lineage, tree)) for lineage in scanned
                 if lineage.facts is not None and rules.matching(lineage.name, lineage.domains)]
    due_at = {lineage.name: renew_at for lineage, renew_at, _, error in found if error is None and renew_at}
    for lineage, renew_at, policy, error in found:
        if error is not None:
            if due(recorder, POLICY + lineage.name, now):
                alarmed.append(POLICY + lineage.name)
                logger.error("%s: cannot tell whether its renewal is overdue: %s", lineage.name, error)
            continue
        if renew_at is None:
            continue
        if renew_at + grace > now:
            upcoming.append(renew_at + grace)
            continue
        overdue.append(lineage.name)
        if due(recorder, OVERDUE + lineage.name, now):
            alarmed.append(OVERDUE + lineage.name)
            logger.error(
                "%s: renewal OVERDUE: certbot should have renewed it from %s (%s) and has not for %s; look at"
                " the output of the certbot container (docker logs, or the mail of the README's cron line) for"
                " the DNS or account error, then run certbot renew", lineage.name,
                time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(renew_at)), policy.describe(),
                durations.format_duration(now - renew_at),
            )
    return alarmed, overdue, min(upcoming, default=None), due_at


def attempt_alarms(scanned, rules, recorder, config_dir, due_at):
    """Log an error for each selected lineage of `scanned` whose renewal failed at
    certbot's last recorded attempt and that has not renewed since (at once for a new
    attempt, then once a day), and once a day if certbot stopped trying (`due_at`:
    {name: when certbot's policy renews it}, from overdue_alarms). Before the first
    recorded attempt, say nothing.

    Return (the keys alarmed now, the names whose renewal failed).
    """
    now, alarmed, failed = time.time(), [], []
    try:
        attempt = attempts.read(config_dir)
    except attempts.AttemptError as error:
        if due(recorder, ATTEMPT, now):
            alarmed.append(ATTEMPT)
            logger.error("cannot tell whether certbot's renewals fail: %s", error)
        return alarmed, failed
    if attempt is None:
        return alarmed, failed
    said = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(attempt.time))
    stopped = []
    for lineage in scanned:
        if lineage.facts is None or not rules.matching(lineage.name, lineage.domains):
            continue
        renewed_since = lineage.not_before > attempt.time - RENEWED_SINCE
        renew_at = due_at.get(lineage.name)
        if renew_at is not None and attempt.time < renew_at and now - renew_at > rules.settings["stopped-after"]:
            stopped.append((renew_at, lineage.name))
        if renewed_since or not (set(lineage.domains) & set(attempt.failed) if attempt.known
                                 else renew_at is not None and renew_at <= attempt.time):
            continue
        failed.append(lineage.name)
        said_for = recorder.data["alarms"].get(FAILED + lineage.name + " at", 0)  # the attempt last said
        if said_for < attempt.time or due(recorder, FAILED + lineage.name, now):
            recorder.data["alarms"].update({FAILED + lineage.name: now, FAILED + lineage.name + " at": attempt.time})
            alarmed.append(FAILED + lineage.name)
            why = ("certbot's post hook named its domains as failed" if attempt.known else
                   "it was due and did not change; this certbot does not say which renewals failed")
            logger.error("%s: renewal FAILED in the container at %s (%s); look at the output of the certbot"
                         " container for the DNS or account error, then run certbot renew", lineage.name, said, why)
    installed = os.path.exists(os.path.join(config_dir, POST_HOOK))
    if stopped and installed and due(recorder, STOPPED, now):
        renew_at, name = min(stopped)
        alarmed.append(STOPPED)
        logger.error("certbot has recorded no renewal attempt since %s, though %s has been due since %s: is the"
                     " container's cron line, or certbot-docker-renew.timer, still running?", said, name,
                     time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(renew_at)))
    return alarmed, failed


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
        if rules.matching(name, domains):
            return crossing
    return before
