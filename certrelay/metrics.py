"""The Prometheus textfile: a snapshot (see certrelay.report) in the text exposition
format, for node_exporter's textfile collector (Debian: /var/lib/prometheus/node-exporter).

Metrics (gauges unless noted); a family with no sample is left out:

- certrelay_certificate_not_after_timestamp_seconds{name}
- certrelay_certificate_renew_timestamp_seconds{name}, certrelay_certificate_overdue{name}:
  when certbot's policy renews it, and whether that is overdue-grace past
- certrelay_certificate_not_before_timestamp_seconds{name}
- certrelay_certificate_info{name,sha256,serial} 1
- certrelay_certificate_expiry_level{name}: 0 ok, 1 warning, 2 critical
- certrelay_served_certificate_current{name,endpoint}: 1 (outcome current) or 0 (chain, old,
  other, unreachable: see certrelay.verify.OUTCOMES)
- certrelay_served_certificate_not_after_timestamp_seconds{name,endpoint}: when known
- certrelay_notifications{state}: pending, kept, deferred (always all three)
- certrelay_actions_total{unit,verb,result}: a counter
- certrelay_last_run_timestamp_seconds: when known
- certrelay_fleet_published_timestamp_seconds{host,name}, certrelay_fleet_served_current{host,name}:
  on a certbot host with a [fleet], when each host's copy was published and whether the
  host acknowledges serving it (1) or not (0); none when etcd could not be read
"""

import math

from certrelay import files

LEVELS = {"ok": 0, "warning": 1, "critical": 2}
NOTIFICATION_STATES = ("pending", "kept", "deferred")


def render(snapshot):
    """Return the snapshot's metrics as exposition-format text (ends with a newline)."""
    certificates = snapshot.get("certificates") or []
    families = [
        *certificate_families(certificates),
        *endpoint_families(certificates),
        (
            "certrelay_notifications", "gauge",
            "Notifications by state: pending (waiting in the queue), kept (an action"
            " failed, retried), deferred (waiting for a unit's min-interval).",
            [({"state": state}, (snapshot.get("notifications") or {}).get(state, 0)) for state in NOTIFICATION_STATES],
        ),
        (
            "certrelay_actions_total", "counter",
            "Actions certrelay took on units, by outcome.",
            [
                ({"unit": action["unit"], "verb": action["verb"], "result": action["result"]}, action["count"])
                for action in snapshot.get("actions_total") or []
            ],
        ),
        (
            "certrelay_last_run_timestamp_seconds", "gauge",
            "When certrelay last processed a batch, in seconds since the epoch.",
            [({}, snapshot.get("last_run"))],
        ),
        (
            "certrelay_fleet_published_timestamp_seconds", "gauge",
            "When the certbot host last published a lineage to a fleet host.",
            [({"host": row["host"], "name": row["name"]}, row["published"]) for row in snapshot.get("fleet") or []],
        ),
        (
            "certrelay_fleet_served_current", "gauge",
            "1 if the fleet host acknowledges serving what was published, else 0.",
            [({"host": row["host"], "name": row["name"]}, row["current"]) for row in snapshot.get("fleet") or []],
        ),
    ]
    return "".join(family_text(*family) for family in families)


def certificate_families(certificates):
    """Return the (name, type, help, samples) families about the live certificates."""
    return [
        (
            "certrelay_certificate_not_after_timestamp_seconds", "gauge",
            "When the lineage's live certificate expires, in seconds since the epoch.",
            [({"name": cert["name"]}, cert.get("not_after")) for cert in certificates],
        ),
        (
            "certrelay_certificate_renew_timestamp_seconds", "gauge",
            "When certbot's own policy renews the lineage's live certificate (renewal/NAME.conf).",
            [({"name": cert["name"]}, cert.get("renew_at")) for cert in certificates],
        ),
        (
            "certrelay_certificate_overdue", "gauge",
            "1 if the lineage was not renewed overdue-grace after certbot's policy renews it, else 0.",
            [({"name": cert["name"]}, None if cert.get("overdue") is None else int(cert["overdue"]))
             for cert in certificates],
        ),
        (
            "certrelay_certificate_not_before_timestamp_seconds", "gauge",
            "When the lineage's live certificate became valid, in seconds since the epoch.",
            [({"name": cert["name"]}, cert.get("not_before")) for cert in certificates],
        ),
        (
            "certrelay_certificate_info", "gauge",
            "The lineage's live certificate: its SHA-256 fingerprint and serial (value 1).",
            [
                ({"name": cert["name"], "sha256": cert["sha256"], "serial": cert.get("serial") or ""}, 1)
                for cert in certificates if cert.get("sha256")
            ],
        ),
        (
            "certrelay_certificate_expiry_level", "gauge",
            "Expiry level of the lineage's live certificate: 0 ok, 1 warning, 2 critical.",
            [({"name": cert["name"]}, LEVELS.get(cert.get("level"))) for cert in certificates],
        ),
    ]


def endpoint_families(certificates):
    """Return the families about what the probed endpoints serve."""
    endpoints = [(cert["name"], endpoint) for cert in certificates for endpoint in cert.get("endpoints") or []]
    return [
        (
            "certrelay_served_certificate_current", "gauge",
            "1 if the endpoint serves the lineage's live certificate and chain, else 0.",
            [
                ({"name": name, "endpoint": endpoint["endpoint"]}, int(endpoint.get("outcome") == "current"))
                for name, endpoint in endpoints
            ],
        ),
        (
            "certrelay_served_certificate_not_after_timestamp_seconds", "gauge",
            "When the certificate the endpoint serves expires, in seconds since the epoch.",
            [
                ({"name": name, "endpoint": endpoint["endpoint"]}, endpoint.get("served_not_after"))
                for name, endpoint in endpoints
            ],
        ),
    ]


def family_text(name, metric_type, help_text, samples):
    """Return the HELP, TYPE and sample lines of one family; "" if no sample has a
    value (None means unknown and is left out)."""
    lines = [f"{name}{labels_text(labels)} {value_text(value)}\n" for labels, value in samples if value is not None]
    if not lines:
        return ""
    help_text = help_text.replace("\\", "\\\\").replace("\n", "\\n")
    return f"# HELP {name} {help_text}\n# TYPE {name} {metric_type}\n" + "".join(lines)


def labels_text(labels):
    """Return `{key="value",...}` with the values escaped, or "" for no labels."""
    if not labels:
        return ""
    pairs = (f'{key}="{escape_label_value(str(value))}"' for key, value in labels.items())
    return "{" + ",".join(pairs) + "}"


def escape_label_value(value):
    """Escape backslash, double quote and newline as the exposition format requires."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def value_text(value):
    """Return a sample value as the exposition format writes it: integers without a
    fraction, the shortest exact text for other floats, NaN and +Inf/-Inf."""
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def write(path, text):
    """Replace the textfile `path` by `text` atomically, mode 0644: the temp file is
    dot-prefixed (the textfile collector ignores it) and in the same directory, so the
    collector never reads half a file."""
    files.write_atomically(path, text.encode("utf-8"), 0o644)
