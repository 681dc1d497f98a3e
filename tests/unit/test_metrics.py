"""The Prometheus textfile (certrelay.metrics), read back with a strict parser of the
text exposition format written here, so that the test needs no prometheus_client."""

import os
import re
import stat

import pytest

from certrelay import metrics

NOW = 1764300000.0
DAY = 86400.0
NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
UNESCAPE = {"\\": "\\", '"': '"', "n": "\n"}


def parse_exposition(text):
    """Return {family: {"help", "type", "samples": [(name, labels, value)]}} from
    exposition-format `text`, asserting the rules a scraper relies on: HELP and TYPE
    before the family's samples, each family in one block, valid names and escapes."""
    assert text.endswith("\n")
    families, current = {}, None
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            _, keyword, name, rest = line.split(" ", 3)
            assert NAME.fullmatch(name)
            if name != current:
                assert name not in families, f"{name} appears in two blocks"
                families[name] = {"samples": []}
                current = name
            if keyword == "HELP":
                families[name]["help"] = re.sub(r"\\(.)", lambda match: UNESCAPE[match.group(1)], rest)
            else:
                assert rest in ("gauge", "counter")
                families[name]["type"] = rest
            continue
        name, labels, value = parse_sample(line)
        assert name == current, line  # a sample belongs to the family above it
        families[current]["samples"].append((name, labels, value))
    return families


def parse_sample(line):
    """Return (name, {label: value}, float) of one sample line."""
    name = NAME.match(line).group()
    position, labels = len(name), {}
    if line[position] == "{":
        position += 1
        while line[position] != "}":
            label = LABEL_NAME.match(line, position).group()
            position += len(label)
            assert line[position:position + 2] == '="', line
            position += 2
            value = []
            while line[position] != '"':
                if line[position] == "\\":
                    value.append(UNESCAPE[line[position + 1]])  # KeyError: a bad escape
                    position += 2
                else:
                    assert line[position] != "\n"
                    value.append(line[position])
                    position += 1
            assert label not in labels
            labels[label] = "".join(value)
            position += 1
            if line[position] == ",":
                position += 1
        position += 1
    assert line[position] == " ", line
    return name, labels, float(line[position + 1:])


def certificate(name, **fields):
    cert = {
        "name": name, "domains": [name], "sha256": "ab" * 32, "serial": "03F1",
        "not_before": NOW - 80 * DAY, "not_after": NOW + 10 * DAY, "days_left": 10.0, "fraction_left": 0.111,
        "level": "warning", "warning_days": 18.0, "critical_days": 9.0, "state": "current", "error": None,
        "acted": None, "kept": [], "endpoints": [],
    }
    cert.update(fields)
    return cert


def snapshot(**fields):
    data = {
        "time": NOW,
        "last_run": NOW - 600.5,
        "error": None,
        "certificates": [
            certificate(
                "example.org",
                endpoints=[
                    {"endpoint": "imaps://127.0.0.1:993", "outcome": "current", "served_sha256": "ab" * 32,
                     "served_serial": "03F1", "served_not_after": NOW + 10 * DAY, "error": None, "checked": NOW},
                    {"endpoint": "smtp://127.0.0.1:25", "outcome": "old", "served_sha256": "cd" * 32,
                     "served_serial": "02", "served_not_after": NOW - DAY, "error": None, "checked": NOW},
                    {"endpoint": "https://127.0.0.1:8443", "outcome": "unreachable", "served_sha256": None,
                     "served_serial": None, "served_not_after": None, "error": "refused", "checked": NOW},
                ],
            ),
            certificate('we"ird\\na\nme', sha256="ef" * 32, serial="01", level="critical", not_after=NOW + 0.25),
            certificate("plain.org", level="ok"),
        ],
        "units": [],
        "notifications": {"pending": 2, "kept": 1, "deferred": 0},
        "actions_total": [
            {"unit": "dovecot.service", "verb": "restart", "result": "success", "count": 4},
            {"unit": "exim4.service", "verb": "restart", "result": "failure", "count": 1},
        ],
    }
    data.update(fields)
    return data


def samples(families, family):
    return {tuple(sorted(labels.items())): value for _, labels, value in families[family]["samples"]}


@pytest.fixture
def families():
    return parse_exposition(metrics.render(snapshot()))


def test_every_family_has_help_and_type(families):
    assert {name: family["type"] for name, family in families.items()} == {
        "certrelay_certificate_not_after_timestamp_seconds": "gauge",
        "certrelay_certificate_not_before_timestamp_seconds": "gauge",
        "certrelay_certificate_info": "gauge",
        "certrelay_certificate_expiry_level": "gauge",
        "certrelay_served_certificate_current": "gauge",
        "certrelay_served_certificate_not_after_timestamp_seconds": "gauge",
        "certrelay_notifications": "gauge",
        "certrelay_actions_total": "counter",
        "certrelay_last_run_timestamp_seconds": "gauge",
    }
    assert all(family["help"] for family in families.values())


def test_certificate_metrics(families):
    weird = 'we"ird\\na\nme'  # a quote, a backslash and a newline, escaped and back

    assert samples(families, "certrelay_certificate_not_after_timestamp_seconds") == {
        (("name", "example.org"),): NOW + 10 * DAY,
        (("name", weird),): NOW + 0.25,
        (("name", "plain.org"),): NOW + 10 * DAY,
    }
    not_before = samples(families, "certrelay_certificate_not_before_timestamp_seconds")
    assert not_before[(("name", "plain.org"),)] == NOW - 80 * DAY
    assert samples(families, "certrelay_certificate_info") == {
        (("name", "example.org"), ("serial", "03F1"), ("sha256", "ab" * 32)): 1,
        (("name", weird), ("serial", "01"), ("sha256", "ef" * 32)): 1,
        (("name", "plain.org"), ("serial", "03F1"), ("sha256", "ab" * 32)): 1,
    }
    assert samples(families, "certrelay_certificate_expiry_level") == {
        (("name", "example.org"),): 1, (("name", weird),): 2, (("name", "plain.org"),): 0,
    }


def test_label_values_are_escaped_in_the_text():
    text = metrics.render(snapshot())

    assert 'certrelay_certificate_expiry_level{name="we\\"ird\\\\na\\nme"} 2\n' in text


def test_endpoint_metrics_give_not_after_only_when_known(families):
    assert samples(families, "certrelay_served_certificate_current") == {
        (("endpoint", "imaps://127.0.0.1:993"), ("name", "example.org")): 1,
        (("endpoint", "smtp://127.0.0.1:25"), ("name", "example.org")): 0,
        (("endpoint", "https://127.0.0.1:8443"), ("name", "example.org")): 0,
    }
    assert samples(families, "certrelay_served_certificate_not_after_timestamp_seconds") == {
        (("endpoint", "imaps://127.0.0.1:993"), ("name", "example.org")): NOW + 10 * DAY,
        (("endpoint", "smtp://127.0.0.1:25"), ("name", "example.org")): NOW - DAY,
    }


def test_notifications_actions_and_last_run(families):
    assert samples(families, "certrelay_notifications") == {
        (("state", "pending"),): 2, (("state", "kept"),): 1, (("state", "deferred"),): 0,
    }
    assert samples(families, "certrelay_actions_total") == {
        (("result", "success"), ("unit", "dovecot.service"), ("verb", "restart")): 4,
        (("result", "failure"), ("unit", "exim4.service"), ("verb", "restart")): 1,
    }
    assert samples(families, "certrelay_last_run_timestamp_seconds") == {(): NOW - 600.5}


def test_an_empty_snapshot_still_gives_all_three_notification_states():
    families = parse_exposition(
        metrics.render({"time": NOW, "last_run": None, "error": "rules invalid", "certificates": [], "units": [],
                        "notifications": {}, "actions_total": []})
    )

    assert list(families) == ["certrelay_notifications"]
    assert samples(families, "certrelay_notifications") == {
        (("state", "pending"),): 0, (("state", "kept"),): 0, (("state", "deferred"),): 0,
    }


def test_an_unreadable_certificate_has_no_samples_of_unknown_values():
    unreadable = certificate(
        "broken.org", sha256=None, serial=None, not_before=None, not_after=None, days_left=None, level=None,
        state="unreadable", error="cert.pem missing",
    )

    families = parse_exposition(metrics.render(snapshot(certificates=[unreadable])))

    assert "certrelay_certificate_info" not in families
    assert "certrelay_certificate_not_after_timestamp_seconds" not in families
    assert "certrelay_certificate_expiry_level" not in families


@pytest.mark.parametrize(
    "value, text",
    [(1, "1"), (1764300000.0, "1764300000"), (1764299399.5, "1764299399.5"), (0.1, "0.1"),
     (-2.0, "-2"), (float("nan"), "NaN"), (float("inf"), "+Inf"), (float("-inf"), "-Inf")],
)
def test_values(value, text):
    assert metrics.value_text(value) == text


def test_write_is_atomic_with_mode_0644(tmp_path):
    path = tmp_path / "certrelay.prom"
    path.write_text("old\n")
    os.chmod(path, 0o600)
    inode = path.stat().st_ino
    old_umask = os.umask(0o077)  # the mode must not depend on the umask
    try:
        metrics.write(str(path), metrics.render(snapshot()))
    finally:
        os.umask(old_umask)

    assert path.stat().st_ino != inode  # renamed over, never rewritten in place
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert os.listdir(tmp_path) == ["certrelay.prom"]
    assert parse_exposition(path.read_text())["certrelay_notifications"]


def test_write_uses_a_dot_prefixed_temp_file_and_cleans_it_up_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "certrelay.prom"
    path.write_text("old\n")
    seen = []

    def failing_replace(source, destination):
        seen.append(os.path.basename(source))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)

    with pytest.raises(OSError):
        metrics.write(str(path), "new\n")
    assert seen[0].startswith(".")  # node_exporter's textfile collector skips it
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["certrelay.prom"]
