"""End to end with a real Docker engine: certbot renews in a container, as the README runs it.

Issue 19. The world: the booted Debian of test_e2e.py (systemd-nspawn, apache2 on 443,
dovecot on 993, exim4 on 465, certrelay installed from its .deb), and beside it a real
dockerd holding the test image certbot/dns-cloudflare:latest (docker_image.py: Debian
minbase, certbot from PyPI, BusyBox as /bin/sh, no bash or dash, the official image's
entry point and volumes), derived once more to trust the test ACME server.

Why dockerd runs beside the booted system and not inside it as its docker.service: its
layers need overlay2, which does not stack on the overlay that is the booted system's
root, and systemd-nspawn withholds the cgroup and mount rights a daemon inside needs.
Beside it, in a private mount namespace (dockerd.py), its bind-mount sources
/etc/letsencrypt and /var/lib/letsencrypt resolve to the booted system's, as they do on
a server where both are the host's; and it shares the booted system's network namespace
(so the system boots first, before it has certificates), as on a server, where a port a
container publishes is on the host's loopback. The booted system holds Debian's docker
client, which reaches the daemon through /run/docker.sock. So the README's cron line and
certbot-docker-renew.service run unchanged inside the booted system, and the container
they start sees the booted system's certificates, hooks and spool.

Pebble and its DNS server listen on the Docker bridge's address (172.17.0.1), where the
container reaches them (the README's line has no `--network host`), with a certificate
lifetime of VALIDITY seconds: a plain `renew --quiet` finds a certificate due after half
of it (certbot's policy for short lifetimes), and /etc/letsencrypt/cli.ini has
`no-random-sleep-on-renew = true`, as the README says. The certificates are obtained by
the image too (`docker run ... certonly`, DNS-01 through challtestsrv).

Checked: the image is like the official one; the README's cron line, read from
README.md and run as cron runs it, renews in the container and every service serves the
new certificate (`certrelay verify`), the deploy hook having run under BusyBox as root
with the image's umask; `systemctl enable --now certbot-docker-renew.timer` and its
service with one certificate failing; the image missing, the daemon not running: the
journal says so and certrelay still runs; a hung `docker run` ended by the unit's start
timeout, the container gone; the path unit and the watch daemon relaying a notification
written in the container; a volume without the hook (reconcile).

Needs root, dockerd (docker.io), mmdebstrap, systemd-nspawn, pebble. The image's root
file system is cached in .cache/ (built in one to three minutes when its inputs change,
most of it mmdebstrap and pip downloading). test_docker_services.py (nginx in a
container) and test_docker_oldest.py (Debian 12's certbot 2.1.0) reuse docker_world.
"""

import contextlib
import datetime
import json
import os
import re
from pathlib import Path

import pytest

from .. import acme
from . import docker_image, dockerd, rootfs
from .container import Container, wait_until
from .test_e2e import (
    FILES, NAME, OTHER, REASON as E2E_REASON, REPO, configure_services, group_id, install_certrelay,
    served_serials, share_certificates, spool_entries,
)

#: Pebble's certificate lifetime (s): long enough to renew, relay and verify a fresh one
#: well before certrelay's expiry warning (a fifth of it left), short enough to be due soon.
VALIDITY = 60
IMAGE = dockerd.IMAGE
SERVICE = "certbot-docker-renew.service"
TIMER = "certbot-docker-renew.timer"
#: Commands as cron runs them: a minimal environment, no TTY (stdin /dev/null, output captured).
CRON_ENV = ["env", "-i", "PATH=/usr/bin:/bin", "SHELL=/bin/sh", "HOME=/root", "LOGNAME=root"]
CHAIN_TIMEOUT = 300  # seconds for one renewal in the container and certrelay run after it
DEBUG_UNITS = (SERVICE, "apache2", "dovecot", "exim4")
SERVICES = ("apache2", "dovecot", "exim4")


def cron_line():
    """The README's cron line (the command after the schedule), read from README.md."""
    lines = [line.strip() for line in (REPO / "README.md").read_text().splitlines()
             if line.strip().startswith("0 3 * * * docker run")]
    assert len(lines) == 1, f"README.md has {len(lines)} cron lines starting '0 3 * * * docker run'"
    return lines[0].split(" ", 5)[5]


def skip_reason():
    return E2E_REASON or docker_image.skip_reason() or dockerd.skip_reason()


REASON = skip_reason()
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(REASON is not None, reason=REASON or "")]


class DockerWorld:
    """The booted system, the daemon in its network namespace, Pebble on the bridge, the image."""

    def __init__(self, root, container, daemon, pebble, images):
        self.root = Path(root)
        self.config = self.root / "etc" / "letsencrypt"
        self.acme = images.acme_dir
        self.container = container
        self.daemon = daemon
        self.pebble = pebble
        self.images = images  # dockerd.CertbotInDocker

    def serial(self, name=NAME):
        return acme.cert_serial(self.config, name)

    def explain(self, *extra):
        state = (f"spool: {spool_entries(self.config)}\n"
                 f"failed units: {self.container.systemctl('--failed', '--no-legend', check=False)}")
        return "\n".join([*extra, state, self.container.journals(*DEBUG_UNITS),
                          f"--- dockerd\n{self.daemon.log(30)}", self.pebble.log()[-3000:]])

    def certbot(self, *args, entrypoint=None):
        """`docker run --rm` the image with the README's volumes, from the test's side."""
        return self.images.run(*args, entrypoint=entrypoint)

    def lifetime(self, name):
        """(not before, not after) of live/NAME/cert.pem, naive UTC."""
        from cryptography import x509
        cert = x509.load_pem_x509_certificate((self.config / "live" / name / "cert.pem").read_bytes())
        return cert.not_valid_before, cert.not_valid_after

    def wait_until_due(self, *names):
        """Wait until certbot's own policy finds every lineage in `names` due (half its lifetime gone)."""
        def due():
            now = datetime.datetime.utcnow()
            return all(now > start + (end - start) / 2 + datetime.timedelta(seconds=1)
                       for start, end in map(self.lifetime, names))
        wait_until(due, 3 * VALIDITY, interval=0.5, what=f"{', '.join(names)} to be due for renewal")

    def deactivate_authorizations(self):
        """Deactivate the account's valid authorizations (Pebble reuses one now and then,
        and a reused one never asks the auth hook), with the image's own Python."""
        done = self.daemon.docker(
            "run", "--rm", "-v", "/etc/letsencrypt:/etc/letsencrypt",
            "-v", f"{REPO / 'tests' / 'acme_hooks'}:/acme-hooks:ro", "--entrypoint", "/opt/certbot/bin/python",
            IMAGE, "/acme-hooks/deactivate_authzs.py", "/etc/letsencrypt", dockerd.DIRECTORY_URL, check=False)
        assert done.returncode == 0, done.stdout + done.stderr

    def certrelay(self, *args, timeout=120):
        done = self.container.run(["certrelay", *args], timeout=timeout)
        return done.returncode, done.stdout + done.stderr

    def restore_tag(self):
        self.images.restore_tag()

    def served(self):
        """{service: serial it serves} for apache2, dovecot and exim4."""
        return served_serials(self.container)


@contextlib.contextmanager
def docker_world(image=None, name="certrelay-e2e-docker", policy=None, validity=VALIDITY, log=print):
    """Yield a DockerWorld: the booted Debian with certrelay (installed from its .deb),
    apache2, dovecot and exim4; dockerd in its network namespace; Pebble on the bridge;
    example.test and other.test obtained with `image` (a docker_image.Image, default the
    current certbot) in the container, served by the three services; certrelay run once.
    `policy`: a line for each renewal/NAME.conf (e.g. renew_before_expiry) before any
    renewal; `validity`: Pebble's certificate lifetime (s). Everything is stopped by PID
    and unmounted after.

    The booted system comes first (apache2 and dovecot fail to start: no certificate yet),
    then dockerd joins its network namespace (see dockerd.py), so that a container's
    published port is on the booted system's loopback, as on a server."""
    image = image or docker_image.certbot_image()
    docker_image.cached_tar(image, log)
    with rootfs.scratch_root(f"{name}-") as (root, work_dir, stack):
        install_certrelay(root)
        configure_services(root)
        config = root / "etc" / "letsencrypt"
        (config / "cli.ini").write_text("no-random-sleep-on-renew = true\n")
        # Debian's docker client in the booted system (it is one static-enough binary: libc only).
        dockerd.install_file(dockerd.DOCKER, root / "usr" / "bin" / "docker")

        container = Container(root, work_dir / "console.log", name=name)
        stack.callback(container.stop)  # last: dockerd and Pebble live in its network namespace
        container.boot()
        daemon = dockerd.DockerDaemon(root, work_dir, network_of=container.leader)
        stack.callback(daemon.stop)
        daemon.start()
        container.run(["systemd-tmpfiles", "--create", "/etc/tmpfiles.d/certrelay-e2e-docker.conf"], check=True)
        images = dockerd.CertbotInDocker(daemon, config, image).prepare()
        pebble = dockerd.PebbleOnBridge(daemon, work_dir, images.acme_dir, validity)
        stack.callback(pebble.stop)
        pebble.start()

        world = DockerWorld(root, container, daemon, pebble, images)
        for domains in ([NAME, f"*.{NAME}"], [OTHER]):
            done = images.certonly(domains)
            assert done.returncode == 0, f"certonly {domains} in the image failed:\n{done.stdout}{done.stderr}\n{pebble.log()}"
            if policy:
                conf = config / "renewal" / f"{domains[0]}.conf"
                conf.write_text(f"{policy}\n{conf.read_text()}")
        # The deploy hook ran for the new certificates too (certbot 5.3 and later): the
        # services start with them.
        queue = config / "certrelay" / "queue"
        for pending in queue.iterdir() if queue.is_dir() else ():
            pending.unlink()
        share_certificates(config, group_id(root, "ssl-cert"))
        dockerd.install_file(FILES / "docker-probe-hook", config / "renewal-hooks" / "deploy" / "zz-e2e-probe")
        container.systemctl("reset-failed")
        container.systemctl("restart", *SERVICES)
        wait_until(lambda: all(world.served().values()), 60,
                   what="apache2, dovecot, exim4 to serve TLS", explain=world.explain)
        world.certrelay("run")  # records the live certificates (and may warn: they near expiry)
        yield world


@pytest.fixture(scope="module")
def world():
    """The DockerWorld of the current certbot image, for this module."""
    with docker_world() as built:
        yield built


def exec_starts(container):
    """The service's ExecStart= commands as `systemctl show` reports their last run, one line each."""
    out = container.systemctl("show", SERVICE, "--property=ExecStart")
    return [line for line in out.splitlines() if line.startswith("ExecStart=")]


def last_run(world):
    """When certrelay last ran (`certrelay status --json`: last_run), as epoch seconds."""
    done = world.container.run(["certrelay", "status", "--json"])
    report = json.loads(done.stdout)
    assert report["last_run"], done.stdout
    return datetime.datetime.fromisoformat(report["last_run"].replace("Z", "+00:00")).timestamp()


def chain_journal(world, since):
    return world.container.journal(SERVICE, since=since)


# --- the image ------------------------------------------------------------------------


def test_image_is_like_the_official_one(world):
    """certbot/dns-cloudflare:latest: entry point certbot (the pinned release), the two
    volumes, /bin/sh is BusyBox, no bash or dash; the README's client runs in the booted system."""
    inspect = world.daemon.docker("image", "inspect", "--format",
                                  "{{json .Config.Entrypoint}} {{json .Config.Volumes}}", IMAGE).stdout
    assert inspect.split()[0] == '["certbot"]', inspect
    assert "/etc/letsencrypt" in inspect and "/var/lib/letsencrypt" in inspect, inspect
    version = world.certbot("--version")
    assert version.returncode == 0 and docker_image.CERTBOT_VERSION in version.stdout + version.stderr, version
    shell = world.certbot("-c", "readlink -f /bin/sh; command -v bash dash || echo none", entrypoint="/bin/sh")
    assert shell.stdout.split() == ["/usr/bin/busybox", "none"], shell
    inside = world.container.run(["docker", "image", "ls", "--format", "{{.Repository}}:{{.Tag}}"])
    assert f"{IMAGE}:latest" in inside.stdout.split(), inside.stdout + inside.stderr


# --- the README's cron line -------------------------------------------------------------


def test_readme_cron_line_renews_in_the_container_and_reaches_every_service(world):
    """The README's cron line, character for character, run as cron runs it (minimal
    environment, no TTY): certbot in the container finds both certificates due and renews
    them, certrelay relays; nothing is printed (cron mails nothing), exit 0; apache2,
    dovecot and exim4 serve the new certificate and `certrelay verify` proves it.

    The deploy hook ran as the image runs it: under BusyBox, as root, with the image's
    umask, and the notification it wrote was readable by certrelay on the host (it was
    consumed, nothing quarantined)."""
    line = cron_line()
    assert line == ("docker run --rm -v /etc/letsencrypt:/etc/letsencrypt -v /var/lib/letsencrypt:/var/lib/letsencrypt"
                    " certbot/dns-cloudflare renew --quiet; certrelay run --quiet")
    probe = world.acme / "probe.log"
    probe.unlink(missing_ok=True)
    old = world.serial()
    world.wait_until_due(NAME, OTHER)

    done = world.container.run([*CRON_ENV, "/bin/sh", "-c", line], timeout=CHAIN_TIMEOUT)
    output = done.stdout + done.stderr

    assert done.returncode == 0, world.explain(f"the cron line exited {done.returncode}:\n{output}")
    assert output == "", world.explain(f"the cron line printed (cron would mail it):\n{output}")
    new = world.serial()
    assert new != old, "certbot in the container did not renew example.test"
    assert served_serials(world.container) == {unit: new for unit in ("apache2", "dovecot", "exim4")}, world.explain()
    status, verified = world.certrelay("verify")
    assert status == 0, world.explain(verified)
    assert spool_entries(world.config) == {"queue": [], "claimed": []}
    quarantine = world.config / "certrelay" / "quarantine"
    assert not quarantine.is_dir() or not os.listdir(quarantine), os.listdir(quarantine)

    # How the hook ran, recorded by zz-e2e-probe (sorted after certrelay-hook).
    records = probe.read_text()
    image_umask = world.certbot("-c", "umask", entrypoint="/bin/sh").stdout.strip()
    for name in (NAME, OTHER):
        record = records.split(f"lineage=/etc/letsencrypt/live/{name}\n", 1)[1].split("lineage=", 1)[0]
        assert "shell=/usr/bin/busybox\n" in record, record
        assert "uid=0\n" in record, record
        assert image_umask == "0022" and f"umask={image_umask}\n" in record, (image_umask, record)
        assert "bash=none\n" in record, record
        queued = re.findall(r"^queued=(\d+) (\d+):(\d+) regular file ", record, re.MULTILINE)
        assert queued, record
        mode, uid, _ = queued[-1]
        assert (mode, uid) == ("644", "0"), record  # root's, readable, not writable by others


# --- the timer and its service ----------------------------------------------------------


def test_timer_service_runs_the_container_then_certrelay_despite_one_failure(world):
    """`systemctl enable --now certbot-docker-renew.timer` (is-enabled: enabled), then its
    service started as the timer starts it. The auth hook refuses other.test: certbot in
    the container renews example.test, runs its deploy hook and exits 1; the '-' lets
    certrelay run all the same and relay example.test to apache2, dovecot and exim4; the
    journal shows both, and certrelay's report of other.test's failed renewal."""
    container = world.container
    since = datetime.datetime.now().timestamp() - 1
    container.systemctl("enable", "--now", TIMER)
    fail = world.acme / "fail-domains"
    try:
        assert container.systemctl("is-enabled", TIMER).strip() == "enabled"
        assert container.show(TIMER, "ActiveState")["ActiveState"] == "active"
        assert container.show(SERVICE, "ActiveState")["ActiveState"] == "inactive", "the timer started the service already"
        old_other = world.serial(OTHER)
        world.wait_until_due(NAME, OTHER)
        fail.write_text(f"{OTHER}\n")
        world.deactivate_authorizations()

        done = container.run(["systemctl", "start", SERVICE], timeout=CHAIN_TIMEOUT)

        journal = chain_journal(world, since)
        new = world.serial()
        assert world.serial(OTHER) == old_other, "other.test renewed although its domain was refused"
        assert served_serials(container) == {unit: new for unit in ("apache2", "dovecot", "exim4")}, world.explain(journal)
        # Both commands ran: the container (exit 1), then certrelay (exit 1: it reports the failure).
        exec_start = exec_starts(container)
        assert len(exec_start) == 2 and all("status=1 " in line for line in exec_start), world.explain(*exec_start)
        assert "refusing other.test" in journal or "other.test" in journal, world.explain(journal)
        assert "renewal FAILED" in journal and OTHER in journal, world.explain(journal)
        assert done.returncode != 0  # the unit failed: certrelay exited 1, saying why
        assert container.show(SERVICE, "Result")["Result"] == "exit-code"
    finally:
        fail.unlink(missing_ok=True)
        container.systemctl("disable", "--now", TIMER, check=False)
        container.systemctl("reset-failed", SERVICE, check=False)
    # other.test renews at the next run, with nothing refused: everything current again.
    world.deactivate_authorizations()
    done = container.run([*CRON_ENV, "/bin/sh", "-c", cron_line()], timeout=CHAIN_TIMEOUT)
    assert done.returncode == 0, world.explain(done.stdout + done.stderr)


def test_image_missing_certrelay_still_runs_and_the_journal_says_why(world):
    """With the image's tag removed (as if never pulled: no registry is reachable), the
    service's `docker run` fails outright; certrelay's ExecStart runs all the same, and the
    journal names the image that could not be found and the pull that failed."""
    container = world.container
    since = datetime.datetime.now().timestamp() - 1
    world.daemon.docker("rmi", f"{IMAGE}:latest")
    try:
        container.run(["systemctl", "start", SERVICE], timeout=CHAIN_TIMEOUT)
        journal = chain_journal(world, since)
        # certrelay ran after the failed `docker run` (quietly: nothing to do), and the
        # unit succeeded: docker's exit status 125 was ignored, as the '-' says.
        assert last_run(world) >= since, world.explain(journal)
        assert container.show(SERVICE, "Result")["Result"] == "success", world.explain(journal)
        assert f"Unable to find image '{IMAGE}:latest' locally" in journal, world.explain(journal)
        assert "docker: Error response from daemon" in journal, world.explain(journal)
        # --pull=never (the README's advice) makes it a plain error at once.
        never = container.run([*CRON_ENV, "docker", "run", "--rm", "--pull=never", IMAGE, "--version"])
        assert never.returncode == 125, never
        assert f"No such image: {IMAGE}:latest" in never.stderr, never.stderr
    finally:
        world.restore_tag()
        container.systemctl("reset-failed", SERVICE, check=False)


def test_service_has_a_start_timeout(world):
    """A hung `docker run` cannot hold the oneshot forever: TimeoutStartSec is finite."""
    shown = world.container.show(SERVICE, "TimeoutStartUSec")["TimeoutStartUSec"]
    assert shown not in ("infinity", "0", ""), shown


def test_hung_docker_run_is_ended_by_the_timeout_and_the_next_run_works(world):
    """certbot hangs in the container (its auth hook never returns), with the unit's start
    timeout shortened by a drop-in: systemd ends the start with result 'timeout', the
    container is gone (not left running, holding the name certbot-renew), and the next
    start of the service renews and relays as usual."""
    container = world.container
    dropin = world.root / "etc/systemd/system" / f"{SERVICE}.d" / "e2e-short-timeout.conf"
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text("[Service]\nTimeoutStartSec=20s\n")
    hang = world.acme / "hang"
    container.systemctl("daemon-reload")
    try:
        world.wait_until_due(NAME)
        world.deactivate_authorizations()
        hang.touch()
        since = datetime.datetime.now().timestamp() - 1

        done = container.run(["systemctl", "start", SERVICE], timeout=CHAIN_TIMEOUT)

        journal = chain_journal(world, since)
        assert done.returncode != 0, world.explain(journal)
        assert container.show(SERVICE, "Result")["Result"] == "timeout", world.explain(journal)

        def container_gone():
            listed = world.daemon.docker("ps", "--all", "--quiet", "--filter", "name=certbot-renew").stdout
            return listed.strip() == ""

        wait_until(container_gone, 120, what="the hung certbot container to be gone",
                   explain=lambda: world.explain(world.daemon.docker("ps", "--all").stdout))
    finally:
        hang.unlink(missing_ok=True)
        dropin.unlink()
        dropin.parent.rmdir()
        container.systemctl("daemon-reload")
        container.systemctl("reset-failed", SERVICE, check=False)

    old = world.serial()
    done = container.run(["systemctl", "start", SERVICE], timeout=CHAIN_TIMEOUT)
    assert done.returncode == 0, world.explain(done.stdout + done.stderr)
    new = world.serial()
    assert new != old
    assert served_serials(container) == {unit: new for unit in ("apache2", "dovecot", "exim4")}, world.explain()


def test_docker_daemon_not_running_certrelay_still_runs_and_the_journal_says_why(world):
    """No daemon behind /run/docker.sock (the link removed, as when docker.service is
    stopped): the service's `docker run` fails at once, certrelay runs all the same, and
    the journal says the client cannot reach the daemon."""
    container = world.container
    since = datetime.datetime.now().timestamp() - 1
    container.run(["rm", "/run/docker.sock"], check=True)
    try:
        container.run(["systemctl", "start", SERVICE], timeout=CHAIN_TIMEOUT)
        journal = chain_journal(world, since)
        assert "Cannot connect to the Docker daemon at unix:///var/run/docker.sock" in journal, world.explain(journal)
        assert last_run(world) >= since, world.explain(journal)
        assert container.show(SERVICE, "Result")["Result"] == "success", world.explain(journal)
    finally:
        container.run(["systemd-tmpfiles", "--create", "/etc/tmpfiles.d/certrelay-e2e-docker.conf"], check=True)
        container.systemctl("reset-failed", SERVICE, check=False)
    assert container.run(["docker", "version"]).returncode == 0


@pytest.mark.parametrize("units", [("certrelay.path", "certrelay-retry.timer"), ("certrelay-watch.service",)],
                         ids=["path-unit", "watch-daemon"])
def test_notification_from_the_container_reaches_the_services_through(world, units):
    """With the path unit (or the watch daemon) enabled instead of the cron line, a renewal
    in the real container (forced: `renew --force-renewal --quiet`) writes the notification
    that starts certrelay; apache2, dovecot and exim4 then serve the new certificate."""
    container = world.container
    unit = "certrelay.service" if units[0] == "certrelay.path" else units[0]
    since = datetime.datetime.now().timestamp() - 1
    container.systemctl("enable", "--now", *units)
    try:
        for name in units:
            assert container.systemctl("is-enabled", name).strip() == "enabled"
        done = world.certbot("renew", "--force-renewal", "--cert-name", NAME, "--quiet")
        assert done.returncode == 0, done.stdout + done.stderr
        new = world.serial()

        def relayed():
            return served_serials(container) == {service: new for service in ("apache2", "dovecot", "exim4")}

        wait_until(relayed, 120, what=f"{unit} to relay the renewal", explain=world.explain)
        wait_until(lambda: f"done: restart dovecot.service ({NAME})" in container.journal(unit, since=since), 30,
                   what=f"{unit}'s journal to say it restarted dovecot", explain=world.explain)
        wait_until(lambda: spool_entries(world.config) == {"queue": [], "claimed": []}, 30,
                   what="the spool to be empty", explain=world.explain)
    finally:
        container.systemctl("disable", "--now", *units, check=False)
        container.systemctl("reset-failed", "certrelay.service", *units, check=False)


def test_volume_without_the_hook_reconcile_still_reaches_the_services(world):
    """A container volume without certrelay's deploy hook (a new /etc/letsencrypt, the hook
    never installed): the renewal in the container leaves no notification, yet the cron
    line's `certrelay run` finds the renewed lineage (reconcile, saying no notification
    came) and apache2, dovecot and exim4 serve the new certificate."""
    hook = world.config / "renewal-hooks" / "deploy" / "certrelay-hook"
    aside = world.root / "root" / "certrelay-hook.aside"
    os.rename(hook, aside)
    try:
        done = world.certbot("renew", "--force-renewal", "--cert-name", NAME, "--quiet")
        assert done.returncode == 0, done.stdout + done.stderr
        assert spool_entries(world.config)["queue"] == [], "a notification came although the hook is gone"
        new = world.serial()

        status, output = world.certrelay("run")

        assert status == 0, world.explain(output)
        assert "no notification came" in output, output
        assert served_serials(world.container) == {unit: new for unit in ("apache2", "dovecot", "exim4")}, world.explain(output)
    finally:
        os.rename(aside, hook)
