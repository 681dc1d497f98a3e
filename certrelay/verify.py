"""Prove on the wire that each endpoint serves the live certificate, and escalate.

After a batch's actions, every endpoint (`verify` in the rules) of every rule that
selected an acted-on certificate is probed until it serves the live certificate or
`verify-timeout` runs out, pausing longer between rounds (restarts take a moment).
Each ends as one of OUTCOMES:

    current      serves the lineage's live certificate
    old          serves a certificate the lineage had before (archive/NAME/certN.pem)
    other        serves a certificate of no lineage certrelay knows (wrong vhost, SNI, path)
    unreachable  no certificate: refused, timed out, no STARTTLS, ...

An endpoint still serving the *old* certificate after its units were only reloaded
gets those units restarted once (unless the rule says `escalate = false`), then is
verified again. *Other* and *unreachable* never lead to a restart here.
"""

import dataclasses
import logging
import time

from certrelay import certificate, durations, execute, probe

logger = logging.getLogger(__name__)

OUTCOMES = ("current", "old", "other", "unreachable")
ATTEMPT_TIMEOUT = 10.0  # seconds for one probe round's connect, dialogue and handshake
FIRST_PAUSE, LONGEST_PAUSE = 0.5, 5.0  # seconds between rounds, doubling
RELOADS = ("reload", "reload-or-restart")


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What one check found: `outcome` (one of OUTCOMES), what was `served`
    (probe.Served), and the `expected` fingerprint (None if the live certificate
    cannot be read)."""

    check: object  # plan.Check
    outcome: str
    served: object
    expected: str = None
    owner: str = None  # for "other": the lineage whose live certificate was served, if any
    live: str = None  # for a verdict not current: serial and expiry of the live certificate

    @property
    def ok(self):
        return self.outcome == "current"

    def describe(self):
        """Return one log line naming the endpoint, the certificate and what was served."""
        check = self.check
        units = ", ".join(unit for _, unit in check.units)
        where = check.endpoint.url + (f" (SNI {check.server_name})" if check.server_name else "")
        suffix = f" [{units}]" if units else ""
        if self.outcome == "unreachable":
            return (f"{where}: unreachable ({self.served.error}); is the service running and listening"
                    f" there?{suffix}")
        served = summary(self.served.der)
        if self.outcome == "current":
            return f"{where} serves the current certificate of {check.name} ({served}){suffix}"
        live = f" ({self.live})" if self.live else ""
        if self.outcome == "old":
            return (f"{where} still serves an OLD certificate of {check.name} ({served}), not the live one"
                    f"{live}{suffix}")
        owner = f"the live certificate of {self.owner}" if self.owner else "a certificate of no lineage certrelay knows"
        return (f"{where} serves {owner} ({served}), not the live one of {check.name}{live}: check the"
                f" service's certificate path, vhost or SNI{suffix}")


def summary(der):
    """Return "serial S, expires YYYY-MM-DD" for a DER certificate (or what failed)."""
    from certrelay import certinfo  # X.509 parsing: only when something was served

    try:
        info = certinfo.from_der(der)
    except certinfo.CertificateParseError as error:
        return f"unparsable certificate: {error}"
    return f"serial {info.serial}, expires {time.strftime('%Y-%m-%d', time.gmtime(info.not_after))}"


class Fingerprints:
    """The live and former DER fingerprints of lineages, read once per batch."""

    def __init__(self, config_dir):
        self.config_dir = config_dir
        self.live, self.former, self.owners = {}, {}, None

    def expected(self, name):
        """Return the DER fingerprint of live/NAME/cert.pem, or None if unreadable."""
        return self.live_der(name)[0]

    def live_der(self, name):
        """Return (DER fingerprint, DER) of live/NAME/cert.pem, or (None, None)."""
        if name not in self.live:
            try:
                der = certificate.pem_to_der(certificate.live_certificate(self.config_dir, name))
                self.live[name] = (certificate.sha256(der), der)
            except certificate.CertificateError as error:
                logger.error("cannot verify %s: its live certificate cannot be read: %s", name, error)
                self.live[name] = (None, None)
        return self.live[name]

    def classify(self, name, served):
        """Return the outcome for what `served` (probe.Served) holds, for lineage `name`."""
        if served.der is None:
            return "unreachable"
        if served.sha256 == self.expected(name):
            return "current"
        if name not in self.former:
            self.former[name] = certificate.archive_fingerprints(self.config_dir, name)
        return "old" if served.sha256 in self.former[name] else "other"

    def owner(self, sha256):
        """Return the name of the lineage whose live certificate has this DER
        fingerprint, or None."""
        if self.owners is None:
            from certrelay import lineages

            scanned = lineages.Scanner(self.config_dir, None).scan()
            self.owners = {lineage.info.sha256: lineage.name for lineage in scanned if lineage.info}
        return self.owners.get(sha256)


def verify(checks, config_dir, timeout, fingerprints=None, quiet=False, once=False, settings=None):
    """Probe `checks` (plan.Check) until each serves the live certificate or `timeout`
    seconds passed (one round only, if `once`); return their `Verdict`s in order,
    logging one line each unless `quiet` (and expiry alarms with `settings`)."""
    fingerprints = fingerprints or Fingerprints(config_dir)
    deadline = time.monotonic() + timeout
    verdicts, pending, pause = {}, list(dict.fromkeys(checks)), FIRST_PAUSE
    while pending:
        attempt = max(1.0, min(ATTEMPT_TIMEOUT, deadline - time.monotonic()))
        served = probe.fetch_many([(check.endpoint, check.server_name) for check in pending], attempt)
        for check, answer in zip(pending, served):
            outcome = fingerprints.classify(check.name, answer)
            owner = fingerprints.owner(answer.sha256) if outcome == "other" else None
            expected, der = fingerprints.live_der(check.name)
            live = summary(der) if der and outcome in ("old", "other") else None
            verdicts[check] = Verdict(check, outcome, answer, expected, owner, live)
        pending = [check for check in pending if not verdicts[check].ok]
        if not pending or once or time.monotonic() + pause >= deadline:
            break
        time.sleep(pause)
        pause = min(pause * 2, LONGEST_PAUSE)
    if not quiet:
        for check in dict.fromkeys(checks):
            log(verdicts[check], settings)
    return [verdicts[check] for check in checks]


def log(verdict, settings=None):
    """Log one line for a verdict: info when current, else an error. With `settings`,
    also an error when the served certificate is below `expiry-warning`."""
    if verdict.ok:
        logger.info("verified: %s", verdict.describe())
    else:
        logger.error("not current: %s", verdict.describe())
    if settings and verdict.served.der:
        expiry_alarm(verdict, settings)


def expiry_alarm(verdict, settings):
    """Log an error if the certificate `verdict` saw served is close to expiry."""
    from certrelay import certinfo

    try:
        info = certinfo.from_der(verdict.served.der)
    except certinfo.CertificateParseError:
        return
    now = time.time()
    level = durations.level(info, now, settings["expiry-warning"], settings["expiry-critical"])
    if level != "ok":
        logger.error("%s serves a certificate that expires in %.1f days (%s): see to it before clients refuse it",
                     verdict.check.endpoint.url, info.days_left(now), level)


def verify_and_escalate(checks, config_dir, settings, done_verbs):
    """Verify `checks` after a batch; restart once the units of those still serving an
    old certificate that were only reloaded (`done_verbs`: {unit: verb done in this
    batch}), then verify those again.

    Return (verdicts, {unit: execute.Result of its escalation restart}).
    """
    fingerprints = Fingerprints(config_dir)
    timeout = settings["verify-timeout"]
    verdicts = verify(checks, config_dir, timeout, fingerprints, quiet=True)
    units, stale = {}, []
    for verdict in verdicts:
        reloaded = [unit for verb, unit in verdict.check.units if done_verbs.get(unit, verb) in RELOADS]
        if verdict.outcome == "old" and verdict.check.escalate and reloaded:
            stale.append(verdict)
            logger.warning("%s after a reload: escalating to a restart", verdict.describe())
            for unit in reloaded:
                units.setdefault(unit, verdict.check)
        else:
            log(verdict, settings)
    if not units:
        return verdicts, {}
    restarted = {}
    for unit, check in units.items():
        restarted[unit] = execute.systemctl("restart", unit, settings["timeout"])
        if restarted[unit].ok:
            logger.info("done: restart %s (%s)", unit, check.name)
        else:
            logger.error("failed: restart %s (%s): %s", unit, check.name, restarted[unit].detail)
    again = [verdict.check for verdict in stale]
    fresh = dict(zip(again, verify(again, config_dir, timeout, fingerprints, quiet=True)))
    for verdict in fresh.values():
        log(verdict, settings)
    return [fresh.get(verdict.check, verdict) for verdict in verdicts], restarted
