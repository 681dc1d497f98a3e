"""What certrelay did and what stands: the record of runs, expiry alarms, snapshots.

`Recorder` keeps STATE_DIR/status.json: the last run, each unit's last action and
its outcome, action counters (for metrics), each endpoint's last verification, the
failures of kept notifications, when each lineage was last acted on, and when each
alarm was last raised (alarms.py). `snapshot()` joins it with the live certificates, the
spool and the rules into the dict that report.py renders and metrics.py exports.
"""

import logging
import os
import time

from certrelay import durations, idle, lineages, renewal, spool as spool_module, state

logger = logging.getLogger(__name__)

DROPPED_FOR = 7 * 86400  # seconds `status` shows a dropped notification, unless the lineage is acted on

class Recorder:
    """Records a batch's events into STATE_DIR/status.json; `finished` saves it."""

    def __init__(self, state_dir):
        self.state_dir = state_dir
        # Tracked: every batch ends in finished(), which always changes last_run.
        self.store = state.Store(state_dir, "status.json", tracked=True)
        for key in ("units", "actions_total", "endpoints", "kept", "acted", "alarms", "installs", "dropped"):
            if not isinstance(self.store.data.get(key), dict):
                self.store.data[key] = {}

    @property
    def data(self):
        return self.store.data

    def action(self, action, result, now):
        """Record the `result` of a plan.Action done at `now`."""
        if action.verb == "install":
            outcome = "success" if result.ok else "failure"
            self.data["installs"].setdefault(action.payload[1], {})[action.target] = {
                "result": outcome, "time": now, "detail": result.detail}
        if action.verb in ("run", "precheck", "install", "publish"):
            target = " ".join(action.target) if isinstance(action.target, tuple) else action.target
            self.count(target, action.verb, result)
        else:
            self.unit_action(action.verb, action.target, result, now)

    def unit_action(self, verb, unit, result, now):
        """Record the `result` of `systemctl VERB UNIT` done at `now`."""
        outcome = "success" if result.ok else "failure"
        self.data["units"][unit] = {"verb": verb, "result": outcome, "time": now,
                                    "error": None if result.ok else result.detail}
        self.count(unit, verb, result)

    def count(self, target, verb, result):
        counter = "\t".join((target, verb, "success" if result.ok else "failure"))
        self.data["actions_total"][counter] = self.data["actions_total"].get(counter, 0) + 1

    def verdict(self, verdict, now):
        """Record a verify.Verdict checked at `now`."""
        from certrelay import certinfo

        served_serial = served_not_after = None
        if verdict.served.der:
            try:
                info = certinfo.from_der(verdict.served.der)
                served_serial, served_not_after = info.serial, info.not_after
            except certinfo.CertificateParseError:
                pass
        self.data["endpoints"].setdefault(verdict.check.name, {})[verdict.check.key] = {
            "endpoint": verdict.check.endpoint.url, "outcome": verdict.outcome,
            "served_sha256": verdict.served.sha256, "served_serial": served_serial,
            "served_not_after": served_not_after, "error": verdict.error, "checked": now,
        }

    def acted(self, name, now, sha256):
        """Record that every action for lineage `name` succeeded at `now`, for the
        certificate whose DER fingerprint is `sha256` (None if unknown)."""
        self.data["acted"][name] = {"time": now, "sha256": sha256}
        self.data["dropped"].pop(name, None)

    def dropped(self, name, reason, now):
        """Record that a notification for `name` was dropped at `now` because of `reason`
        (its live certificate cannot be read): `status` shows it for DROPPED_FOR."""
        self.data["dropped"][name] = {"time": now, "reason": reason}

    def kept(self, entry, name, failed, results, verdicts, actions):
        """Record why the notification `entry` of `name` is kept: its `failed` keys
        (`actions`: {key: plan.Action}, for naming them)."""
        previous = self.data["kept"].get(entry, {}).get("attempts", 0)
        reasons = []
        for key in failed:
            if key in results:
                action = actions[key]
                target = " ".join(action.target) if isinstance(action.target, tuple) else action.target
                reasons.append({"action": f"{action.verb} {target}", "error": results[key].detail})
            elif key in verdicts:
                reasons.append({"action": "verify " + verdicts[key].check.endpoint.url,
                                "error": verdicts[key].describe()})
        if reasons:
            self.data["kept"][entry] = {"name": name, "failed": reasons, "attempts": previous + 1}

    def finished(self, now, progress):
        """Note the end of a batch at `now`, forget the failures of notifications no
        longer kept (`progress`: the batch's {entry: done keys}, which names every
        notification still kept), and save."""
        self.data["last_run"] = now
        self.store.changed = True
        self.data["kept"] = {entry: value for entry, value in self.data["kept"].items() if entry in progress}
        self.data["dropped"] = {name: value for name, value in self.data["dropped"].items()
                                if now - value.get("time", 0) < DROPPED_FOR}
        self.store.save()


def snapshot(config_dir, rules, state_dir, error=None, scanned=None):
    """Return the snapshot dict documented in report.py for `config_dir` under
    `rules` (None with `error` when the rules cannot be read). `scanned`: the
    lineages a batch just read (lineages.Lineage), else they are read here."""
    now = time.time()
    data = state.Store(state_dir, "status.json").data if os.path.isdir(state_dir) else {}
    # A run that found nothing changed touches the idle memo instead of status.json.
    last_run = max(filter(None, (data.get("last_run"), idle.last_checked(state_dir))), default=None)
    taken = {"time": now, "last_run": last_run, "error": error, "certificates": [], "units": [],
             "notifications": {"pending": 0, "kept": 0, "deferred": 0}, "actions_total": []}
    dropped = data.get("dropped") if isinstance(data.get("dropped"), dict) else {}
    taken["dropped"] = [{"name": name, "time": value.get("time"), "reason": value.get("reason")}
                        for name, value in sorted(dropped.items()) if now - value.get("time", 0) < DROPPED_FOR]
    for counter, count in sorted((data.get("actions_total") or {}).items()):
        unit, verb, result = counter.split("\t")
        taken["actions_total"].append({"unit": unit, "verb": verb, "result": result, "count": count})
    for unit, last in sorted((data.get("units") or {}).items()):
        taken["units"].append({"unit": unit, **last})
    alerts = state.Store(state_dir, "alerts.json").data if os.path.isfile(os.path.join(state_dir, "alerts.json")) \
        else {}
    outbox = alerts.get("outbox") if isinstance(alerts.get("outbox"), list) else []
    taken["unsent_alerts"] = [str(entry.get("subject")) for entry in outbox if isinstance(entry, dict)]
    if rules is None:
        return taken
    pending, claimed = spool_names(config_dir)
    progress = state.Store(state_dir, "progress.json").data if os.path.isdir(state_dir) else {}
    kept = data.get("kept") or {}
    ledger = state.Store(state_dir, "ledger.json").data if os.path.isdir(state_dir) else {}
    if scanned is None:
        scanned = lineages.Scanner(config_dir, state_dir).scan()
    for lineage in scanned:
        if not rules.selects(lineage.name, lineage.domains):
            continue
        entries = [entry for entry in claimed if entry.partition("@")[0] == lineage.name]
        entries += [entry for entry in progress if entry == lineage.name + "@reconcile"]
        failures = [reason for entry in entries for reason in kept.get(entry, {}).get("failed", [])]
        attempts = max([kept.get(entry, {}).get("attempts", 0) for entry in entries] or [0])
        if lineage.name in pending:
            state_word = "pending"
        elif entries and failures:
            state_word = "kept"
        elif entries:
            state_word = "deferred"
        elif lineage.error:
            state_word = "unreadable"
        elif ledger.get(lineage.name) == lineage.fingerprint:
            state_word = "current"
        else:
            state_word = "unknown"
        taken["certificates"].append(certificate_entry(
            lineage, state_word, rules.settings, now, data, failures, attempts, config_dir,
        ))
    for entry in claimed:
        key = "kept" if kept.get(entry) else "deferred"
        taken["notifications"][key] += 1
    taken["notifications"]["pending"] = len(pending)
    return taken


def certificate_entry(lineage, state_word, settings, now, data, failures, attempts, config_dir):
    """Return the snapshot's dict for one lineage; its renewal policy is read from
    `config_dir` (renewal.py)."""
    info = lineage.info
    entry = {
        "name": lineage.name, "domains": list(lineage.domains), "sha256": None, "serial": None,
        "not_before": None, "not_after": None, "days_left": None, "fraction_left": None, "level": None,
        "warning_days": None, "critical_days": None, "state": state_word, "error": lineage.error,
        "renew_at": None, "overdue": None, "renewal_error": None,
        "acted": (data.get("acted") or {}).get(lineage.name),
        "kept": [{**failure, "attempts": attempts} for failure in failures],
        "endpoints": list(((data.get("endpoints") or {}).get(lineage.name) or {}).values()),
        "installs": [{"dest": dest, **last} for dest, last in
                     sorted(((data.get("installs") or {}).get(lineage.name) or {}).items())],
    }
    if info is not None:
        warning, critical = settings["expiry-warning"], settings["expiry-critical"]
        entry.update(
            sha256=info.sha256, serial=info.serial, not_before=info.not_before, not_after=info.not_after,
            days_left=info.days_left(now), fraction_left=info.fraction_left(now),
            level=durations.level(info, now, warning, critical),
            warning_days=warning.seconds(info.lifetime) / 86400, critical_days=critical.seconds(info.lifetime) / 86400,
        )
        try:
            renew_at, _ = renewal.renew_at(config_dir, lineage)
            entry.update(renew_at=renew_at, overdue=renew_at is not None and now > renew_at + settings["overdue-grace"])
        except renewal.PolicyError as error:
            entry["renewal_error"] = str(error)
    return entry


def spool_names(config_dir):
    """Return (pending names, claimed entries) of the spool, both as sets ({} if none)."""
    spool = spool_module.Spool(config_dir)
    try:
        return set(spool.pending_names()), set(spool.claimed_entries())
    except OSError:
        return set(), set()


def write_metrics(path, taken):
    """Rewrite the Prometheus textfile `path` from the snapshot `taken`; log a failure."""
    from certrelay import metrics

    try:
        metrics.write(path, metrics.render(taken))
    except OSError as error:
        logger.error("cannot write the metrics file %s: %s", path, error.strerror or error)
