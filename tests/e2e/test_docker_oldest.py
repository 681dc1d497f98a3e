"""End to end: the README's cron line with the oldest certbot the README claims, Debian 12's.

Issue 19. The world of test_docker.py (docker_world), with certbot/dns-cloudflare:latest
built from Debian 12's own certbot 2.1.0 package (docker_image.certbot_image(OLDEST_CERTBOT):
BusyBox as /bin/sh, no bash, the official image's entry point and volumes): the
certificates are obtained with it, and the README's cron line, run as cron runs it,
renews them in that container and certrelay brings them to apache2, dovecot and exim4.

certbot before 4.0 renews when fewer than 30 days are left (renewal/NAME.conf names the
version that wrote it, and certrelay's overdue alarm follows the same rule). Pebble's
certificates here live 60 seconds, so each renewal conf gets `renew_before_expiry = 30
seconds`, which certbot 2.1 and certrelay both read: both then find a certificate due
after half its life, as with the current certbot.
"""

import pytest

from . import docker_image
from .test_docker import CHAIN_TIMEOUT, CRON_ENV, REASON, SERVICES, cron_line, docker_world
from .test_e2e import NAME, OTHER, spool_entries

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(REASON is not None, reason=REASON or "")]

POLICY = "renew_before_expiry = 30 seconds"


@pytest.fixture(scope="module")
def world():
    image = docker_image.certbot_image(docker_image.OLDEST_CERTBOT)
    with docker_world(image, name="certrelay-e2e-docker-oldest", policy=POLICY) as built:
        yield built


def test_image_runs_debian_12s_certbot(world):
    """The image the README's line runs is certbot 2.1.0, under BusyBox sh, without bash."""
    version = world.certbot("--version")
    assert (version.stdout + version.stderr).strip() == f"certbot {docker_image.OLDEST_CERTBOT}", version
    shell = world.certbot("-c", "readlink -f /bin/sh; command -v bash dash || echo none", entrypoint="/bin/sh")
    assert shell.stdout.split() == ["/usr/bin/busybox", "none"], shell
    conf = (world.config / "renewal" / f"{NAME}.conf").read_text()
    assert f"version = {docker_image.OLDEST_CERTBOT}\n" in conf, conf


def test_readme_cron_line_with_the_oldest_certbot_reaches_every_service(world):
    """The README's cron line as cron runs it, certbot 2.1.0 in the container: both
    certificates due, renewed, relayed; nothing printed, exit 0; apache2, dovecot and
    exim4 serve the new certificate, and `certrelay verify` proves it."""
    old, old_other = world.serial(), world.serial(OTHER)
    world.wait_until_due(NAME, OTHER)

    done = world.container.run([*CRON_ENV, "/bin/sh", "-c", cron_line()], timeout=CHAIN_TIMEOUT)
    output = done.stdout + done.stderr

    assert done.returncode == 0, world.explain(f"the cron line exited {done.returncode}:\n{output}")
    assert output == "", world.explain(f"the cron line printed (cron would mail it):\n{output}")
    new = world.serial()
    assert new != old and world.serial(OTHER) != old_other, "certbot 2.1 in the container did not renew both"
    assert world.served() == {unit: new for unit in SERVICES}, world.explain()
    status, verified = world.certrelay("verify")
    assert status == 0, world.explain(verified)
    assert spool_entries(world.config) == {"queue": [], "claimed": []}
    # certbot 2.1 kept the policy line when it rewrote the renewal conf.
    conf = (world.config / "renewal" / f"{NAME}.conf").read_text()
    assert POLICY in conf and f"version = {docker_image.OLDEST_CERTBOT}\n" in conf, conf
