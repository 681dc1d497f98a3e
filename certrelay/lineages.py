"""Every lineage under live/: its fingerprint and what its certificate says, cheaply.

Reconcile, the expiry alarms, `status` and `verify` look at every live certificate on
every run. A stat of live/NAME/cert.pem (the link and its target) decides whether the
file must be read and hashed again; what the certificate says (dates, domains) is
parsed with python3-cryptography only for a certificate not seen before. Both are kept
in STATE_DIR/lineages.json; a lost cache only costs reading again.
"""

import dataclasses
import logging
import os
import stat

from certrelay import certificate, spool, state

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Lineage:
    """One live/NAME: `fingerprint` (SHA-256 of cert.pem's bytes, as the ledger keeps
    it) and `info` (certinfo.CertInfo), or `error` saying why they are unknown."""

    name: str
    fingerprint: str = None
    info: object = None
    error: str = None

    @property
    def domains(self):
        return self.info.domains if self.info else ()


def names(config_dir):
    """Return the sorted lineage names under live/ that are valid notification names.

    live/ must be a plain directory; anything else gives [] (the container writes it).
    """
    try:
        descriptor = os.open(os.path.join(config_dir, "live"), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        return sorted(
            name for name in os.listdir(descriptor)
            if spool.NAME.fullmatch(name) and is_directory(name, descriptor)  # not certbot's live/README
        )
    finally:
        os.close(descriptor)


def is_directory(name, directory):
    """Return True if `name` in the directory descriptor `directory` is a directory (not a link)."""
    try:
        return stat.S_ISDIR(os.stat(name, dir_fd=directory, follow_symlinks=False).st_mode)
    except OSError:
        return False


def stat_key(config_dir, name):
    """Return what changes when certbot renews live/NAME/cert.pem: the link's target
    and the target's identity, size and time. stat() opens nothing, so following the
    link here is safe; reading it is done by certificate.read_beneath."""
    path = os.path.join(config_dir, "live", name, "cert.pem")
    try:
        link = os.readlink(path)
    except OSError:
        link = ""
    info = os.stat(path)
    return [link, info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns]


class Scanner:
    """Reads lineages through the cache in STATE_DIR/lineages.json (in memory only
    when `state_dir` is None); `save()` keeps it."""

    def __init__(self, config_dir, state_dir):
        self.config_dir = config_dir
        self.cache = state.Store(state_dir, "lineages.json") if state_dir else None
        self.entries = self.cache.data if self.cache else {}

    def lineage(self, name):
        """Return the `Lineage` for live/NAME (reading and parsing only what changed)."""
        from certrelay import certinfo  # cheap: cryptography is imported only to parse

        cached = self.entries.get(name)
        try:
            key = stat_key(self.config_dir, name)
        except OSError as error:
            return Lineage(name, error=f"live/{name}/cert.pem: {error.strerror}")
        if isinstance(cached, dict) and cached.get("key") == key:
            try:
                return Lineage(name, cached["fingerprint"], certinfo.CertInfo.from_json(cached["info"]))
            except (KeyError, TypeError, ValueError):
                pass
        try:
            data = certificate.live_certificate(self.config_dir, name)
            info = certinfo.from_pem(data)
        except (certificate.CertificateError, certinfo.CertificateParseError) as error:
            return Lineage(name, error=str(error))
        found = Lineage(name, certificate.hashlib.sha256(data).hexdigest(), info)
        self.entries[name] = {"key": key, "fingerprint": found.fingerprint, "info": info.to_json()}
        return found

    def scan(self):
        """Return a `Lineage` for every name under live/, in name order."""
        found = [self.lineage(name) for name in names(self.config_dir)]
        for gone in set(self.entries) - {lineage.name for lineage in found}:
            del self.entries[gone]
        return found

    def save(self):
        if self.cache is None:
            return
        try:
            self.cache.save()
        except OSError as error:
            logger.warning("cannot save %s: %s", self.cache.path, error.strerror)
