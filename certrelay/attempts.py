"""certbot's last renewal attempt, as the post hook recorded it in the container.

certbot runs the post hooks (renewal-hooks/post/) at the end of a `certbot renew` in
which some certificate was due, whether its renewal worked or not; certrelay's,
certrelay-post-hook, publishes SPOOL/attempt atomically:

    version=1
    time=2026-12-07T03:00:12Z
    domains=known            (unknown: a certbot that passes no RENEWED/FAILED_DOMAINS)
    renewed=example.org *.example.org
    failed=mail.example.ch

The container writes it: it is read beneath the config dir (a regular file, no link
out, at most MAX bytes), every line checked; a problem says where and what to do.
"""

import calendar
import dataclasses
import os
import re
import time

from certrelay import certificate

MAX = 64 * 1024
RELATIVE = "certrelay/attempt"
TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")
DOMAIN = re.compile(r"[A-Za-z0-9.*_-]{1,253}")


class AttemptError(ValueError):
    """The attempt record cannot be read; the message says where and why."""


@dataclasses.dataclass(frozen=True)
class Attempt:
    """One renewal attempt: `time` (epoch seconds), whether certbot said which domains
    renewed and failed (`known`), and those domains (tuples)."""

    time: float
    known: bool
    renewed: tuple = ()
    failed: tuple = ()


def parse(data, path):
    """Return the Attempt in the bytes `data` of the record `path`; raise AttemptError."""
    try:
        lines = data.decode("ascii").split("\n")
    except UnicodeDecodeError:
        raise AttemptError(f"{path}: not ASCII: not written by certrelay-post-hook; delete it") from None
    fields = {}
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        key, equals, value = line.partition("=")
        if not equals or key in fields or key not in ("version", "time", "domains", "renewed", "failed"):
            raise AttemptError(f"{path}:{number}: unexpected line {line[:80]!r}: not written by"
                               " certrelay-post-hook; reinstall it (certrelay install-hook) and delete the file")
        fields[key] = value
    if fields.get("version") != "1" or not TIME.fullmatch(fields.get("time", "")) \
            or fields.get("domains") not in ("known", "unknown"):
        raise AttemptError(f"{path}: needs version=1, time=YYYY-MM-DDTHH:MM:SSZ and domains=known|unknown:"
                           " not written by this certrelay-post-hook; reinstall it (certrelay install-hook)")
    domains = {}
    for key in ("renewed", "failed"):
        domains[key] = tuple(fields.get(key, "").split())
        bad = [domain for domain in domains[key] if not DOMAIN.fullmatch(domain)]
        if bad:
            raise AttemptError(f"{path}: {key}= holds {bad[0][:80]!r}, not a domain name")
    moment = calendar.timegm(time.strptime(fields["time"], "%Y-%m-%dT%H:%M:%SZ"))
    return Attempt(float(moment), fields["domains"] == "known", domains["renewed"], domains["failed"])


def read(config_dir):
    """Return the last Attempt recorded under `config_dir`, or None if certbot's post
    hook never recorded one. Raise AttemptError."""
    if not os.path.lexists(os.path.join(config_dir, RELATIVE)):
        return None
    try:
        data = certificate.read_beneath(config_dir, RELATIVE, MAX)
    except certificate.CertificateError as error:
        raise AttemptError(f"{config_dir}/{RELATIVE}: {error}") from None
    return parse(data, f"{config_dir}/{RELATIVE}")
