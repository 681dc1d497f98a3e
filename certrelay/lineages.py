"""Every lineage under live/: its fingerprint and what its certificate says, cheaply.

Reconcile, the expiry alarms, `status` and `verify` look at every live certificate on
every run. A stat of live/NAME/cert.pem (the link and its target) decides whether the
file must be read and hashed again; what the certificate says (dates, domains) is
parsed with python3-cryptography only for a certificate not seen before. Both are kept
in STATE_DIR/lineages.json; a lost cache only costs reading again.
"""

import dataclasses
import errno
import functools
import logging
import os

from certrelay import certificate, files, idle, spool, state

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Lineage:
    """One live/NAME: `fingerprint` (SHA-256 of its certificate's DER, as the ledger
    keeps it and `openssl x509 -fingerprint -sha256` prints it) and `facts`
    (certinfo.CertInfo.to_json() of its certificate), or `error`
    saying why they are unknown (the fingerprint is known if only the X.509
    parse failed). `no_cryptography`: the parse failed only because python3-cryptography
    is missing (the file may well be a good certificate). `info` makes the CertInfo
    only when asked: at ten thousand lineages, most runs need only the dates and the
    fingerprint."""

    name: str
    fingerprint: str = None
    facts: dict = None
    error: str = None
    no_cryptography: bool = False

    @functools.cached_property
    def info(self):
        from certrelay import certinfo

        return certinfo.CertInfo.from_json(self.facts) if self.facts else None

    @property
    def domains(self):
        return tuple(self.facts["domains"]) if self.facts else ()

    @property
    def not_before(self):
        return self.facts["not_before"]

    @property
    def not_after(self):
        return self.facts["not_after"]


def open_live(config_dir):
    """Return a descriptor of CONFIG_DIR/live, or None if it is missing or not a plain
    directory (the container writes it)."""
    try:
        return os.open(os.path.join(config_dir, "live"), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None


def valid_facts(facts):
    """Return True if a cached entry's `facts` has what `Lineage` reads from it (the
    rest is checked when `info` is made)."""
    return (
        type(facts) is dict and type(facts.get("domains")) is list
        and type(facts.get("not_before")) is float and type(facts.get("not_after")) is float
    )


class Scanner:
    """Reads lineages through the cache in STATE_DIR/lineages.json (in memory only
    when `state_dir` is None); `save()` keeps it."""

    def __init__(self, config_dir, state_dir):
        self.config_dir = config_dir
        self.cache = state.Store(state_dir, "lineages.json", tracked=True) if state_dir else None
        self.entries = self.cache.data if self.cache else {}
        self.live = {}  # what the last scan saw under live/: idle.live_keys

    def cached(self, name, key):
        """Return the cached `Lineage` of live/NAME if its cert.pem still has the stat
        `key` (idle.live_keys), else None."""
        cached = self.entries.get(name)
        # "sha256": the DER's; an older certrelay's entry, whose "fingerprint" hashed the file, is read again.
        if isinstance(cached, dict) and cached.get("key") == key and valid_facts(cached.get("info")) \
                and isinstance(cached.get("sha256"), str):
            return Lineage(name, cached["sha256"], cached["info"])
        return None

    def read(self, name, tree):
        """Return the bytes of live/NAME/cert.pem read through `tree` (a
        certificate.Tree), or the CertificateError that says why they cannot be."""
        try:
            return certificate.live_certificate(self.config_dir, name, tree)
        except certificate.CertificateError as error:
            return error

    def parsed(self, name, key, data):
        """Return the `Lineage` of live/NAME from what `read` returned for its
        cert.pem (whose stat is `key`), and cache it."""
        from certrelay import certinfo  # hashlib, libcrypto: the idle daemon does without

        if isinstance(data, certificate.CertificateError):
            return Lineage(name, error=str(data))
        try:
            der = certificate.pem_to_der(data)
        except certificate.CertificateError as error:
            return Lineage(name, error=str(error))
        try:
            info = certinfo.from_der(der)
        except certinfo.CertificateParseError as error:  # still a certificate with a fingerprint
            return Lineage(name, certificate.sha256(der), error=str(error),
                           no_cryptography=isinstance(error, certinfo.CryptographyMissing))
        found = Lineage(name, info.sha256, info.to_json())
        self.entries[name] = {"key": key, "sha256": found.fingerprint, "info": found.facts}
        self.changed()
        return found

    def scan(self):
        """Return a `Lineage` for every valid name under live/, in name order, reading
        and parsing only the certificates that changed; keep what live/ looked like in
        `live` (idle.live_keys) for the idle memo."""
        live = open_live(self.config_dir)
        try:
            self.live = idle.live_keys(live) if live is not None else {}
        finally:
            if live is not None:
                os.close(live)
        found, unread = {}, []
        for name in sorted(self.live):
            key = self.live[name]
            if key == errno.ENOTDIR or not spool.NAME.fullmatch(name):
                continue  # not a lineage: certbot's live/README
            if isinstance(key, int):
                found[name] = Lineage(name, error=f"live/{name}/cert.pem: {os.strerror(key)}")
            else:
                found[name] = self.cached(name, key)
                if found[name] is None:
                    unread.append(name)
        with certificate.Tree(self.config_dir) as tree:
            for name, data in files.read_ahead(unread, functools.partial(self.read, tree=tree)):
                found[name] = self.parsed(name, self.live[name], data)
        for gone in set(self.entries) - set(found):
            del self.entries[gone]
            self.changed()
        return list(found.values())

    def changed(self):
        if self.cache is not None:
            self.cache.changed = True

    def save(self):
        if self.cache is None:
            return
        try:
            self.cache.save()
        except OSError as error:
            logger.warning("cannot save %s: %s", self.cache.path, error.strerror)
