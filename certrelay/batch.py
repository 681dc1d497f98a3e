"""Process one batch: claim the queue, plan, act, then settle each notification.

Shared by `certrelay run` and the watch daemon. At least once: a notification is
deleted only after every action it needs succeeded; until then it stays in claimed/
(outside the queue, so a path unit does not fire again) and every later batch retries
what is left of it. Only real change is acted on: a notification whose live
certificate is the one certrelay last acted on for that lineage is dropped (a
`--dry-run --run-deploy-hooks` renewal, a replay, a forgery), unless `force`.
"""

import dataclasses
import logging
import time

from certrelay import certificate, execute, plan as plan_module, spool as spool_module, state

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Outcome:
    """Counts of what a batch did. `ok` is False if anything is left undone.

    `deferred_until` is the wall-clock time at which units held back by the per-unit
    minimum interval may act, or None.
    """

    notifications: int = 0
    done: int = 0
    kept: int = 0
    deferred: int = 0
    unmatched: int = 0
    unchanged: int = 0
    unreadable: int = 0
    quarantined: int = 0
    actions: int = 0
    failed: int = 0
    dry_run: bool = False
    deferred_until: float = None

    @property
    def ok(self):
        return not (self.kept or self.quarantined or self.failed or self.unreadable)

    def summary(self):
        """Return one line a person can read, e.g. for the daemon's STATUS=."""
        if not self.notifications and not self.quarantined:
            return "nothing pending"
        parts = [f"{self.notifications} notification(s)"]
        if self.dry_run:
            parts.append(f"{self.actions} action(s) planned")
        else:
            parts.append(f"{self.actions - self.failed}/{self.actions} action(s) done")
        for count, words in (
            (self.kept, "kept for retry"), (self.deferred, "deferred by min-interval"),
            (self.unchanged, "unchanged"), (self.unmatched, "matched no rule"),
            (self.unreadable, "without a readable certificate"), (self.quarantined, "quarantined"),
        ):
            if count:
                parts.append(f"{count} {words}")
        return ", ".join(parts)


def process(config_dir, rules, state_dir, dry_run=False, force=False):
    """Process every pending notification of `config_dir` once under `rules`.

    Return an `Outcome`. With `dry_run`, log the plan and change nothing; with
    `force`, act even on certificates that did not change.
    """
    if dry_run:
        with spool_module.Spool(config_dir).opened() as spool:
            notifications, problems = spool.peek()
            return settle_batch(spool, notifications, problems, rules, state_dir, force, dry_run=True)
    with state.locked(state_dir), spool_module.Spool(config_dir).opened(create=True) as spool:
        notifications, problems = spool.claim()
        for name in spool.remove_stale_temporary():
            logger.debug("removed %s/tmp/%s, left by a hook killed over a day ago", spool.root, name)
        return settle_batch(spool, notifications, problems, rules, state_dir, force)


def settle_batch(spool, notifications, problems, rules, state_dir, force, dry_run=False):
    """Plan and carry out the batch of claimed `notifications`; return the `Outcome`."""
    for problem in problems:
        logger.error("%s", problem)
    drop = (lambda notification: None) if dry_run else spool.done
    said = {"drop": "dropped", "skip": "skipped", "defer": "deferred"}
    if dry_run:
        said = {word: "would " + word for word in said}
    progress, ledger, unit_times = (
        state.Store(state_dir, name) for name in ("progress.json", "ledger.json", "units.json")
    )
    outcome = Outcome(notifications=len(notifications), quarantined=len(problems), dry_run=dry_run)

    # Only real change: drop what cannot be read, skip what was acted on already.
    changed, fingerprints = [], {}
    for notification in notifications:
        name = notification.name
        try:
            fingerprints[notification.entry] = certificate.fingerprint(spool.config_dir, name)
        except certificate.CertificateError as error:
            logger.error("%s the notification for %s: its live certificate cannot be read: %s",
                         said["drop"], name, error)
            outcome.unreadable += 1
            drop(notification)
            continue
        kept_before = notification.entry in progress.data
        if not force and not kept_before and ledger.data.get(name) == fingerprints[notification.entry]:
            logger.info("%s %s: its certificate did not change since the last action (--force acts anyway)",
                        said["skip"], name)
            outcome.unchanged += 1
            drop(notification)
            continue
        changed.append(notification)

    done = {entry: set(keys) for entry, keys in progress.data.items()}
    plan = plan_module.make_plan(changed, rules, spool.config_dir, done)
    for notification in plan.unmatched:
        logger.warning("%s the notification for %s: no rule matches it", said["drop"], notification.name)
        outcome.unmatched += 1
        drop(notification)

    # The per-unit minimum interval holds actions back; their notifications wait.
    now, interval = time.time(), rules.settings["min-interval"]
    ready = []
    for action in plan.actions:
        allowed = 0 if action.verb == "run" else unit_times.data.get(action.target, 0) + interval
        if allowed > now:
            logger.info("%s %s: its last action was less than min-interval (%g s) ago",
                        said["defer"], action.describe(), interval)
            outcome.deferred_until = min(outcome.deferred_until or allowed, allowed)
        else:
            ready.append(action)
    outcome.actions = len(ready)
    results = execute.apply(ready, rules.settings["timeout"], dry_run)
    if dry_run:
        return outcome
    for action in ready:
        if action.verb != "run":
            unit_times.data[action.target] = now
    outcome.failed = sum(not result.ok for result in results.values())

    # Settle: done when every needed action succeeded (now or in an earlier run).
    progress.data = {}
    for notification in changed:
        if notification in plan.unmatched:
            continue
        needed = plan.needs[notification.entry]
        succeeded = set(done.get(notification.entry, ()))
        succeeded |= {key for key in needed if key in results and results[key].ok}
        if needed <= succeeded:
            ledger.data[notification.name] = fingerprints[notification.entry]
            spool.done(notification)
            outcome.done += 1
            continue
        progress.data[notification.entry] = sorted(succeeded)
        if any(key in results for key in needed - succeeded):
            outcome.kept += 1
            logger.warning("kept the notification for %s in %s; a later run retries what failed",
                           notification.name, spool.claimed)
        else:
            outcome.deferred += 1
    for store in (progress, ledger, unit_times):
        store.save()
    return outcome
