"""Prove on the wire that each endpoint serves the live certificate, and escalate.

After a batch's actions, every endpoint (`verify` in the rules) of every rule that
selected an acted-on certificate is probed until it serves the live certificate or
`verify-timeout` runs out, pausing longer between rounds (restarts take a moment).
Each ends as one of OUTCOMES:

    current      serves the lineage's live certificate, with the intermediates of its chain.pem
    chain        serves the live certificate with other intermediates than chain.pem's
    old          serves a certificate the lineage had before (archive/NAME/certN.pem)
    other        serves a certificate of no lineage certrelay knows (wrong vhost, SNI, path)
    unreachable  no certificate: refused, timed out, no STARTTLS, ...

An endpoint still serving the *old* certificate, or the live one with a stale *chain*,
after its units were only reloaded gets those units restarted once (unless the rule
says `escalate = false`), then is verified again. *Other* and *unreachable* never lead
to a restart here.
"""

import dataclasses
import logging
import time

from certrelay import certificate, durations, execute, probe

logger = logging.getLogger(__name__)

OUTCOMES = ("current", "chain", "old", "other", "unreachable")
#: Outcomes after which a reload is escalated to one restart. A stale chain is there
#: too: the leaf was read anew but the intermediates were not, which is what a reload
#: that did not fully take looks like for a service that reads cert.pem and chain.pem
#: apart or keeps its chain in memory (an old intermediate after Let's Encrypt changed
#: them: clients fail to build the path). A restart reads every file again and is the
#: fix the log line gives anyway; one restart is what `old` costs too, `escalate =
#: false` turns both off, and a chain that a restart does not fix (a copy of an old
#: chain.pem) stays an error naming both chains, never a loop of restarts.
ESCALATING = ("old", "chain")
ATTEMPT_TIMEOUT = 10.0  # seconds for one probe round's connect, dialogue and handshake
FIRST_PAUSE, LONGEST_PAUSE = 0.5, 5.0  # seconds between rounds, doubling
RELOADS = ("reload", "reload-or-restart")
PEM_BEGIN, PEM_END = b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----"
#: What to do about each kind of failure (probe.FAILURES) that left an endpoint
#: unreachable; {scheme} is the endpoint's.
HINTS = {
    "resolve": "the host name does not resolve here: check it, or write the address",
    "refused": "nothing listens there: is the service running, and listening on this address and port?",
    "timeout": ("nothing answered: a firewall drops the packets, or the address is wrong; is the service"
                " running and listening there?"),
    "blocked": ("the system refused to connect: certrelay's hardened units reach loopback only; for this"
                " address, systemctl edit certrelay.service and add IPAddressAllow=ADDRESS"),
    "no-route": "no route to that address: is the address right, and is the network up?",
    "silent": ("the service accepted the connection, then said nothing in time: is it overloaded or hung,"
               " and does it speak {scheme} on this port?"),
    "closed": ("the service closed the connection: does it speak {scheme} on this port, and does it let"
               " this client in (connection limits, access rules, fail2ban)?"),
    "tls": ("the TLS handshake failed: does this port speak {scheme} ({mode}), and has the service a"
            " certificate and key for this name?"),
    "protocol": ("the server's own words are quoted: does the service offer TLS there, and is {scheme}"
                 " the protocol it speaks on this port?"),
    "config": "fix the endpoint in the rules",
    "unexpected": "nothing certrelay foresaw: please report this line",
}


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
    chain: tuple = None  # for "chain": (the intermediates served, those of chain.pem), DERs

    @property
    def ok(self):
        return self.outcome == "current"

    @property
    def error(self):
        """Why the endpoint is not current, for status and JSON: the probe's error, else
        (old, other, chain) the log line; None if it is current."""
        return None if self.ok else self.served.error or self.describe()

    def describe(self):
        """Return one log line naming the endpoint, the certificate and what was served."""
        check = self.check
        units = ", ".join(unit for _, unit in check.units)
        where = check.endpoint.url + (f" (SNI {check.server_name})" if check.server_name else "")
        suffix = f" [{units}]" if units else ""
        if self.outcome == "unreachable":
            return f"{where}: unreachable ({self.served.error}); {hint(self.served)}{suffix}"
        served = summary(self.served.der)
        if self.outcome == "current":
            return f"{where} serves the current certificate of {check.name} ({served}){suffix}"
        if self.outcome == "chain":
            fix = f"reload or restart {units}" if units else "reload or restart the service"
            return (f"{where} serves the current certificate of {check.name} ({served}) with a stale chain"
                    f" (intermediates served: {certificates(self.chain[0])}; chain.pem:"
                    f" {certificates(self.chain[1])}): {fix} so that it reads chain.pem or fullchain.pem"
                    f" again, not a copy of an old one{suffix}")
        live = f" ({self.live})" if self.live else ""
        if self.outcome == "old":
            return (f"{where} still serves an OLD certificate of {check.name} ({served}), not the live one"
                    f"{live}: it has not loaded the new one. A service in a container whose certificate is"
                    f" bind-mounted as a single file keeps the old file after every renewal, reload or not:"
                    f" mount the directory (e.g. -v /etc/letsencrypt:/etc/letsencrypt:ro), not the file{suffix}")
        owner = f"the live certificate of {self.owner}" if self.owner else "a certificate of no lineage certrelay knows"
        return (f"{where} serves {owner} ({served}), not the live one of {check.name}{live}: check the"
                f" service's certificate path, vhost or SNI{suffix}")


def hint(served):
    """Return what to do about an unreachable endpoint, by the kind of its failure."""
    from certrelay import endpoint as endpoint_module

    scheme = served.endpoint.scheme
    mode = "TLS from the first byte" if endpoint_module.SCHEMES[scheme][1] == "tls" else "STARTTLS"
    return HINTS.get(served.failure, HINTS["refused"]).format(scheme=f"{scheme}://", mode=mode)


def certificates(ders):
    """Return "CN=R11 (sha256 1a2b3c4d5e6f), ..." for DER certificates, or "none"."""
    return ", ".join(f"{_subject(der)} (sha256 {certificate.sha256(der)[:12]})" for der in ders) or "none"


def _facts(der):
    """Return (subject, self-signed?) of a DER certificate; ("unparsable", False) if
    it cannot be read (python3-cryptography missing included)."""
    try:
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        parsed = x509.load_der_x509_certificate(der)
    except (ImportError, ValueError):
        return "unparsable", False
    names = parsed.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    subject = f"CN={names[0].value}" if names else (parsed.subject.rfc4514_string() or "no subject")
    return subject, parsed.subject == parsed.issuer


def _subject(der):
    return _facts(der)[0]


def intermediates(ders, leaf):
    """Return the set of DER certificates among `ders` that a client needs from the
    server to reach its roots: without the `leaf` itself and without self-signed roots
    (clients have their own; some servers send them, which costs bytes, not trust)."""
    return frozenset(der for der in ders if der != leaf and not _facts(der)[1])


def pem_certificates(data):
    """Return the DER of each PEM certificate in `data` (bytes), in order; raise
    certificate.CertificateError for a block that is not one."""
    ders, position = [], 0
    while (begin := data.find(PEM_BEGIN, position)) >= 0:
        end = data.find(PEM_END, begin)
        if end < 0:
            break
        position = end + len(PEM_END)
        ders.append(certificate.pem_to_der(data[begin:position]))
    return ders


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
        self.live, self.former, self.chains, self.owners = {}, {}, {}, None

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

    def live_chain(self, name):
        """Return the DER certificates of live/NAME/chain.pem, or None if it cannot be
        read (a lineage without one: nothing to compare with)."""
        if name not in self.chains:
            try:
                data = certificate.read_beneath(self.config_dir, f"live/{name}/chain.pem",
                                                certificate.MAX_CERTIFICATE)
                self.chains[name] = pem_certificates(data)
            except certificate.CertificateError as error:
                logger.debug("not comparing the chains served for %s: %s", name, error)
                self.chains[name] = None
        return self.chains[name]

    def stale_chain(self, name, served):
        """Return (intermediates served, intermediates of chain.pem) as sorted tuples of
        DER if they differ for `served` (the live leaf), else None (None too when either
        is unknown)."""
        expected = self.live_chain(name)
        if served.chain is None or expected is None:
            return None
        sent, wanted = intermediates(served.chain, served.der), intermediates(expected, served.der)
        if sent == wanted:
            return None
        return tuple(der for der in served.chain if der in sent), tuple(der for der in expected if der in wanted)

    def classify(self, name, served):
        """Return the outcome for what `served` (probe.Served) holds, for lineage `name`."""
        if served.der is None:
            return "unreachable"
        if served.sha256 == self.expected(name):
            return "chain" if self.stale_chain(name, served) else "current"
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
            chain = fingerprints.stale_chain(check.name, answer) if outcome == "chain" else None
            verdicts[check] = Verdict(check, outcome, answer, expected, owner, live, chain)
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
        logger.error("%s: %s", "stale chain" if verdict.outcome == "chain" else "not current", verdict.describe())
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
    old certificate or a stale chain (ESCALATING) that were only reloaded (`done_verbs`:
    {unit: verb done in this batch}), then verify those again.

    Return (verdicts, {unit: execute.Result of its escalation restart}).
    """
    fingerprints = Fingerprints(config_dir)
    timeout = settings["verify-timeout"]
    verdicts = verify(checks, config_dir, timeout, fingerprints, quiet=True)
    units, stale = {}, []
    for verdict in verdicts:
        reloaded = [unit for verb, unit in verdict.check.units if done_verbs.get(unit, verb) in RELOADS]
        if verdict.outcome in ESCALATING and verdict.check.escalate and reloaded:
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
