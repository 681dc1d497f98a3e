"""Pins for certrelay.reconcile that mutation testing (make mutants, docs/mutants.md)
found missing, in-process: a lineage seen for the first time is probed quietly, and
what find() skips, records and acts on."""

import logging
import os
import socket

import pytest

from certrelay import lineages, reconcile, rules as rules_module, state
from tests import certs


def closed_port():
    """Return a TCP port on 127.0.0.1 that nothing listens on (refused at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def config_dir(tmp_path):
    directory = str(tmp_path / "letsencrypt")
    for name in ("a.ch", "b.ch"):
        certs.renew(directory, name)
    return directory


def scanned(config_dir):
    return sorted(lineages.Scanner(config_dir, None).scan(), key=lambda lineage: lineage.name)


def rules(text):
    return rules_module.parse(text.encode(), "rules.toml")


def test_a_first_sight_probe_says_nothing_of_its_own(config_dir, caplog, monkeypatch):
    monkeypatch.setattr(reconcile, "FIRST_SIGHT_TIMEOUT", 0.3)  # one round: refused is refused
    parsed = rules(f'[[rule]]\nmatch = ["a.ch"]\nreload = ["apache2"]\nverify = ["https://127.0.0.1:{closed_port()}"]\n')
    caplog.set_level(logging.DEBUG)

    found = reconcile.serving_something_else(scanned(config_dir), parsed, config_dir)

    assert found == {"a.ch"}
    assert [record for record in caplog.records if record.name == "certrelay.verify"] == []


def test_find_skips_the_announced_and_records_the_first_seen(config_dir, tmp_path, caplog):
    ledger = state.Store(str(tmp_path / "state"), "ledger.json")
    parsed = rules('[[rule]]\nmatch = ["*"]\nreload = ["apache2"]\n')
    both = scanned(config_dir)
    caplog.set_level(logging.INFO, logger="certrelay.reconcile")

    assert reconcile.find(both, config_dir, parsed, ledger, {"a.ch"}, {}, dry_run=False) == []

    assert ledger.data == {"b.ch": both[1].fingerprint} and ledger.changed
    assert [record.getMessage() for record in caplog.records] == ["b.ch: seen for the first time; recorded, nothing done"]
    certs.renew(config_dir, "b.ch")
    renewed = scanned(config_dir)

    found = reconcile.find(renewed, config_dir, parsed, ledger, set(), {}, dry_run=True)

    assert [(notification.entry, notification.name, notification.domains, fingerprint)
            for notification, fingerprint in found] == [("b.ch@reconcile", "b.ch", ("b.ch", "*.b.ch"),
                                                          renewed[1].fingerprint)]
    assert ledger.data == {"b.ch": both[1].fingerprint}


@pytest.mark.parametrize("dry_run, words", [(False, "acting on it"), (True, "would act on it")])
def test_a_first_seen_lineage_whose_endpoint_serves_something_else_is_acted_on_and_said(
        config_dir, tmp_path, caplog, monkeypatch, dry_run, words):
    monkeypatch.setattr(reconcile, "FIRST_SIGHT_TIMEOUT", 0.3)  # one round: refused is refused
    ledger = state.Store(str(tmp_path / "state"), "ledger.json")
    parsed = rules(f'[[rule]]\nmatch = ["a.ch"]\nreload = ["apache2"]\nverify = ["https://127.0.0.1:{closed_port()}"]\n')
    caplog.set_level(logging.WARNING, logger="certrelay.reconcile")

    found = reconcile.find(scanned(config_dir), config_dir, parsed, ledger, set(), {}, dry_run=dry_run)

    assert [notification.name for notification, _ in found] == ["a.ch"]
    assert [record.getMessage() for record in caplog.records] == [
        f"a.ch: seen for the first time, and an endpoint does not serve its live certificate; {words}"]
