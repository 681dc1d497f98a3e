"""Durations and expiry thresholds: the `[settings]` values that are time spans.

`parse_duration` reads systemd-style time spans (every duration in `[settings]`),
`parse_threshold` a fraction of a certificate's lifetime or a duration, and `level`
applies two thresholds to a certificate. Light on purpose: every run parses the rules.
"""

import dataclasses
import math
import re

DAY = 86400.0

# systemd.time(7) time span units, in seconds. Case matters: "M" is a month, "m" a minute.
DURATION_UNITS = {
    **dict.fromkeys(("us", "usec", "μs"), 1e-6),
    **dict.fromkeys(("ms", "msec"), 1e-3),
    **dict.fromkeys(("s", "sec", "second", "seconds"), 1.0),
    **dict.fromkeys(("m", "min", "minute", "minutes"), 60.0),
    **dict.fromkeys(("h", "hr", "hour", "hours"), 3600.0),
    **dict.fromkeys(("d", "day", "days"), DAY),
    **dict.fromkeys(("w", "week", "weeks"), 7 * DAY),
    **dict.fromkeys(("M", "month", "months"), 30.44 * DAY),
    **dict.fromkeys(("y", "year", "years"), 365.25 * DAY),
}
UNITS_ACCEPTED = "us, ms, s/sec, m/min, h/hr, d/day, w/week, M/month, y/year"
NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
BARE_NUMBER = re.compile(rf"\s*{NUMBER}\s*")
DURATION_PART = re.compile(rf"\s*({NUMBER})\s*([^\s\d.]*)\s*")


def parse_duration(value):
    """Return a duration in seconds (float) from a non-negative number of seconds or a
    systemd-style time span: "90s", "15min", "1h 30min", "1h30min", "1.5h", "2w".

    A string that is a bare number means seconds, as in systemd. Raise ValueError
    naming the bad part and the units accepted.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"duration {value!r}: expected a number of seconds or a text like '20d' or '1h 30min'")
    if not isinstance(value, str):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"duration {value!r}: must be a non-negative number of seconds")
        return float(value)
    text = value.strip()
    if not text:
        raise ValueError(f"duration {value!r} is empty; units: {UNITS_ACCEPTED}")
    if BARE_NUMBER.fullmatch(text):
        return float(text)
    total, position = 0.0, 0
    while position < len(text):
        part = DURATION_PART.match(text, position)
        if not part:
            raise ValueError(
                f"duration {value!r}: cannot read {text[position:]!r}; expected a number and a unit ({UNITS_ACCEPTED})"
            )
        number, unit = part.groups()
        if unit not in DURATION_UNITS:
            what = f"unknown unit {unit!r}" if unit else "no unit"
            raise ValueError(f"duration {value!r}: {what} in {part.group().strip()!r}; units: {UNITS_ACCEPTED}")
        total += float(number) * DURATION_UNITS[unit]
        position = part.end()
    return total


def format_duration(seconds):
    """Return `seconds` as a short text for people: "18d", "36h", "90s", "12.5d"."""
    for unit, size in (("d", DAY), ("h", 3600.0), ("min", 60.0)):
        if abs(seconds) >= size:
            return f"{seconds / size:.4g}{unit}"
    return f"{seconds:.4g}s"


@dataclasses.dataclass(frozen=True)
class Threshold:
    """An expiry threshold: a `fraction` of the certificate's lifetime (0.2: alert
    when a fifth of it is left), or a fixed `duration` in seconds. Exactly one is set;
    make one with `parse_threshold`."""

    fraction: float | None = None
    duration: float | None = None

    def seconds(self, lifetime):
        """Return the threshold in seconds for a certificate lasting `lifetime` seconds."""
        if self.fraction is not None:
            return self.fraction * lifetime
        return self.duration

    def __str__(self):
        if self.fraction is not None:
            return f"{self.fraction:g} of the lifetime"
        return format_duration(self.duration)


def parse_threshold(value):
    """Return the Threshold for a setting `value`: a number 0 < x < 1 (a fraction of
    the lifetime) or a duration text for `parse_duration` ("18d"). Raise ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"threshold {value!r}: expected a fraction like 0.2 or a duration like '18d'")
    if isinstance(value, (int, float)):
        if not 0 < value < 1:
            raise ValueError(
                f"threshold {value!r}: a number is a fraction of the lifetime and must lie"
                " between 0 and 1 (e.g. 0.2); write a duration as text, e.g. '18d'"
            )
        return Threshold(fraction=float(value))
    if isinstance(value, str) and BARE_NUMBER.fullmatch(value):
        # parse_duration would read "0.2" as 0.2 seconds: surely a fraction was meant
        raise ValueError(
            f"threshold {value!r} has no unit: write 0.2 (a number) for a fraction of the lifetime, or e.g. '18d'"
        )
    return Threshold(duration=parse_duration(value))


def level(info, now, warning, critical):
    """Return "ok", "warning" or "critical" for `info` (anything with `not_before` and
    `not_after` in epoch seconds: a certinfo.CertInfo, a lineages.Lineage) at epoch
    `now`, given the Thresholds `warning` and `critical`: critical once expired or when
    less than the critical threshold is left, warning when less than the warning one is."""
    left, lifetime = info.not_after - now, info.not_after - info.not_before
    if left < 0 or left < critical.seconds(lifetime):
        return "critical"
    if left < warning.seconds(lifetime):
        return "warning"
    return "ok"


def ok_until(info, warning, critical):
    """Return the last epoch time at which `level` says "ok" for `info` (the same kind
    of argument): either threshold may be crossed first, as one can be a fraction of
    the lifetime and the other a duration."""
    lifetime = info.not_after - info.not_before
    return info.not_after - max(warning.seconds(lifetime), critical.seconds(lifetime))
