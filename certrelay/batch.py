"""Process one batch: claim the queue, plan, act, then settle each notification.

Shared by `certrelay run` and the watch daemon. At least once: a notification is
deleted only after every action it needs succeeded; until then it stays in claimed/
(outside the queue, so a path unit does not fire again) and every later batch retries
what is left of it.
"""

import dataclasses
import logging

from certrelay import execute, plan as plan_module, spool as spool_module, state

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Outcome:
    """Counts of what a batch did. `ok` is False if anything is left undone."""

    notifications: int = 0
    done: int = 0
    kept: int = 0
    unmatched: int = 0
    quarantined: int = 0
    actions: int = 0
    failed: int = 0
    dry_run: bool = False

    @property
    def ok(self):
        return not (self.kept or self.quarantined or self.failed)

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
            (self.kept, "kept for retry"), (self.unmatched, "matched no rule"),
            (self.quarantined, "quarantined"),
        ):
            if count:
                parts.append(f"{count} {words}")
        return ", ".join(parts)


def process(config_dir, rules, state_dir, dry_run=False):
    """Process every pending notification of `config_dir` once under `rules`.

    Return an `Outcome`. With `dry_run`, log the plan and change nothing.
    """
    spool = spool_module.Spool(config_dir)
    if dry_run:
        notifications, problems = spool.peek()
        for problem in problems:
            logger.error("%s", problem)
        progress = state.Progress(state_dir)
        plan = plan_module.make_plan(notifications, rules, config_dir, progress.done)
        for notification in plan.unmatched:
            logger.warning("would drop the notification for %s: no rule matches it", notification.name)
        execute.apply(plan, rules.settings["timeout"], dry_run=True)
        return Outcome(
            notifications=len(notifications), unmatched=len(plan.unmatched),
            quarantined=len(problems), actions=len(plan.actions), dry_run=True,
        )
    with state.locked(state_dir):
        notifications, problems = spool.claim()
        for problem in problems:
            logger.error("%s", problem)
        progress = state.Progress(state_dir)
        plan = plan_module.make_plan(notifications, rules, config_dir, progress.done)
        results = execute.apply(plan, rules.settings["timeout"])
        outcome = Outcome(
            notifications=len(notifications), unmatched=len(plan.unmatched), quarantined=len(problems),
            actions=len(results), failed=sum(not result.ok for result in results.values()),
        )
        kept = []
        for notification in notifications:
            needed = plan.needs.get(notification.entry, set())
            succeeded = {key for key in needed if results[key].ok}
            if notification in plan.unmatched:
                logger.warning("dropped the notification for %s: no rule matches it", notification.name)
            elif succeeded != needed:
                progress.done.setdefault(notification.entry, set()).update(succeeded)
                kept.append(notification.entry)
                logger.warning(
                    "kept the notification for %s in %s; the next run retries what failed",
                    notification.name, spool.claimed,
                )
                continue
            spool.done(notification)
        progress.save(kept)
        outcome.kept = len(kept)
        outcome.done = outcome.notifications - outcome.kept
    return outcome
