"""certbot (as in its container) -> certrelay/certrelay-hook -> a queue file, against Pebble.

Real certbot from PyPI gets real certificates from Debian's Pebble by DNS-01; certbot
runs in a mount namespace with BusyBox as /bin/sh and no bash (see tests/acme.py), so
the deploy hook runs as it would in the certbot/dns-cloudflare image.
Needs root, pebble, busybox-static; the first run installs certbot into .cache/.
"""

from pathlib import Path

import pytest

from tests import acme

REPO = Path(__file__).resolve().parents[2]
HOOK = REPO / "certrelay" / "certrelay-hook"


REASON = acme.skip_reason() or (None if HOOK.exists() else f"{HOOK} does not exist yet")
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


def read_notification(path):
    """Return the key=value lines of a queue file as a dict."""
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One Pebble + challtestsrv for this module's tests."""
    with acme.acme_server(tmp_path_factory.mktemp("acme")) as running:
        yield running


def test_forced_renewal_of_wildcard_cert_queues_a_notification(server, tmp_path):
    config = tmp_path / "letsencrypt"
    acme.install_deploy_hook(config, HOOK)
    server.certonly(config, ["example.test", "*.example.test"])
    queue_file = config / "certrelay" / "queue" / "example.test"
    # certbot >= 5.3 runs deploy hooks for a new certificate too: clear that notification
    # so the one checked below comes from the renewal.
    queue_file.unlink(missing_ok=True)
    first_serial = acme.cert_serial(config, "example.test")

    result = server.renew(config)

    assert result.returncode == 0, result.stdout + result.stderr
    assert acme.cert_version(config, "example.test") == 2
    assert acme.cert_serial(config, "example.test") != first_serial
    assert queue_file.is_file(), result.stdout + result.stderr
    notification = read_notification(queue_file)
    assert notification["name"] == "example.test"
    assert notification["domains"].split() == ["example.test", "*.example.test"]
    # The hook saw the container's path: certbot's config dir is /etc/letsencrypt there.
    assert notification["lineage"] == "/etc/letsencrypt/live/example.test"
    assert sorted(p.name for p in (config / "certrelay" / "queue").iterdir()) == ["example.test"]


def test_renewal_with_one_failed_lineage_queues_the_others(server, tmp_path):
    config = tmp_path / "letsencrypt"
    acme.install_deploy_hook(config, HOOK)
    server.certonly(config, ["example.test", "*.example.test"])
    server.certonly(config, ["mail.example.test"])
    queue = config / "certrelay" / "queue"
    for pending in queue.iterdir():
        pending.unlink()

    result = server.renew(config, fail_domains=["mail.example.test"])

    # certbot renews the good lineage, runs its deploy hook, then exits 1 for the other,
    # because the auth hook refused it (renew() leaves no valid authorization to reuse).
    assert result.returncode == 1, result.stdout + result.stderr
    assert "acme auth hook: refusing mail.example.test" in result.stderr, result.stdout + result.stderr
    assert acme.cert_version(config, "example.test") == 2
    assert acme.cert_version(config, "mail.example.test") == 1
    assert sorted(p.name for p in queue.iterdir()) == ["example.test"]
