"""Reconcile: find lineages that renewed without a notification.

A notification can be lost before certrelay sees it (the hook missing from a new
container volume, a power cut, `certbot renew` run by hand on the host). So every
batch compares each lineage under live/ that some rule selects with the ledger (the
certificate certrelay last acted on). One that changed is acted on as if notified.
One seen for the first time is recorded, not acted on: installing certrelay restarts
nothing, unless a `verify` endpoint of its rules shows it is not current. Fingerprints
need no python3-cryptography: without it, reconcile still acts on a changed certificate
(of a lineage that a rule selects by name: its domains are unknown).
"""

import logging

from certrelay import certificate, spool

logger = logging.getLogger(__name__)

ENTRY_SUFFIX = "@reconcile"  # the entry of a notification reconcile made (no file in claimed/)
FIRST_SIGHT_TIMEOUT = 5.0  # seconds to probe the endpoints of a lineage seen for the first time


def find(scanned, config_dir, rules, ledger, announced, progress, dry_run):
    """Return [(Notification, fingerprint)] for the lineages of `scanned`
    (lineages.Lineage) selected by `rules` whose live certificate differs from
    `ledger.data` (name -> fingerprint) and that no notification in `announced` (names)
    covers, plus those kept from an earlier reconcile (entries in `progress`). Record
    first-seen lineages in the ledger (unless `dry_run`).
    """
    found, first_seen = [], []
    for lineage in scanned:
        name = lineage.name
        if name in announced or lineage.error and not lineage.no_cryptography:
            continue
        entry = name + ENTRY_SUFFIX
        recorded = ledger.data.get(name)
        # Unchanged first: a dict look-up, where matching the rules is not.
        if recorded == lineage.fingerprint and entry not in progress or not rules.selects(name, lineage.domains):
            continue
        if entry not in progress and recorded_before_der(ledger, name, lineage.fingerprint, config_dir, dry_run):
            continue
        if recorded is None and entry not in progress:
            first_seen.append(lineage)
            continue
        logger.warning(
            "%s: its live certificate changed but no notification came (is the deploy hook installed"
            " where certbot runs?); %s as if notified", name, "would act" if dry_run else "acting",
        )
        found.append((notification(lineage, config_dir), lineage.fingerprint))
    not_served = serving_something_else(first_seen, rules, config_dir) if first_seen else set()
    for lineage in first_seen:
        if lineage.name in not_served:
            logger.warning("%s: seen for the first time, and an endpoint does not serve its live certificate;"
                           " %s", lineage.name, "would act on it" if dry_run else "acting on it")
            found.append((notification(lineage, config_dir), lineage.fingerprint))
        elif not dry_run:
            logger.info("%s: seen for the first time; recorded, nothing done", lineage.name)
            ledger.data[lineage.name] = lineage.fingerprint
            ledger.changed = True
    return found


def recorded_before_der(ledger, name, fingerprint, config_dir, dry_run=False):
    """Return True if the ledger's entry for `name` is one an older certrelay wrote
    (the SHA-256 of cert.pem's bytes) for the live certificate, whose DER fingerprint is
    `fingerprint`: nothing was renewed since. Unless `dry_run`, the entry becomes that
    DER fingerprint, the one `status`, metrics, logs and openssl show.

    Reads cert.pem only for an entry that differs: once migrated, only after a renewal."""
    recorded = ledger.data.get(name)
    if recorded is None or recorded == fingerprint:
        return False
    try:
        same = certificate.sha256(certificate.live_certificate(config_dir, name)) == recorded
    except certificate.CertificateError:
        return False
    if same and not dry_run:
        ledger.data[name] = fingerprint
        ledger.changed = True
    return same


def notification(lineage, config_dir):
    """Return a Notification standing in for the one that never came."""
    return spool.Notification(
        entry=lineage.name + ENTRY_SUFFIX, name=lineage.name,
        lineage=f"{config_dir}/live/{lineage.name}", domains=tuple(lineage.domains), time="",
    )


def serving_something_else(first_seen, rules, config_dir):
    """Return the names of the lineages of `first_seen` with a `verify` endpoint that
    does not serve their live certificate: all probed at once, briefly, quietly."""
    from certrelay import plan

    notifications = [notification(lineage, config_dir) for lineage in first_seen]
    checks = [check for found in plan.make_plan(notifications, rules, config_dir).checks.values() for check in found]
    if not checks:
        return set()
    from certrelay import verify

    return {verdict.check.name for verdict in verify.verify(checks, config_dir, FIRST_SIGHT_TIMEOUT, quiet=True)
            if not verdict.ok}
