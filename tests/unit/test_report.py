"""The renderings of a snapshot (certrelay.report): status table, JSON, Nagios."""

import json
import re

import pytest

from certrelay import report

NOW = 1764300000.0  # 2025-11-28 03:20:00 UTC
DAY = 86400.0
# Nagios plugin guidelines: 'label'=value[UOM];[warn];[crit];[min];[max]
PERFDATA_ITEM = re.compile(r"'((?:[^'=]|'')+)'=(-?[0-9.]+);([0-9.:~@-]*);([0-9.:~@-]*);(-?[0-9.]*);(-?[0-9.]*)")


def certificate(name="example.org", days_left=45.0, level="ok", **fields):
    """A lineage of a snapshot: a 90-day certificate with `days_left` (None: unknown)."""
    known = days_left is not None
    cert = {
        "name": name, "domains": [name, f"*.{name}"], "sha256": "ab" * 32, "serial": "04A1B2",
        "not_before": NOW - (90 - days_left) * DAY if known else None,
        "not_after": NOW + days_left * DAY if known else None,
        "days_left": days_left, "fraction_left": days_left / 90 if known else None, "level": level,
        "warning_days": 18.0, "critical_days": 9.0, "state": "current", "error": None,
        "acted": {"sha256": "ab" * 32, "time": NOW - 40 * DAY}, "kept": [], "endpoints": [],
    }
    cert.update(fields)
    return cert


def endpoint(outcome="current", address="imaps://127.0.0.1:993", **fields):
    data = {
        "endpoint": address, "outcome": outcome, "served_sha256": "ab" * 32, "served_serial": "04A1B2",
        "served_not_after": NOW + 45 * DAY, "error": None, "checked": NOW - 60,
    }
    data.update(fields)
    return data


def snapshot(*certificates, **fields):
    data = {
        "time": NOW,
        "last_run": NOW - 17 * 60,
        "error": None,
        "certificates": list(certificates) or [certificate(endpoints=[endpoint()]), certificate("other.org", 60.0)],
        "units": [
            {"unit": "dovecot.service", "verb": "restart", "result": "success", "time": NOW - 3 * 3600, "error": None},
        ],
        "notifications": {"pending": 0, "kept": 0, "deferred": 0},
        "actions_total": [{"unit": "dovecot.service", "verb": "restart", "result": "success", "count": 4}],
    }
    data.update(fields)
    return data


KEPT = {
    "action": "restart exim4.service",
    "error": "exit status 1: Job for exim4.service failed.\nSee 'journalctl -xe'",
    "attempts": 3,
}
KEPT_REASON = (
    "restart exim4.service failed (3 attempts): exit status 1: Job for exim4.service failed. See 'journalctl -xe'"
)


def status_line_and_perfdata(text):
    """Return (status text, [per-lineage perfdata items]) of plugin output, checking
    the format of the guidelines: the status line with the totals after " | ", long
    text lines, the last of them with " | " and the first lineage's item, then one
    item per line; every item valid."""
    lines = text.rstrip("\n").split("\n")
    status, _, totals = lines[0].partition(" | ")
    assert all(PERFDATA_ITEM.fullmatch(item) for item in totals.split(" ") if totals), totals
    items, piped = [], [index for index, line in enumerate(lines) if "|" in line]
    assert piped in ([], [0]) or piped[1:] == [piped[-1]] and len(piped) <= 2 and piped[0] == 0 and totals
    if len(piped) == 2:
        items = [lines[piped[1]].partition(" | ")[2], *lines[piped[1] + 1:]]
    assert all(PERFDATA_ITEM.fullmatch(item) for item in items), items
    return status, items


# --- needs_attention --------------------------------------------------------------


def test_nothing_needs_attention_when_all_is_current():
    assert report.needs_attention(snapshot()) == []


def test_needs_attention_names_each_problem():
    data = snapshot(
        certificate("kept.org", state="kept", kept=[KEPT]),
        certificate("served.org", endpoints=[endpoint(), endpoint("old", "smtp://127.0.0.1:25")]),
        certificate("late.org", 12.34, "warning"),
        certificate("gone.org", -2.0, "critical"),
        certificate("broken.org", None, None, state="unreadable", error="cert.pem: No such file", sha256=None),
        units=[
            {"unit": "exim4.service", "verb": "restart", "result": "failure", "time": NOW, "error": "exit status 1"},
            {"unit": "apache2.service", "verb": "reload", "result": "failure", "time": NOW, "error": "exit status 1"},
        ],
    )

    assert report.needs_attention(data) == [
        f"kept.org: {KEPT_REASON}",
        "served.org: smtp://127.0.0.1:25 still serves the old certificate",
        "late.org: expires in 12.3 days (warning below 18 days)",
        "gone.org: expired 2.0 days ago",
        "broken.org: cannot read the live certificate: cert.pem: No such file",
        # exim4's failure is the kept action above: one problem, reported once
        "apache2.service: reload failed: exit status 1",
    ]


def test_an_unreadable_state_needs_attention():
    assert report.needs_attention(snapshot(error="rules.toml:3: unknown key 'restrat'")) == [
        "cannot read certrelay's state: rules.toml:3: unknown key 'restrat'"
    ]


# --- table ------------------------------------------------------------------------


def test_table_of_a_healthy_host():
    text = report.table(snapshot())
    lines = text.splitlines()

    assert lines[0] == "NAME         STATE    DAYS  NOT AFTER (UTC)   SERIAL  SHA256        ACTED ON (UTC)"
    assert lines[1] == "example.org  current  45.0  2026-01-12 03:20  04A1B2  abababababab  2025-10-19 03:20"
    assert lines[2].startswith("other.org ")  # no detail lines: nothing to say
    assert "dovecot.service  restart      success  2025-11-28 00:20 (3 h ago)" in lines
    assert "last run: 2025-11-28 03:03 (17 min ago)" in lines
    assert "notifications: 0 pending, 0 kept, 0 deferred" in lines
    assert lines[-1] == "all certificates current"
    assert not any(line.startswith("    ") for line in lines)


def test_table_columns_line_up():
    lines = report.table(snapshot(certificate("a.org"), certificate("a-much-longer-name.example.org"))).splitlines()

    assert len({line.index(" current ") for line in lines[1:3]}) == 1
    assert lines[0].index("STATE") == lines[1].index("current")


def test_table_details_only_where_there_is_something_to_say():
    data = snapshot(
        certificate("kept.org", state="kept", kept=[KEPT]),
        certificate("served.org", endpoints=[endpoint(), endpoint("old", "smtp://127.0.0.1:25", served_not_after=NOW)]),
        certificate("late.org", 12.34, "warning"),
        certificate("fine.org"),
        last_run=None,
    )

    lines = report.table(data).splitlines()

    def details(name):
        start = next(index for index, line in enumerate(lines) if line.startswith(name + " "))
        following = []
        for line in lines[start + 1:]:
            if not line.startswith("    "):
                break
            following.append(line.strip())
        return following

    assert details("kept.org") == [f"kept: {KEPT_REASON}; retried on the next run"]
    assert len(details("served.org")) == 1
    assert details("served.org")[0].startswith(
        "smtp://127.0.0.1:25 still serves the old certificate, not after 2025-11-28 03:20: the service was not"
    )
    assert "imaps" not in report.table(data)  # a current endpoint is not worth a line
    assert details("late.org")[0].startswith("warning: expires in 12.3 days (warning below 18 days); certbot renews")
    assert details("fine.org") == []
    assert "last run: never" in lines
    assert lines[-1].startswith("3 problem(s): kept.org: restart exim4.service failed")


def test_table_of_an_unreadable_state():
    text = report.table(snapshot(error="rules.toml:3: unknown key", certificates=[], units=[], last_run=None))

    assert text.startswith("error: cannot read certrelay's state: rules.toml:3: unknown key\n")
    assert "no certificates" in text
    assert text.endswith("1 problem(s): cannot read certrelay's state: rules.toml:3: unknown key\n")


def test_table_shows_failed_units_with_their_error():
    failed = {
        "unit": "apache2.service", "verb": "reload", "result": "failure", "time": NOW - 30,
        "error": "Job failed.\nDetails",
    }
    data = snapshot(units=[failed])

    lines = report.table(data).splitlines()
    index = next(index for index, line in enumerate(lines) if line.startswith("apache2.service"))

    assert lines[index].split()[1:3] == ["reload", "failure"]
    assert lines[index].endswith("(just now)")
    assert lines[index + 1] == "    Job failed. Details"


def test_a_name_with_a_newline_stays_on_its_line():
    text = report.table(snapshot(certificate("bad\nname")))

    assert "bad\\nname  current" in text


# --- as_json ----------------------------------------------------------------------


def test_as_json_parses_back_with_stable_keys_and_rfc3339_times():
    data = snapshot(
        certificate(
            "served.org", 12.5, "warning", endpoints=[endpoint("old", served_not_after=None)], kept=[KEPT], state="kept"
        ),
        last_run=None,
    )

    text = report.as_json(data)
    document = json.loads(text)

    assert text == report.as_json(data)
    assert list(document) == [
        "time", "last_run", "error", "certificates", "units", "notifications", "dropped", "actions_total", "unsent_alerts",
        "problems",
    ]
    assert document["time"] == "2025-11-28T03:20:00Z"
    assert document["last_run"] is None
    cert = document["certificates"][0]
    assert list(cert)[:3] == ["name", "state", "level"]
    assert cert["name"] == "served.org"
    assert cert["sha256"] == "ab" * 32
    assert cert["not_after"] == "2025-12-10T15:20:00Z"
    assert cert["days_left"] == 12.5
    assert cert["state"] == "kept" and cert["level"] == "warning"
    assert cert["domains"] == ["served.org", "*.served.org"]
    assert cert["acted"] == {"sha256": "ab" * 32, "time": "2025-10-19T03:20:00Z"}
    assert cert["kept"] == [KEPT]
    assert cert["endpoints"] == [{
        "endpoint": "imaps://127.0.0.1:993", "outcome": "old", "served_sha256": "ab" * 32, "served_serial": "04A1B2",
        "served_not_after": None, "error": None, "checked": "2025-11-28T03:19:00Z",
    }]
    assert document["units"] == [
        {"unit": "dovecot.service", "verb": "restart", "result": "success", "time": "2025-11-28T00:20:00Z",
         "error": None},
    ]
    assert document["notifications"] == {"pending": 0, "kept": 0, "deferred": 0}
    assert document["actions_total"] == [
        {"unit": "dovecot.service", "verb": "restart", "result": "success", "count": 4}
    ]
    assert len(document["problems"]) == 3


def test_as_json_of_an_unreadable_certificate_and_state():
    data = snapshot(
        certificate("broken.org", None, None, state="unreadable", error="missing", sha256=None, serial=None,
                    not_before=None, not_after=None, fraction_left=None, acted=None),
        error="rules invalid",
    )

    document = json.loads(report.as_json(data))

    assert document["error"] == "rules invalid"
    assert document["certificates"][0]["not_after"] is None
    assert document["certificates"][0]["days_left"] is None
    assert document["certificates"][0]["acted"] is None


# --- nagios -----------------------------------------------------------------------


def test_nagios_ok():
    code, text = report.nagios(snapshot())
    status, perfdata = status_line_and_perfdata(text)

    assert code == 0
    assert status == "CERTRELAY OK - 2 certificate(s) current, next expiry example.org in 45.0 days"
    assert perfdata == ["'example.org'=45.00;18:;9:;0;90", "'other.org'=60.00;18:;9:;0;90"]


def test_nagios_warning_for_an_expiry_warning():
    code, text = report.nagios(snapshot(certificate("example.org", 12.34, "warning"), certificate("other.org")))
    status, perfdata = status_line_and_perfdata(text)

    assert code == 1
    assert status == "CERTRELAY WARNING - example.org: expires in 12.3 days (warning below 18 days)"
    assert perfdata[0] == "'example.org'=12.34;18:;9:;0;90"


def test_nagios_warning_for_a_kept_action():
    code, text = report.nagios(snapshot(certificate(state="kept", kept=[KEPT])))

    assert code == 1
    assert text.startswith("CERTRELAY WARNING - example.org: restart exim4.service failed (3 attempts)")


def test_nagios_critical_for_expiry():
    data = snapshot(
        certificate("soon.org", 4.5, "critical", critical_days=9.5), certificate("late.org", 12.0, "warning")
    )

    code, text = report.nagios(data)
    status, perfdata = status_line_and_perfdata(text)

    assert code == 2
    assert status == (
        "CERTRELAY CRITICAL - soon.org: expires in 4.5 days (critical below 9.5 days);"
        " late.org: expires in 12.0 days (warning below 18 days)"
    )
    assert perfdata[0] == "'soon.org'=4.50;18:;9.5:;0;90"


def test_nagios_critical_for_an_expired_certificate():
    code, text = report.nagios(snapshot(certificate("gone.org", -2.0, "critical")))
    status, perfdata = status_line_and_perfdata(text)

    assert code == 2
    assert status == "CERTRELAY CRITICAL - gone.org: expired 2.0 days ago"
    assert perfdata == ["'gone.org'=-2.00;18:;9:;0;90"]


@pytest.mark.parametrize(
    "outcome, summary",
    [("old", "still serves the old certificate"), ("other", "serves another certificate (serial 04A1B2)"),
     ("unreachable", "unreachable: connection refused")],
)
def test_nagios_critical_for_an_endpoint_not_current(outcome, summary):
    served = endpoint(outcome, "smtp://127.0.0.1:25", error="connection refused" if outcome == "unreachable" else None)

    code, text = report.nagios(snapshot(certificate(endpoints=[endpoint(), served])))
    status, _ = status_line_and_perfdata(text)

    assert code == 2
    assert status == f"CERTRELAY CRITICAL - example.org: smtp://127.0.0.1:25 {summary}"


def test_nagios_unknown_when_the_state_cannot_be_read():
    code, text = report.nagios(snapshot(error="rules.toml:3: unknown key 'restrat'"))

    assert code == 3
    assert text.splitlines()[0] == (
        "CERTRELAY UNKNOWN - cannot read certrelay's state: rules.toml:3: unknown key 'restrat'"
    )
    assert "|" not in text


def test_nagios_summarizes_many_problems_on_one_line_and_lists_them_all_after_it():
    names = [f"n{index}.org" for index in range(5)]
    code, text = report.nagios(snapshot(*(certificate(name, 5.0, "critical") for name in names)))
    lines = text.splitlines()

    assert code == 2
    assert lines[0].startswith("CERTRELAY CRITICAL - n0.org: expires in 5.0 days (critical below 9 days); n1.org: ")
    assert " (and 3 more) | " in lines[0]
    listed = [line for line in lines[1:] if "expires in" in line]
    assert listed == [f"{name}: expires in 5.0 days (critical below 9 days)" for name in names]
    assert len(status_line_and_perfdata(text)[1]) == 5


def test_nagios_text_never_has_a_pipe_before_the_perfdata():
    data = snapshot(certificate(state="kept", kept=[dict(KEPT, error="a | b\nc")]))

    code, text = report.nagios(data)

    assert code == 1
    assert text.count("|") == 2 and "a / b c" in text  # the two perfdata separators, no more


def test_nagios_perfdata_labels_are_quoted_and_escaped():
    _, text = report.nagios(snapshot(certificate("it's=odd")))

    assert status_line_and_perfdata(text)[1] == ["'it''s_odd'=45.00;18:;9:;0;90"]


def test_nagios_with_hundreds_of_lineages_keeps_a_short_status_line_with_totals():
    names = [f"site{index}.example" for index in range(300)]
    certificates = [certificate(name, 40.0 + index / 10) for index, name in enumerate(names)]
    certificates[7] = certificate(names[7], 12.0, "warning")
    certificates[9] = certificate(names[9], None, None)

    code, text = report.nagios(snapshot(*certificates))
    status, items = status_line_and_perfdata(text)
    first = text.splitlines()[0]

    assert code == 1
    assert len(first) < 250, first
    assert first.endswith(" | 'certificates'=300;;;0; 'warning'=1;;;0; 'critical'=0;;;0; 'undated'=1;;;0;"
                          " 'days_left_min'=12.00;;;;")
    assert len(items) == 299 and items[7] == "'site7.example'=12.00;18:;9:;0;90"
    lines = text.splitlines()
    last_text = next(index for index, line in enumerate(lines) if index and " | " in line)
    assert lines[last_text].endswith(" | 'site0.example'=40.00;18:;9:;0;90")
    assert lines[last_text].startswith("site299.example: current") and len(lines) == last_text + 299


def test_nagios_without_certificates_is_ok_without_perfdata():
    code, text = report.nagios(snapshot(certificates=[]))

    assert (code, text) == (0, "CERTRELAY OK - no certificates\n")


def test_nagios_leaves_out_the_perfdata_of_an_unreadable_certificate():
    broken = certificate("broken.org", None, None, state="unreadable", error="missing", not_after=None, not_before=None)

    code, text = report.nagios(snapshot(broken, certificate("fine.org")))

    assert code == 1
    assert status_line_and_perfdata(text) == (
        "CERTRELAY WARNING - broken.org: cannot read the live certificate: missing", ["'fine.org'=45.00;18:;9:;0;90"]
    )
