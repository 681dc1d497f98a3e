"""The renderings of a snapshot: `certrelay status` (table, JSON), the Nagios plugin
output, and the list of problems behind status's exit code.

A snapshot is a plain dict built by the caller; every time is epoch seconds (UTC):

    {
      "time": 1764300000.0,              # now
      "last_run": 1764299000.0 or None,  # the last run or batch
      "error": None or "message",        # the state could not be read (e.g. invalid rules)
      "certificates": [{                 # one per lineage
          "name": "example.org", "domains": ["example.org", "*.example.org"],
          "sha256": "...", "serial": "...", "not_before": epoch, "not_after": epoch,
          "days_left": 12.3, "fraction_left": 0.13, "level": "ok"|"warning"|"critical",
          "warning_days": 18.0, "critical_days": 9.0,  # this certificate's thresholds
          "state": "current"|"pending"|"kept"|"deferred"|"unknown"|"unreadable",
          "error": None or "why the live certificate cannot be read",
          "acted": {"sha256": "...", "time": epoch} or None,  # what certrelay last acted on
          "kept": [{"action": "restart exim4.service", "error": "...", "attempts": 3}],
          "installs": [{"dest": "/etc/haproxy/certs/example.org.pem", "result": "success"|"failure",
                        "time": epoch, "detail": "..."}],  # the last delivery to each
          "endpoints": [{"endpoint": "imaps://127.0.0.1:993",
                         "outcome": "current"|"chain"|"old"|"other"|"unreachable",
                         "served_sha256": "..." or None, "served_serial": "..." or None,
                         "served_not_after": epoch or None, "error": None or "...",
                         "checked": epoch}],
      }],
      "units": [{"unit": "dovecot.service", "verb": "restart", "result": "success"|"failure",
                 "time": epoch, "error": None or "..."}],
      "notifications": {"pending": 0, "kept": 1, "deferred": 0},
      "dropped": [{"name": "ghost.example", "time": epoch, "reason": "..."}],  # the last week's
      "actions_total": [{"unit": "dovecot.service", "verb": "restart", "result": "success", "count": 4}],
    }

For an unreadable lineage (state "unreadable", `error` set) the certificate fields
(sha256, serial, dates, days_left, fraction_left, level) may be None.
"""

import datetime
import json

NAGIOS_CODES = {"OK": 0, "WARNING": 1, "CRITICAL": 2, "UNKNOWN": 3}
SEVERITIES = ("unknown", "critical", "warning")  # of problems(), worst first
EXPIRY_ADVICE = (
    "certbot renews long before this (a third of the lifetime before expiry, by its default),"
    " so renewal is probably failing: check certbot's output and letsencrypt.log"
)
ENDPOINT_ADVICE = {
    "chain": "the service did not read chain.pem (or fullchain.pem) anew since the renewal, or reads a copy of it",
    "old": "the service was not restarted or reloaded since the renewal, or reads a copy of the files",
    "other": "the service reads another certificate than this lineage's",
}


# --- problems ---------------------------------------------------------------------


def problems(snapshot):
    """Return [(severity, text)] for everything that needs a person, severity being
    "unknown" (the state could not be read), "critical" or "warning"."""
    found = []
    if snapshot.get("error"):
        found.append(("unknown", f"cannot read certrelay's state: {one_line(snapshot['error'])}"))
    kept_actions = set()
    for cert in snapshot.get("certificates") or []:
        found += certificate_problems(cert)
        kept_actions.update(kept["action"] for kept in cert.get("kept") or [])
    for dropped in snapshot.get("dropped") or []:
        found.append(("warning", dropped_summary(dropped)))
    unsent = snapshot.get("unsent_alerts") or []
    if unsent:
        found.append(("warning", f"{len(unsent)} alert(s) not sent yet, the next run tries again (certrelay alert"
                                 f" --test says which channel fails): {problems_summary([one_line(s) for s in unsent])}"))
    for unit in snapshot.get("units") or []:
        # a failure already reported as a kept action is one problem, not two
        if unit.get("result") == "failure" and f"{unit['verb']} {unit['unit']}" not in kept_actions:
            found.append(("warning", f"{unit['unit']}: {unit['verb']} failed: {why(unit)}"))
    return found


def certificate_problems(cert):
    """Return [(severity, text)] for one lineage of the snapshot."""
    name = printable(cert["name"])
    found = []
    if cert.get("error") or cert.get("state") == "unreadable":
        found.append(("warning", f"{name}: cannot read the live certificate: {why(cert)}"))
    for kept in cert.get("kept") or []:
        found.append(("warning", f"{name}: {kept['action']} failed ({attempts(kept)}): {why(kept)}"))
    for endpoint in cert.get("endpoints") or []:
        if endpoint.get("outcome") != "current":
            found.append(("critical", f"{name}: {endpoint['endpoint']} {endpoint_summary(endpoint)}"))
    if cert.get("overdue"):
        found.append(("warning", f"{name}: {overdue_summary(cert)}"))
    if cert.get("renewal_error"):
        found.append(("warning", f"{name}: cannot tell whether its renewal is overdue: {one_line(cert['renewal_error'])}"))
    if cert.get("level") in ("warning", "critical"):
        found.append((cert["level"], f"{name}: {expiry_summary(cert)}"))
    return found


def dropped_summary(dropped):
    """Return "ghost.example: a notification was dropped at TIME (UTC): why"."""
    return (f"{printable(dropped['name'])}: a notification was dropped at {human_time(dropped.get('time'))} (UTC):"
            f" {one_line(dropped.get('reason') or '')}")


def overdue_summary(cert):
    """Return "renewal OVERDUE: certbot should have renewed it from 2026-... (UTC)"."""
    return f"renewal OVERDUE: certbot should have renewed it from {human_time(cert.get('renew_at'))} (UTC)"


def needs_attention(snapshot):
    """Return the reasons (texts) why a person should look, [] if there is none."""
    return [text for _, text in problems(snapshot)]


def attempts(kept):
    """Return "3 attempts" for a kept action."""
    count = kept.get("attempts") or 0
    return f"{count} attempt" + ("" if count == 1 else "s")


def endpoint_summary(endpoint):
    """Return what is wrong with an endpoint that does not serve the live certificate."""
    outcome = endpoint.get("outcome")
    if outcome == "chain":
        return "serves the live certificate with a stale chain"
    if outcome == "old":
        return "still serves the old certificate"
    if outcome == "other":
        serial = endpoint.get("served_serial")
        return "serves another certificate" + (f" (serial {serial})" if serial else "")
    return f"unreachable: {why(endpoint)}"


def expiry_summary(cert):
    """Return "expires in 5.0 days (warning below 18 days)" or "expired 2.0 days ago"."""
    days = cert.get("days_left")
    if days is None:
        return "expiry unknown"
    if days < 0:
        return f"expired {-days:.1f} days ago"
    limit = cert.get(f"{cert['level']}_days")
    below = f" ({cert['level']} below {number(limit)} days)" if limit is not None else ""
    return f"expires in {days:.1f} days{below}"


# --- certrelay status: table ------------------------------------------------------


def table(snapshot):
    """Return `certrelay status` for a person: a line per lineage with details only
    where there is something to say, a line per unit, the last run and a verdict."""
    now = snapshot.get("time")
    lines = []
    if snapshot.get("error"):
        lines += [f"error: cannot read certrelay's state: {one_line(snapshot['error'])}", ""]
    certificates = snapshot.get("certificates") or []
    if certificates:
        rows = [("NAME", "STATE", "DAYS", "NOT AFTER (UTC)", "SERIAL", "SHA256", "ACTED ON (UTC)")]
        details = [[]]
        for cert in certificates:
            rows.append(certificate_row(cert))
            details.append(certificate_details(cert))
        for line, detail in zip(aligned(rows), details):
            lines += [line, *("    " + text for text in detail)]
    else:
        lines.append("no certificates")
    units = snapshot.get("units") or []
    if units:
        rows = [("UNIT", "LAST ACTION", "RESULT", "WHEN (UTC)")]
        details = [[]]
        for unit in units:
            rows.append((unit["unit"], unit["verb"], unit["result"], when(unit.get("time"), now)))
            details.append([one_line(unit["error"])] if unit.get("result") == "failure" and unit.get("error") else [])
        lines.append("")
        for line, detail in zip(aligned(rows), details):
            lines += [line, *("    " + text for text in detail)]
    notifications = snapshot.get("notifications") or {}
    counts = ", ".join(f"{notifications.get(state, 0)} {state}" for state in ("pending", "kept", "deferred"))
    lines += ["", f"last run: {when(snapshot.get('last_run'), now)}", f"notifications: {counts}"]
    lines += ["  " + dropped_summary(dropped) for dropped in snapshot.get("dropped") or []]
    lines.append(verdict(snapshot))
    return "\n".join(lines) + "\n"


def certificate_row(cert):
    """Return the table's cells for one lineage."""
    acted = cert.get("acted")
    return (
        printable(cert["name"]),
        cert.get("state") or "unknown",
        f"{cert['days_left']:.1f}" if cert.get("days_left") is not None else "-",
        human_time(cert.get("not_after")),
        cert.get("serial") or "-",
        (cert.get("sha256") or "-")[:12],
        human_time(acted.get("time")) if acted else "never",
    )


def certificate_details(cert):
    """Return the detail lines of one lineage: why it cannot be read, kept actions,
    endpoints not current, and expiry warnings with what they usually mean."""
    lines = []
    if cert.get("error"):
        lines.append(f"cannot read the live certificate: {one_line(cert['error'])}")
    for kept in cert.get("kept") or []:
        lines.append(
            f"kept: {kept['action']} failed ({attempts(kept)}): {why(kept)};"
            " retried on the next run"
        )
    for endpoint in cert.get("endpoints") or []:
        outcome = endpoint.get("outcome")
        if outcome == "current":
            continue
        line = f"{endpoint['endpoint']} {endpoint_summary(endpoint)}"
        if endpoint.get("served_not_after") is not None:
            line += f", not after {human_time(endpoint['served_not_after'])}"
        if outcome in ENDPOINT_ADVICE:
            line += f": {ENDPOINT_ADVICE[outcome]}"
        lines.append(line)
    if cert.get("overdue"):
        lines.append(f"{overdue_summary(cert)}; {EXPIRY_ADVICE}")
    if cert.get("renewal_error"):
        lines.append(f"cannot tell whether its renewal is overdue: {one_line(cert['renewal_error'])}")
    if cert.get("level") in ("warning", "critical"):
        lines.append(f"{cert['level']}: {expiry_summary(cert)}; {EXPIRY_ADVICE}")
    for install in cert.get("installs") or []:
        outcome = "installed" if install.get("result") == "success" else "FAILED to install"
        lines.append(f"{outcome} {install['dest']} {human_time(install.get('time'))}")
    return lines


def verdict(snapshot):
    """Return the closing line: "all certificates current" or "N problem(s): ..."."""
    reasons = needs_attention(snapshot)
    if not reasons:
        return "all certificates current"
    return f"{len(reasons)} problem(s): " + "; ".join(reasons)


def aligned(rows):
    """Return the rows of cells as lines, each column padded to its widest cell."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


# --- certrelay status --json ------------------------------------------------------


def as_json(snapshot):
    """Return the snapshot as indented JSON with a fixed key order and times in RFC
    3339 UTC; `problems` holds the reasons of `needs_attention`."""
    document = {
        "time": rfc3339(snapshot.get("time")),
        "last_run": rfc3339(snapshot.get("last_run")),
        "error": snapshot.get("error"),
        "certificates": [certificate_json(cert) for cert in snapshot.get("certificates") or []],
        "units": [
            {
                "unit": unit["unit"], "verb": unit["verb"], "result": unit["result"],
                "time": rfc3339(unit.get("time")), "error": unit.get("error"),
            }
            for unit in snapshot.get("units") or []
        ],
        "notifications": {
            state: (snapshot.get("notifications") or {}).get(state, 0) for state in ("pending", "kept", "deferred")
        },
        "dropped": [{"name": dropped["name"], "time": rfc3339(dropped.get("time")), "reason": dropped.get("reason")}
                    for dropped in snapshot.get("dropped") or []],
        "actions_total": [
            {key: action[key] for key in ("unit", "verb", "result", "count")}
            for action in snapshot.get("actions_total") or []
        ],
        "unsent_alerts": list(snapshot.get("unsent_alerts") or []),
        "problems": needs_attention(snapshot),
    }
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def certificate_json(cert):
    """Return one lineage of the snapshot for as_json."""
    acted = cert.get("acted")
    return {
        "name": cert["name"],
        "state": cert.get("state"),
        "level": cert.get("level"),
        "days_left": rounded(cert.get("days_left"), 3),
        "fraction_left": rounded(cert.get("fraction_left"), 4),
        "not_before": rfc3339(cert.get("not_before")),
        "not_after": rfc3339(cert.get("not_after")),
        "renew_at": rfc3339(cert.get("renew_at")),
        "overdue": cert.get("overdue"),
        "renewal_error": cert.get("renewal_error"),
        "warning_days": cert.get("warning_days"),
        "critical_days": cert.get("critical_days"),
        "domains": list(cert.get("domains") or []),
        "sha256": cert.get("sha256"),
        "serial": cert.get("serial"),
        "error": cert.get("error"),
        "acted": {"sha256": acted.get("sha256"), "time": rfc3339(acted.get("time"))} if acted else None,
        "kept": [
            {"action": kept["action"], "error": kept.get("error"), "attempts": kept.get("attempts")}
            for kept in cert.get("kept") or []
        ],
        "endpoints": [
            {
                "endpoint": endpoint["endpoint"],
                "outcome": endpoint.get("outcome"),
                "served_sha256": endpoint.get("served_sha256"),
                "served_serial": endpoint.get("served_serial"),
                "served_not_after": rfc3339(endpoint.get("served_not_after")),
                "error": endpoint.get("error"),
                "checked": rfc3339(endpoint.get("checked")),
            }
            for endpoint in cert.get("endpoints") or []
        ],
        "installs": [
            {"dest": install["dest"], "result": install.get("result"), "time": rfc3339(install.get("time")),
             "detail": install.get("detail")}
            for install in cert.get("installs") or []
        ],
    }


# --- certrelay verify --nagios ----------------------------------------------------


def nagios(snapshot):
    """Return (exit code, text) following the Nagios plugin guidelines, readable with
    hundreds of lineages: `CERTRELAY STATUS - summary | totals`, then a line per
    problem and per lineage, the last of them followed by ` | ` and each lineage's
    days left, one item per line (perfdata in the long output, as the guidelines
    allow).

    UNKNOWN (3) when the state could not be read; CRITICAL (2) for an endpoint not
    serving the live certificate or a certificate at level critical; WARNING (1) for
    any other problem (level warning, a kept action, an unreadable certificate, a
    failed unit); else OK (0).
    """
    ranked = sorted(problems(snapshot), key=lambda problem: SEVERITIES.index(problem[0]))  # stable: worst first
    status = ranked[0][0].upper() if ranked else "OK"
    certificates = snapshot.get("certificates") or []
    summary = problems_summary([text for _, text in ranked]) if ranked else ok_summary(certificates)
    lines = [f"CERTRELAY {status} - {no_pipe(summary)}"] + [no_pipe(text) for _, text in ranked]
    lines += [no_pipe(certificate_line(cert)) for cert in certificates]
    perfdata = [item for item in map(perfdata_item, certificates) if item]
    if certificates and status != "UNKNOWN":
        lines[0] += " | " + totals(certificates)
        if perfdata:
            lines[-1] += " | " + perfdata[0]
            lines += perfdata[1:]
    return NAGIOS_CODES[status], "\n".join(lines) + "\n"


def totals(certificates):
    """Return the status line's perfdata: how many certificates in all, at each
    expiry level and without dates, and the fewest days left of any."""
    levels = [cert.get("level") for cert in certificates]
    counts = (("certificates", len(certificates)), ("warning", levels.count("warning")),
              ("critical", levels.count("critical")), ("undated", levels.count(None)))
    items = [f"'{label}'={count};;;0;" for label, count in counts]
    days = [cert["days_left"] for cert in certificates if cert.get("days_left") is not None]
    if days:
        items.append(f"'days_left_min'={min(days):.2f};;;;")
    return " ".join(items)


def problems_summary(texts, shown=2):
    """Return the first `shown` problems and how many more there are, for one line."""
    summary = "; ".join(texts[:shown])
    return summary + (f" (and {len(texts) - shown} more)" if len(texts) > shown else "")


def ok_summary(certificates):
    """Return the status text when nothing needs attention."""
    if not certificates:
        return "no certificates"
    summary = f"{len(certificates)} certificate(s) current"
    known = [cert for cert in certificates if cert.get("days_left") is not None]
    if known:
        soonest = min(known, key=lambda cert: cert["days_left"])
        summary += f", next expiry {printable(soonest['name'])} in {soonest['days_left']:.1f} days"
    return summary


def certificate_line(cert):
    """Return a long-output line for one lineage."""
    if cert.get("days_left") is None:
        return f"{printable(cert['name'])}: {cert.get('state') or 'unknown'}"
    return (
        f"{printable(cert['name'])}: {cert.get('state') or 'unknown'}, {cert['level']},"
        f" {cert['days_left']:.1f} days left, not after {rfc3339(cert.get('not_after'))}, serial {cert.get('serial')},"
        f" renewal due {rfc3339(cert.get('renew_at')) or 'never'}{' (OVERDUE)' if cert.get('overdue') else ''}"
    )


def perfdata_item(cert):
    """Return `'name'=days;warn:;crit:;0;lifetime` for a lineage, or None if its
    expiry is unknown. "N:" alerts below N; days have no Nagios unit of measure."""
    if cert.get("days_left") is None:
        return None
    label = no_pipe(printable(cert["name"])).replace("'", "''").replace("=", "_")
    warning, critical = (cert.get(key) for key in ("warning_days", "critical_days"))
    lifetime = None
    if cert.get("not_after") is not None and cert.get("not_before") is not None:
        lifetime = (cert["not_after"] - cert["not_before"]) / 86400
    fields = (
        f"{cert['days_left']:.2f}",
        f"{number(warning)}:" if warning is not None else "",
        f"{number(critical)}:" if critical is not None else "",
        "0",
        number(lifetime) if lifetime is not None else "",
    )
    return f"'{label}'=" + ";".join(fields)


# --- small helpers ----------------------------------------------------------------


def why(item):
    """Return the `error` of a snapshot item on one line, or "no reason given"."""
    return one_line(item.get("error") or "no reason given")


def one_line(text):
    """Return `text` with every run of whitespace, newlines included, as one space,
    and other control characters as escapes."""
    return printable(" ".join(str(text).split()))


def printable(text):
    """Return `text` with control characters (a newline in a name) as escapes, so
    that it stays on its line."""
    return "".join(character if character.isprintable() else repr(character)[1:-1] for character in str(text))


def no_pipe(text):
    """Replace "|" in plugin text, where it would start the perfdata."""
    return text.replace("|", "/")


def number(value):
    """Return a number without trailing zeros: 18.0 -> "18", 9.25 -> "9.25"."""
    return f"{value:.2f}".rstrip("0").rstrip(".")


def rounded(value, digits):
    return None if value is None else round(value, digits)


def rfc3339(epoch):
    """Return epoch seconds as "2025-11-28T03:20:00Z", None for None."""
    if epoch is None:
        return None
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def human_time(epoch):
    """Return epoch seconds as "2025-11-28 03:20" (UTC), "-" for None."""
    if epoch is None:
        return "-"
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")


def when(epoch, now):
    """Return "2025-11-28 03:20 (17 min ago)" or "never"."""
    if epoch is None:
        return "never"
    return f"{human_time(epoch)} ({ago(now - epoch)})" if now is not None else human_time(epoch)


def ago(seconds):
    """Return a past span for people: "just now", "17 min ago", "5 h ago", "3 d ago"."""
    if seconds < 60:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600)):
        if seconds >= size:
            return f"{seconds // size:.0f} {unit} ago"
    return f"{seconds // 60:.0f} min ago"
