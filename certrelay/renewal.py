"""When certbot should renew a lineage, by certbot's own policy, and whether it is late.

certbot decides from renewal/NAME.conf (certbot/_internal/renewal.py, should_autorenew):
`autorenew = False` in [renewalparams] never renews; `renew_before_expiry` (top level:
"30 days", "2 weeks", a bare number of days) renews when less than that is left;
otherwise certbot's default for its version (`version =`, the certbot that last wrote
the file): before 4.0, 30 days before expiry; from 4.0, when a third of the lifetime
is left (half, for lifetimes under 10 days). From 4.1 an ACME Renewal Info window may
make certbot renew earlier; the policy here is the latest it should have tried.

The container writes renewal/: every byte is hostile. The file is read through
certificate.read_beneath (a regular file, no link out of the config dir, a size
limit), and only the lines certrelay uses are parsed, strictly; every problem names
FILE:LINE and what to do.
"""

import dataclasses
import datetime
import re

from certrelay import certificate

MAX_CONF = 64 * 1024
DAY = 86400.0
UNITS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": DAY, "week": 7 * DAY}
INTERVAL_PART = re.compile(r"([0-9]{1,6})\s*(second|minute|hour|day|week|month|year)s?", re.IGNORECASE)
LINE = re.compile(r"\s*([A-Za-z0-9_.-]+)\s*=\s*(.*?)\s*")
SECTION = re.compile(r"\s*(\[+)\s*([^\[\]]+?)\s*(\]+)\s*")
VERSION = re.compile(r"([0-9]{1,4})\.([0-9]{1,4})(?:\.[0-9]{1,4})?(?:[.a-z0-9+-]*)")


class PolicyError(ValueError):
    """renewal/NAME.conf cannot be read or understood; the message says where and why."""


@dataclasses.dataclass(frozen=True)
class Policy:
    """What renewal/NAME.conf says: `autorenew`, `renew_before_expiry` (the text, or
    None), `version` ((major, minor), or None if not given)."""

    autorenew: bool = True
    renew_before_expiry: str = None
    version: tuple = None

    def renew_at(self, not_before, not_after):
        """Return the epoch second from which certbot renews a certificate valid from
        `not_before` to `not_after` (epoch seconds), or None if it never does (autorenew
        off). Raise PolicyError for a `renew_before_expiry` certrelay cannot read."""
        if not self.autorenew:
            return None
        # A margin longer than the lifetime (30 days before 4.0, a 6-day certificate) makes
        # certbot renew at its first run after issue, not before: never earlier than not_before.
        if self.renew_before_expiry is not None:
            return max(not_before, before(not_after, self.renew_before_expiry))
        lifetime = not_after - not_before
        newer = not_before + lifetime * (0.5 if lifetime < 10 * DAY else 2 / 3)
        older = max(not_before, not_after - 30 * DAY)
        if self.version is None:  # unknown: the later of the two, never a false alarm
            return max(newer, older)
        return newer if self.version >= (4, 0) else older

    def describe(self):
        """Return the rule in words, for a message."""
        if not self.autorenew:
            return "autorenew = False"
        if self.renew_before_expiry is not None:
            return f"renew_before_expiry = {self.renew_before_expiry}"
        if self.version is None:
            return "certbot's default (its version unknown)"
        if self.version >= (4, 0):
            return "certbot's default from 4.0: a third of the lifetime left"
        return "certbot's default before 4.0: 30 days left"


def before(not_after, interval):
    """Return `not_after` (epoch seconds) minus the certbot interval text `interval`;
    months and years are calendar months and years, as certbot counts them."""
    text = interval.strip()
    if text.isdigit():
        text += " days"
    parts = INTERVAL_PART.findall(text)
    if not parts or INTERVAL_PART.sub("", text).strip(" ,") != "" or len(parts) > 6:
        raise PolicyError(f"renew_before_expiry = {interval!r} is not an interval certrelay can read"
                          " (like \"30 days\", \"2 weeks\" or \"1 month 3 days\")")
    seconds, months = 0.0, 0
    for number, unit in parts:
        unit = unit.lower()
        if unit in ("month", "year"):
            months += int(number) * (12 if unit == "year" else 1)
        else:
            seconds += int(number) * UNITS[unit]
    end = datetime.datetime.fromtimestamp(not_after, datetime.timezone.utc)
    if months:
        month = end.month - 1 - months
        year, month = end.year + month // 12, month % 12 + 1
        if year < 1:
            raise PolicyError(f"renew_before_expiry = {interval!r} is longer than any certificate lives")
        day = min(end.day, [31, 29 if year % 4 == 0 and (year % 100 or year % 400 == 0) else 28, 31, 30, 31,
                            30, 31, 31, 30, 31, 30, 31][month - 1])
        end = end.replace(year=year, month=month, day=day)
    return end.timestamp() - seconds


def parse(data, path):
    """Return the Policy in the bytes `data` of the renewal conf `path` (for messages).

    Only `version`, `renew_before_expiry` (top level) and `autorenew` ([renewalparams])
    are read; every other line must still be a section header, `key = value`, a
    comment or blank. Raise PolicyError naming PATH:LINE.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise PolicyError(f"{path}: not UTF-8 text (byte {error.start}): certbot writes it; restore it from a"
                          " backup or run certbot renew --cert-name NAME --force-renewal") from None
    found, top, section = {}, "", ""
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        header = SECTION.fullmatch(line)
        if header and len(header.group(1)) == len(header.group(3)):
            top = header.group(2) if len(header.group(1)) == 1 else top
            section = top if len(header.group(1)) == 1 else f"{top}/{header.group(2)}"  # a subsection: not ours
            continue
        pair = LINE.fullmatch(line)
        if pair is None:
            raise PolicyError(f"{path}:{number}: not a `key = value` line, a [section] or a comment:"
                              f" {line[:80]!r}; certbot writes this file: restore it")
        key, value = pair.group(1), pair.group(2).strip("\"'")
        wanted = {("", "version"), ("", "renew_before_expiry"), ("renewalparams", "autorenew")}
        if (section, key) in wanted:
            found[key] = (number, value)
    policy = {}
    if "autorenew" in found:
        number, value = found["autorenew"]
        if value.lower() not in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            raise PolicyError(f"{path}:{number}: autorenew = {value!r} is not True or False")
        policy["autorenew"] = value.lower() in ("true", "yes", "on", "1")
    if "renew_before_expiry" in found:
        number, value = found["renew_before_expiry"]
        try:
            before(4e9, value)  # checked now, so that the message names the line
        except PolicyError as error:
            raise PolicyError(f"{path}:{number}: {error}; no overdue alarm is possible for this lineage"
                              " until it is fixed") from None
        policy["renew_before_expiry"] = value
    if "version" in found:
        number, value = found["version"]
        match = VERSION.fullmatch(value)
        if match is None:
            raise PolicyError(f"{path}:{number}: version = {value!r} is not a certbot version")
        policy["version"] = (int(match.group(1)), int(match.group(2)))
    return Policy(**policy)


def read(config_dir, name, tree=None):
    """Return the Policy of lineage `name` from CONFIG_DIR/renewal/NAME.conf, read
    through `tree` (a certificate.Tree of `config_dir` kept open for many) if given;
    raise PolicyError (missing, unsafe, too large, or not understood)."""
    relative = f"renewal/{name}.conf"
    try:
        data = tree.read(relative, MAX_CONF) if tree else certificate.read_beneath(config_dir, relative, MAX_CONF)
    except certificate.CertificateError as error:
        raise PolicyError(f"{config_dir}/{relative}: {error}") from None
    return parse(data, f"{config_dir}/{relative}")


def renew_at(config_dir, lineage, tree=None):
    """Return (when certbot should renew `lineage` (a lineages.Lineage with dates), in
    epoch seconds, or None if never; its Policy). Raise PolicyError. `tree`: as `read`."""
    policy = read(config_dir, lineage.name, tree)
    return policy.renew_at(lineage.not_before, lineage.not_after), policy
