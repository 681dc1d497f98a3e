"""`certrelay fleet status`: per host and lineage, what etcd holds as published and
what the host acknowledges serving, as a table, JSON or a Nagios plugin's output."""

import json
import time

from certrelay.fleet import config as fleet_config, publish


def collect(fleet, config_dir, state_dir):
    """Return (rows, error): a row per host and lineage published to a host of
    `fleet`, and None, or ([], why etcd cannot be read). A row: host, name,
    fingerprint and published (epoch) from the store's clear fields, acked (the
    fingerprint the host serves), state (current, pending, late, old, failed,
    refused, unreadable), reason, since (epoch of the ack)."""
    from certrelay.fleet import seal, store

    publisher = publish.Publisher(fleet, config_dir, state_dir)
    try:
        _, values = publisher.etcd("range", fleet_config.PREFIX + "hosts/")
        acks = publisher.acknowledgements()
    except store.StoreError as error:
        return [], f"fleet: cannot read etcd: {error}"
    rows, now = [], time.time()
    hosts = {host.name for host in fleet.hosts}
    for kv in values:
        host, _, name = kv.key[len(fleet_config.PREFIX + "hosts/"):].partition("/lineages/")
        if host not in hosts:
            continue
        row = {"host": host, "name": name, "fingerprint": None, "published": None, "acked": None,
               "state": "unreadable", "reason": None, "since": None}
        try:
            clear = seal.peek(kv.value)
        except seal.Refused as refused:
            row["reason"] = f"the published value cannot be read: {refused.reason}"
            rows.append(row)
            continue
        row["fingerprint"], row["published"] = clear.get("fingerprint"), clear.get("published_at")
        ack = acks.get((host, name), {})
        row["acked"], row["since"], row["reason"] = ack.get("fingerprint"), ack.get("time"), ack.get("reason")
        state = publish.ack_state(ack, {"fingerprint": row["fingerprint"]})
        if state in ("none", "pending", "old"):
            published = row["published"] if isinstance(row["published"], (int, float)) else now
            if now - published > fleet.ack_timeout:
                state = "late"
            elif state == "none":
                state = "pending"
        row["state"] = state if ack.get("state") != "refused" else "refused"
        if state == "late" and not row["reason"]:
            row["reason"] = publish.describe_ack(ack)
        rows.append(row)
    return sorted(rows, key=lambda row: (row["host"], row["name"])), None


def table(rows):
    """Return the rows as a text table."""
    if not rows:
        return "nothing published yet"
    lines = [f"{'HOST':<16} {'LINEAGE':<28} {'STATE':<9} {'PUBLISHED':<17} ACKNOWLEDGED"]
    for row in rows:
        lines.append(f"{row['host']:<16} {row['name']:<28} {row['state']:<9} {moment(row['published']):<17}"
                     f" {(row['acked'] or '-')[:16]} {moment(row['since'])}")
        if row["reason"] and row["state"] != "current":
            lines.append(f"{'':<16} {row['reason']}")
    return "\n".join(lines)


def moment(epoch):
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(epoch)) if isinstance(epoch, (int, float)) else "-"


def as_json(rows):
    return json.dumps(rows, indent=1, sort_keys=True)


def nagios(rows, error):
    """Return (exit code, text) as a Nagios plugin: CRITICAL for a late, refused,
    failed or unreadable row or an unreadable store, WARNING for one pending."""
    if error:
        return 2, f"CERTRELAY FLEET CRITICAL - {error}"
    bad = [row for row in rows if row["state"] in ("late", "refused", "failed", "unreadable", "old")]
    waiting = [row for row in rows if row["state"] == "pending"]
    summary = f"{len(rows) - len(bad) - len(waiting)}/{len(rows)} served as published"
    detail = "; ".join(f"{row['host']}/{row['name']} {row['state']}" for row in bad + waiting)[:1000]
    if bad:
        return 2, f"CERTRELAY FLEET CRITICAL - {summary}: {detail}"
    if waiting:
        return 1, f"CERTRELAY FLEET WARNING - {summary}: {detail}"
    return 0, f"CERTRELAY FLEET OK - {summary}"
