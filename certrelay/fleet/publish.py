"""The certbot host's side of the fleet: publish each host's lineages to etcd, sealed.

A batch calls `Publisher.publish(host, names)` as one action per host (plan.py: verb
"publish"), claimed, kept and retried like a restart; `stale()` finds what the
notifications did not cover (a host newly added or re-keyed, a store that lost a key)
and `problems()` what the hosts have not acknowledged within `ack-timeout`.

STATE_DIR/fleet.json ("published": {host: {name: {fingerprint, sequence, recipient,
revision, time}}}) remembers what was published; etcd stays the truth, which `stale`
and `fleet status` read.
"""

import json
import logging
import time

from certrelay import certificate, execute, state
from certrelay.fleet import config as fleet_config

logger = logging.getLogger(__name__)

FILES = ("cert.pem", "chain.pem", "fullchain.pem", "privkey.pem")
MAX_FILE = 256 * 1024  # bytes: a PEM file of a lineage; the container writes them
FLEET_PROBLEM = "*fleet"  # alarm key of the store being unreachable; no lineage name has a "*"
UNACKNOWLEDGED = "fleet "  # alarm key prefix, then "HOST/NAME"
# Seconds per etcd request. Not the `timeout` setting (120 s, for systemctl): behind a
# firewall that drops packets each request would wait that long, and a batch makes three.
STORE_TIMEOUT = 15.0


def lineage_key(host, name):
    return fleet_config.lineages_prefix(host) + name


def read_lineage(config_dir, name):
    """Return {file name: bytes} of live/NAME under `config_dir`, read without leaving it.
    Raise certificate.CertificateError saying which file cannot be read."""
    with certificate.Tree(config_dir) as tree:
        return {file: tree.read(f"live/{name}/{file}", MAX_FILE) for file in FILES}


class Publisher:
    """Publishes for one batch: the [fleet] `fleet`, certbot's `config_dir`, STATE_DIR."""

    def __init__(self, fleet, config_dir, state_dir, timeout=STORE_TIMEOUT):
        self.fleet, self.config_dir, self.timeout = fleet, config_dir, timeout
        self.hosts = {host.name: host for host in fleet.hosts}
        self.ledger = state.Store(state_dir, "fleet.json")
        self._store = self._signing_key = None
        self.unreachable = None  # the StoreError of a request that could not reach etcd: the batch's later ones fail at once
        self.acks = None  # what `problems` read: {(host, name): ack}, or None if it could not

    @property
    def published(self):
        """{host: {name: what was published}}, from STATE_DIR/fleet.json."""
        return self.ledger.data.setdefault("published", {})

    def etcd(self, method, *arguments, **options):
        """Call store.Store's `method`; once one call of this batch could not reach etcd
        (not a refusal), fail the others at once with its error. Raise store.StoreError."""
        from certrelay.fleet import store

        if self.unreachable is not None:
            raise self.unreachable
        try:
            if self._store is None:
                self._store = self.fleet.connection.store(self.timeout)
            return getattr(self._store, method)(*arguments, **options)
        except store.Denied:
            raise
        except store.StoreError as error:
            self.unreachable = error
            raise

    def signing_key(self):
        from certrelay.fleet import seal

        if self._signing_key is None:
            self._signing_key = seal.load_signing_key(self.fleet.signing_key)
        return self._signing_key

    def publish(self, host, names):
        """Seal live/NAME of each of `names` for `host` and put them; return an
        execute.Result (a failure says what failed and how to fix it)."""
        return self.publish_all({host: names})[host]

    def publish_all(self, wanted):
        """Publish {host: names} in as few etcd transactions as their size allows (one
        per 128 values): a renewal for 1,000 hosts is a few requests, not 1,000.
        Return {host: execute.Result}; a host whose files cannot be sealed fails alone,
        etcd refusing fails every host (each is published again by the next batch)."""
        from certrelay.fleet import seal, store

        results, items, sealed = {}, {}, {}
        try:
            signing_key = self.signing_key()
        except seal.KeyFileError as error:
            return {host: execute.Result(False, f"cannot publish to {host}: {error}") for host in wanted}
        files, infos = {}, {}  # per lineage, read and checked once for all its hosts
        for host, names in wanted.items():
            try:
                recipient = seal.parse_recipient(self.hosts[host].recipient)
                previous = self.published.get(host, {})
                for name in names:
                    if name not in files:
                        files[name] = read_lineage(self.config_dir, name)
                        infos[name] = seal.checked(files[name])
                    # Monotonic per host and lineage, even across a lost state file: the clock.
                    sequence = max(time.time_ns() // 1000, previous.get(name, {}).get("sequence", 0) + 1)
                    value = seal.seal(signing_key, recipient, host, name, files[name], sequence, info=infos[name])
                    items[lineage_key(host, name)] = value
                    sealed.setdefault(host, {})[name] = (seal.peek(value)["fingerprint"], sequence)
            except (certificate.CertificateError, ValueError) as error:
                results[host] = execute.Result(False, f"cannot publish to {host}: {error}")
                sealed.pop(host, None)
                for name in names:
                    items.pop(lineage_key(host, name), None)
        if not sealed:
            return results
        try:
            revision = self.etcd("put_many", items)
        except store.StoreError as error:
            results.update({host: execute.Result(False, f"cannot publish to {host}: {error}") for host in sealed})
            return results
        now = time.time()
        for host, names in sealed.items():
            entry = self.published.setdefault(host, {})
            for name, (fingerprint, sequence) in names.items():
                entry[name] = {"fingerprint": fingerprint, "sequence": sequence, "revision": revision,
                               "recipient": self.hosts[host].recipient, "time": now}
            results[host] = execute.Result(True, f"etcd revision {revision}")
        self.save()
        return results

    def save(self):
        try:
            self.ledger.save()
        except OSError as error:
            logger.warning("cannot save %s: %s", self.ledger.path, error.strerror)

    def wanted(self, scanned):
        """Return {(host, name): fingerprint} for each lineage of `scanned` a host gets."""
        return {(host.name, lineage.name): lineage.fingerprint for lineage in scanned if lineage.fingerprint
                for host in self.fleet.hosts if host.selects(lineage.name, lineage.domains)}

    def stale(self, scanned):
        """Return {host: [names]} to publish although no notification asked: not
        published as live/ has it, to the host's current key, or gone from the store.
        Raise store.StoreError if the store cannot be read."""
        wanted = self.wanted(scanned)
        _, present = self.etcd("range", fleet_config.PREFIX + "hosts/", keys_only=True)
        keys = {kv.key for kv in present}
        found = {}
        for (host, name), fingerprint in sorted(wanted.items()):
            was = self.published.get(host, {}).get(name, {})
            if (was.get("fingerprint") != fingerprint or was.get("recipient") != self.hosts[host].recipient
                    or lineage_key(host, name) not in keys):
                found.setdefault(host, []).append(name)
        return found

    def catch_up(self, scanned):
        """Publish what `stale` finds; log each; return [(host, names, execute.Result)].
        Raise store.StoreError if the store cannot be read."""
        stale = self.stale(scanned)
        results = self.publish_all(stale) if stale else {}
        for host, names in stale.items():
            if results[host].ok:  # as execute.apply says it, and why
                logger.info("done: publish %s (%s): %s; it lacked them", host, ", ".join(names), results[host].detail)
            else:
                logger.error("%s", results[host].detail)
        return [(host, names, results[host]) for host, names in stale.items()]

    def acknowledgements(self):
        """Return {(host, name): the ack dict} read from the store (an unreadable ack:
        {"error": why}). Raise store.StoreError."""
        _, found = self.etcd("range", fleet_config.PREFIX + "acks/")
        acks = {}
        for kv in found:
            host, _, name = kv.key[len(fleet_config.PREFIX + "acks/"):].partition("/")
            try:
                ack = json.loads(kv.value)
                if not isinstance(ack, dict):
                    raise ValueError("not a JSON object")
            except ValueError as error:
                ack = {"error": f"unreadable acknowledgement: {error}"}
            acks[host, name] = ack
        return acks

    def problems(self, now):
        """Return the alarms.Problems at `now`: each host and lineage published more than
        `ack-timeout` ago that the host does not acknowledge serving, and a store that
        cannot be read."""
        from certrelay import alarms
        from certrelay.fleet import store

        try:
            acks = self.acks = self.acknowledgements()
        except store.StoreError as error:
            return [alarms.Problem(FLEET_PROBLEM, "fleet store unreachable",
                                   f"fleet: cannot read the acknowledgements from etcd: {error}")]
        found = []
        for host, names in sorted(self.published.items()):
            if host not in self.hosts:
                continue
            for name, was in sorted(names.items()):
                ack = acks.get((host, name), {})
                if ack_state(ack, was) == "current" or now - was.get("time", now) < self.fleet.ack_timeout:
                    continue
                found.append(alarms.Problem(
                    UNACKNOWLEDGED + host + "/" + name, f"{host} does not serve {name}",
                    f"fleet: {host} has not acknowledged serving {name} ({was.get('fingerprint', '?')[:16]}...)"
                    f" published {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(was.get('time', now)))}:"
                    f" {describe_ack(ack)}; on {host}: certrelay status, journalctl -u certrelay-subscribe"))
        return found


def metric_rows(publisher):
    """Return, for metrics.py, a dict per host and lineage published: host, name,
    published (epoch) and current (1 if the host acknowledges serving it, 0 if not,
    None if the acknowledgements could not be read)."""
    rows = []
    for host, names in sorted(publisher.published.items()):
        if host in publisher.hosts:
            for name, was in sorted(names.items()):
                current = None if publisher.acks is None else int(
                    ack_state(publisher.acks.get((host, name), {}), was) == "current")
                rows.append({"host": host, "name": name, "published": was.get("time"), "current": current})
    return rows


def ack_state(ack, published):
    """Return "current" if the ack says the host serves the `published` fingerprint
    (every endpoint verified), else why not in a word: "pending", "failed", "old",
    "none"."""
    if not ack:
        return "none"
    if ack.get("error"):
        return "failed"
    if ack.get("fingerprint") != published.get("fingerprint"):
        return "old"
    return ack.get("state") if ack.get("state") in ("current", "pending", "failed") else "failed"


def describe_ack(ack):
    """Return a few words on what an ack says."""
    if not ack:
        return "no acknowledgement at all (is certrelay-subscribe running there?)"
    if ack.get("error"):
        return ack["error"]
    said = f"it acknowledges {str(ack.get('fingerprint'))[:16]}... as {ack.get('state')}"
    if ack.get("reason"):
        said += f" ({ack['reason']})"
    return said
