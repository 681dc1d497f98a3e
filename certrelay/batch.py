"""Process one batch: claim the queue, reconcile, plan, act, verify, then settle.

Shared by `certrelay run` and the watch daemon. At least once: a notification is
deleted only after every action and verification it needs succeeded; until then it
stays in claimed/ (outside the queue, so a path unit does not fire again) and every
later batch retries what is left of it. Only real change is acted on: a notification
whose live certificate is the one certrelay last acted on for that lineage is dropped
(a `--dry-run --run-deploy-hooks` renewal, a replay, a forgery), unless `force`. A
lineage that changed with no notification at all is found by reconcile and acted on
as if notified.
"""

import dataclasses
import functools
import logging
import time

from certrelay import alarms, certificate, idle, lineages, reconcile, rules as rules_module
from certrelay import spool as spool_module, state, status

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
    unannounced: int = 0
    actions: int = 0
    failed: int = 0
    verified: int = 0
    unverified: int = 0
    alarmed: int = 0  # alarms raised now (alarms.py: once a day each)
    below_warning: int = 0  # all certificates below expiry-warning
    undated: int = 0  # certificates whose dates cannot be read
    overdue: int = 0  # certificates not renewed in time by certbot's own policy
    failed_renewals: int = 0  # certificates whose renewal failed at certbot's last attempt
    unsent: int = 0  # alerts that a channel could not take (alerts.py: sent again by the next batch)
    dry_run: bool = False
    deferred_until: float = None

    @property
    def ok(self):
        return not (self.kept or self.quarantined or self.failed or self.unreadable or self.unverified
                    or self.alarmed or self.unsent)

    @property
    def settled(self):
        """True if the batch left nothing to do: every notification done or dropped,
        nothing kept, deferred or close to expiry."""
        return self.ok and not (self.deferred or self.deferred_until or self.below_warning or self.undated
                                or self.overdue or self.failed_renewals)

    def summary(self):
        """Return one line a person can read, e.g. for the daemon's STATUS=."""
        if not (self.notifications or self.unannounced or self.quarantined or self.below_warning or self.undated
                or self.overdue or self.failed_renewals or self.unsent):
            return "nothing pending"
        parts = [f"{self.notifications} notification(s)"]
        if self.unannounced:
            parts.append(f"{self.unannounced} renewal(s) found without one")
        if self.dry_run:
            parts.append(f"{self.actions} action(s) planned")
        else:
            parts.append(f"{self.actions - self.failed}/{self.actions} action(s) done")
        for count, words in (
            (self.verified, "endpoint(s) verified"), (self.unverified, "endpoint(s) NOT serving the live certificate"),
            (self.kept, "kept for retry"), (self.deferred, "deferred by min-interval"),
            (self.unchanged, "unchanged"), (self.unmatched, "matched no rule"),
            (self.unreadable, "without a readable certificate"), (self.quarantined, "quarantined"),
            (self.below_warning, "certificate(s) close to expiry"),
            (self.undated, "certificate(s) whose dates cannot be read"),
            (self.overdue, "renewal(s) overdue"),
            (self.failed_renewals, "renewal(s) failed in the container"),
            (self.unsent, "alert(s) not sent"),
        ):
            if count:
                parts.append(f"{count} {words}")
        return ", ".join(parts)


def process(config_dir, rules, state_dir, dry_run=False, force=False, scanner=None, stores=None):
    """Process every pending notification of `config_dir` once under `rules`, and
    whatever renewed without one.

    Return an `Outcome`. With `dry_run`, log the plan and change nothing; with
    `force`, act even on certificates that did not change. `scanner` and `stores`: a
    lineages.Scanner and a state.Stores kept from an earlier batch (the daemon's),
    else they are made.
    """
    if dry_run:
        with spool_module.Spool(config_dir).opened() as spool:
            notifications, problems = spool.peek()
            return Batch(spool, rules, state_dir, force, True, scanner).settle(notifications, problems)
    with state.locked(state_dir), spool_module.Spool(config_dir).opened(create=True) as spool:
        notifications, problems = spool.claim()
        outcome = Batch(spool, rules, state_dir, force, scanner=scanner, stores=stores).settle(notifications, problems)
        for name in spool.remove_stale_temporary():  # after the actions: not in their way
            logger.debug("removed %s/tmp/%s, left by a hook killed over a day ago", spool.root, name)
        return outcome


class Batch:
    """One batch over claimed notifications: each step is a method, `settle` runs them."""

    def __init__(self, spool, rules, state_dir, force, dry_run=False, scanner=None, stores=None):
        self.spool, self.rules, self.state_dir, self.force, self.dry_run = spool, rules, state_dir, force, dry_run
        self.config_dir = spool.config_dir
        if stores is None:
            stores = state.Stores(state_dir)
        else:
            stores.refresh()
        self.stores = stores
        self.progress, self.unit_times, self.ledger = stores.progress, stores.unit_times, stores.ledger
        self.scanner = scanner or lineages.Scanner(self.config_dir, state_dir)
        self.scanned, self.facts = [], {}  # every lineage under live/, read once per batch
        self.fingerprints = {}  # entry -> fingerprint of the live certificate
        self.overdue_from = None  # when the next selected lineage becomes overdue (alarms.overdue_alarms)
        self.quarantined = []  # what the spool said of each entry it quarantined in this batch
        self.alerter = None  # alerts.Alerter, with an [alert] table
        self.prepublished = {}  # fleet host -> execute.Result of publishing before the actions ran
        self.said = {"drop": "dropped", "skip": "skipped", "defer": "deferred"}
        if dry_run:
            self.said = {word: "would " + word for word in self.said}

    @functools.cached_property
    def recorder(self):
        """status.json's Recorder, read when first needed: after the actions."""
        return status.Recorder(self.state_dir)

    def drop(self, notification):
        if not self.dry_run:
            self.spool.done(notification)

    def settle(self, notifications, problems):
        """Plan and carry out the batch; return the `Outcome`."""
        for problem in problems:
            logger.error("%s", problem)
        outcome = Outcome(quarantined=len(problems), dry_run=self.dry_run)
        self.quarantined = problems
        self.scanned = self.scanner.scan()
        self.facts = {lineage.name: lineage.facts for lineage in self.scanned}
        known = {lineage.name: lineage.fingerprint for lineage in self.scanned if lineage.fingerprint}
        changed = self.only_changed(notifications, outcome, known)
        changed += self.unannounced(changed, outcome)
        outcome.notifications = len(notifications)
        done = {entry: set(keys) for entry, keys in self.progress.data.items()}
        if not changed:  # the common case of cron and retry timers: nothing to plan
            self.progress.data = {}  # nothing is kept: what was kept is in `changed`
            if self.rules.fleet and not self.dry_run:
                self.publish_stale(outcome, time.time())
            return self.finish(outcome, time.time())
        from certrelay import plan as plan_module

        plan = plan_module.make_plan(changed, self.rules, self.config_dir, done)
        for notification in plan.unmatched:
            logger.warning("%s the notification for %s: no rule matches it", self.said["drop"], notification.name)
            outcome.unmatched += 1
            self.drop(notification)
        ready = self.not_deferred(plan.actions, outcome)
        outcome.actions = len(ready)
        results = {}
        if self.rules.fleet and not self.dry_run:  # every host's copy in few etcd requests, not one per host
            wanted = {action.target: action.certificates for action in ready if action.verb == "publish"}
            self.prepublished = self.publisher.publish_all(wanted) if wanted else {}
        if ready:
            from certrelay import execute  # subprocess: only batches with something to do pay for it

            results = execute.apply(ready, self.perform, self.dry_run)
        checks = self.checks_ready(changed, plan, done, results)
        if self.dry_run:
            for check in checks:
                logger.info("would verify that %s serves the live certificate of %s", check.endpoint.url, check.name)
            return outcome
        now = time.time()
        for action in ready:
            if action.verb in rules_module.UNIT_VERBS:
                self.unit_times.data[action.target] = now
            self.recorder.action(action, results[action.key], now)
        outcome.failed = sum(not result.ok for result in results.values())
        verdicts = self.verify(checks, ready, results, outcome)
        self.settle_notifications(changed, plan, done, results, verdicts, outcome)
        if self.rules.fleet:
            self.publish_stale(outcome, now)
        return self.finish(outcome, now)

    def finish(self, outcome, now):
        """Raise the alarms, save the state, write the metrics; return `outcome`."""
        if self.dry_run:
            return outcome
        scanned, rules, config_dir, clock = self.scanned, self.rules, self.config_dir, time.time()
        expiring = alarms.expiry_alarms(scanned, rules, clock)
        undated, outcome.undated = alarms.undated_alarms(scanned, rules, config_dir)
        overdue, overdue_names, self.overdue_from, due_at = alarms.overdue_alarms(scanned, rules, config_dir, clock)
        failed, failed_names = alarms.attempt_alarms(scanned, rules, config_dir, due_at, clock)
        problems = expiring + undated + overdue + failed
        if rules.fleet:
            problems += self.publisher.problems(clock)
        outcome.alarmed = alarms.sound(problems, self.recorder, clock)
        outcome.below_warning = len(expiring)
        outcome.overdue, outcome.failed_renewals = len(overdue_names), len(failed_names)
        self.stores.save()
        self.scanner.save()
        self.recorder.finished(now, self.progress.data)
        if rules.alert:
            from certrelay import alerts  # only rules with an [alert] table pay for it

            self.alerter = alerts.Alerter(rules.alert, self.state_dir, rules.settings["timeout"])
            problems += alerts.kept_problems(self.recorder.data["kept"])
            outcome.unsent = self.alerter.update(problems, alerts.quarantine_events(self.quarantined), clock,
                                                 outcome.ok)
        if self.rules.settings["metrics"]:
            taken = status.snapshot(self.config_dir, self.rules, self.state_dir, scanned=self.scanned)
            if rules.fleet:
                from certrelay.fleet import publish

                taken["fleet"] = publish.metric_rows(self.publisher)
            status.write_metrics(self.rules.settings["metrics"], taken)
        self.remember(outcome, now)
        return outcome

    def remember(self, outcome, now):
        """Leave the idle memo (idle.py) if this batch left nothing to do, else remove
        it. Not with metrics: a run that skips the batch would not rewrite them. Not
        with installs: their checks (users, groups, destination directories) depend on
        the host, not on the rules file's bytes, and every run must make them."""
        try:
            rules = self.rules
            # Not with a ping (every run pings) or a problem standing (only a batch sees
            # it clear) or an alert waiting to be sent.
            alerting = rules.alert and (rules.alert.ping or not self.alerter.quiet)
            # Not with a fleet: only a batch sees what etcd holds and acknowledges.
            if (outcome.settled and not self.progress.data and not rules.settings["metrics"] and not alerting
                    and not rules.fleet and not any(rule.install for rule in rules.rules)):
                # At least one full batch a day, which also checks the rules' surroundings again.
                until = alarms.warning_due(self.scanned, rules, min(now + idle.AT_LEAST_DAILY,
                                                                    self.overdue_from or float("inf")))
                idle.remember(self.state_dir, self.config_dir, rules, self.scanner.live, until)
            else:
                idle.forget(self.state_dir)
        except OSError as error:
            logger.warning("cannot update %s: %s", error.filename, error.strerror)

    def only_changed(self, notifications, outcome, known):
        """Return the notifications worth acting on: readable, and changed since the
        last action (or kept from an earlier run, or `force`); drop the rest. `known`
        holds the fingerprints the lineage scan just read: {name: fingerprint}."""
        changed = []
        for notification in notifications:
            name = notification.name
            try:
                self.fingerprints[notification.entry] = known.get(name) or certificate.fingerprint(self.config_dir, name)
            except certificate.CertificateError as error:
                reason = f"its live certificate cannot be read: {error}"
                if name not in self.facts:  # no live/NAME at all
                    reason = (f"there is no lineage {name} under live/: the container wrote a notification for a"
                              f" certificate this host does not have (is the container's /etc/letsencrypt"
                              f" {self.config_dir}?)")
                logger.error("%s the notification for %s: %s", self.said["drop"], name, reason)
                outcome.unreadable += 1
                if not self.dry_run:
                    self.recorder.dropped(name, reason, time.time())
                self.drop(notification)
                continue
            kept_before = notification.entry in self.progress.data
            fingerprint = self.fingerprints[notification.entry]
            recorded = self.ledger.data.get(name)
            if not self.force and not kept_before and (recorded == fingerprint or reconcile.recorded_before_der(
                    self.ledger, name, fingerprint, self.config_dir, self.dry_run)):
                logger.info("%s %s: its certificate did not change since the last action (--force acts anyway)",
                            self.said["skip"], name)
                outcome.unchanged += 1
                self.drop(notification)
                continue
            changed.append(notification)
        return changed

    def unannounced(self, changed, outcome):
        """Return notifications standing in for lineages renewed without one (reconcile)."""
        found = reconcile.find(self.scanned, self.config_dir, self.rules, self.ledger, {n.name for n in changed},
                               self.progress.data, self.dry_run)
        for notification, fingerprint in found:
            self.fingerprints[notification.entry] = fingerprint
        outcome.unannounced = len(found)
        return [notification for notification, _ in found]

    def not_deferred(self, actions, outcome):
        """Return the actions the per-unit minimum interval allows now."""
        now, interval = time.time(), self.rules.settings["min-interval"]
        ready = []
        for action in actions:
            allowed = 0
            if action.verb in rules_module.UNIT_VERBS:
                allowed = self.unit_times.data.get(action.target, 0) + interval
            if allowed > now:
                logger.info("%s %s: its last action was less than min-interval (%g s) ago",
                            self.said["defer"], action.describe(), interval)
                outcome.deferred_until = min(outcome.deferred_until or allowed, allowed)
            else:
                ready.append(action)
        return ready

    def checks_ready(self, changed, plan, done, results):
        """Return the checks whose rule's actions all succeeded (now or earlier), once each."""
        ready = {}
        for notification in changed:
            succeeded = done.get(notification.entry, set()) | {key for key, result in results.items() if result.ok}
            if self.dry_run:
                succeeded |= plan.needs.get(notification.entry, set())
            for check in plan.checks.get(notification.entry, ()):
                if check.actions <= succeeded:
                    ready.setdefault(check, None)
        return list(ready)

    def perform(self, action):
        """Carry out one plan.Action; return its execute.Result. Installs go to
        deliver.py, the rest to execute.py (which runs commands only)."""
        from certrelay import execute

        if action.verb == "install":
            from certrelay import deliver  # only batches with installs pay for it

            specification, name, values = action.payload
            return deliver.deliver(specification, self.config_dir, name, values)
        if action.verb == "publish":
            return self.prepublished.get(action.target) or self.publisher.publish(action.target, action.certificates)
        return execute.perform(action, self.rules.settings["timeout"])

    @functools.cached_property
    def publisher(self):
        """The fleet's publish.Publisher (rules with a [fleet] table), made when first needed."""
        from certrelay.fleet import publish  # only a certbot host with a fleet pays for it

        return publish.Publisher(self.rules.fleet, self.config_dir, self.state_dir)

    def publish_stale(self, outcome, now):
        """Publish what the fleet's hosts lack although no notification asked (a host
        added or re-keyed, a store that lost a key); count it in `outcome`."""
        from certrelay import plan as plan_module
        from certrelay.fleet import store

        try:
            done = self.publisher.catch_up(self.scanned)
        except store.StoreError as error:
            logger.error("fleet: cannot compare what was published with etcd: %s", error)
            outcome.failed += 1
            return
        for host, names, result in done:
            self.recorder.action(plan_module.Action("publish", host, tuple(names)), result, now)
            outcome.actions += 1
            outcome.failed += not result.ok

    def verify(self, checks, ready, results, outcome):
        """Verify `checks`, escalating where needed; return {check key: Verdict}."""
        if not checks:
            return {}
        from certrelay import verify  # sockets and TLS: only batches with endpoints pay for it

        done_verbs = {action.target: action.verb for action in ready
                      if action.verb in rules_module.UNIT_VERBS and results[action.key].ok}
        verdicts, restarted = verify.verify_and_escalate(checks, self.config_dir, self.rules.settings, done_verbs)
        now = time.time()
        for unit, result in restarted.items():
            self.unit_times.data[unit] = now
            self.recorder.unit_action("restart", unit, result, now)
        for verdict in verdicts:
            self.recorder.verdict(verdict, now)
        outcome.verified = sum(verdict.ok for verdict in verdicts)
        outcome.unverified = len(verdicts) - outcome.verified
        return {verdict.check.key: verdict for verdict in verdicts}

    def settle_notifications(self, changed, plan, done, results, verdicts, outcome):
        """Delete each notification whose every action and check succeeded (now or in
        an earlier run); keep the others with what they still need."""
        self.progress.data = {}
        actions = {action.key: action for action in plan.actions}
        for notification in changed:
            if notification in plan.unmatched:
                continue
            entry = notification.entry
            needed = plan.needs[entry]
            succeeded = set(done.get(entry, ()))
            succeeded |= {key for key in needed if key in results and results[key].ok}
            for check in plan.checks.get(entry, ()):
                if check.key in verdicts and verdicts[check.key].ok:
                    succeeded.add(check.key)
                elif check.key in verdicts:
                    succeeded -= check.actions  # the retry reruns the rule's actions, then verifies
            if needed <= succeeded:
                self.ledger.data[notification.name] = self.fingerprints[entry]
                self.ledger.changed = True
                facts = self.facts.get(notification.name) or {}
                self.recorder.acted(notification.name, time.time(), facts.get("sha256"))
                self.spool.done(notification)
                outcome.done += 1
                continue
            self.progress.data[entry] = sorted(succeeded)
            failed = [key for key in needed - succeeded if key in results or key in verdicts]
            self.recorder.kept(entry, notification.name, failed, results, verdicts, actions)
            if failed:
                outcome.kept += 1
                logger.warning("kept the notification for %s in %s; a later run retries what failed",
                               notification.name, self.spool.claimed)
            else:
                outcome.deferred += 1
