"""One fingerprint: the SHA-256 of the certificate's DER in the ledger, `status` and
the logs, and a ledger an older certrelay wrote (the SHA-256 of cert.pem's bytes)
taken over on the first run without acting on anything."""

import hashlib
import json
import os

import pytest

from certrelay import certificate

NAMES = ("herzbube.ch", "moser-naef.ch")


def file_sha256(relay, name):
    with open(os.path.join(relay.config_dir, "live", name, "cert.pem"), "rb") as file:
        return hashlib.sha256(file.read()).hexdigest()


def ledger(relay):
    with open(os.path.join(relay.state_dir, "ledger.json"), encoding="utf-8") as file:
        return json.load(file)


def write_old_ledger(relay):
    """Leave the ledger an older certrelay left after acting on every lineage."""
    os.makedirs(relay.state_dir, exist_ok=True)
    with open(os.path.join(relay.state_dir, "ledger.json"), "w", encoding="utf-8") as file:
        json.dump({name: file_sha256(relay, name) for name in NAMES}, file)


def test_the_ledger_and_status_hold_the_der_fingerprint(relay):
    relay.publish("herzbube.ch")

    assert relay.run().returncode == 0
    status = json.loads(relay.run("--json", command="status").stdout)

    der = certificate.fingerprint(relay.config_dir, "herzbube.ch")
    assert der != file_sha256(relay, "herzbube.ch")
    assert ledger(relay) == {"herzbube.ch": der}
    assert [entry["sha256"] for entry in status["certificates"]] == [der]


@pytest.mark.parametrize("dry_run", [False, True])
def test_an_older_ledger_is_taken_over_without_acting(relay, dry_run):
    for name in NAMES:
        relay.renew(name)
    write_old_ledger(relay)
    relay.publish("herzbube.ch", renew=False)  # the hook ran again for an unchanged certificate

    result = relay.run(*(["--dry-run"] if dry_run else []))

    assert result.returncode == 0, result.stderr
    assert relay.calls() == []
    assert "changed but no notification came" not in result.stderr
    # A dry run changes nothing, the ledger included.
    assert ledger(relay) == {name: file_sha256(relay, name) if dry_run else certificate.fingerprint(relay.config_dir, name)
                             for name in NAMES}


def test_a_certificate_renewed_since_the_older_ledger_is_acted_on(relay):
    for name in NAMES:
        relay.renew(name)
    write_old_ledger(relay)
    relay.renew("moser-naef.ch")  # renewed, no notification: reconcile must still see it

    result = relay.run()

    assert result.returncode == 0, result.stderr
    assert relay.calls() == ["reload apache2.service"]
    assert "moser-naef.ch: its live certificate changed but no notification came" in result.stderr
    assert ledger(relay) == {name: certificate.fingerprint(relay.config_dir, name) for name in NAMES}
