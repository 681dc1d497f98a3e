"""End to end, on a real booted systemd: certbot renews, certrelay restarts the services.

One container (systemd-nspawn, its own network namespace) runs apache2 (443), dovecot
(993) and exim4 (465, TLS on connect) with the certbot lineage example.test. certbot runs
on the host "as its container does" (tests/acme.py: Pebble, DNS-01, BusyBox sh) on the
container's /etc/letsencrypt, so its deploy hook is the one `certrelay install-hook` put there.
certrelay is installed from its Debian package (`apt-get install ./certrelay_*.deb`) and runs on the
container's own python3 with Debian's packages.

Each way of running certrelay is tested in turn on the same container: the path unit
(+ retry timer), the watch daemon (Type=notify, watchdog), and the cron chain
(`certbot renew; certrelay run`). After a forced renewal every service must serve the
new certificate (seen over TLS), the restarted ones with a new main PID, and the spool
must be empty. Then the same with one lineage failing (`certbot renew` exits 1).

Needs root, systemd-nspawn, mmdebstrap, pebble, busybox-static. The root file system is
built once into .cache/ (about a minute); a run on the cached one takes well under one.
"""

import dataclasses
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from .. import acme
from . import debs, rootfs
from .container import Container, wait_until

REPO = Path(__file__).resolve().parents[2]
FILES = Path(__file__).resolve().parent / "files"
NAME = "example.test"
OTHER = "other.test"
#: The TLS ports of the services that use the lineage example.test.
PORTS = {"apache2": 443, "dovecot": 993, "exim4": 465}
RESTARTED = ("dovecot", "exim4")  # the rules: restart for example.test
RELOADED = ("apache2",)  # reload for every certificate
DEBUG_UNITS = ("certrelay.path", "certrelay.service", "certrelay-watch.service", "apache2", "dovecot", "exim4")
RELAY_TIMEOUT = 60  # seconds from the end of `certbot renew` until every service has it


def skip_reason():
    """Return why this test cannot run here, or None."""
    reason = rootfs.skip_reason() or acme.skip_reason() or debs.skip_reason()
    if reason is None and not shutil.which("make"):
        reason = "make is not on PATH: the test installs certrelay with `make install`"
    return reason


REASON = skip_reason()
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(REASON is not None, reason=REASON or "")]


# --- setting up the root file system ------------------------------------------------


def sh(*argv, **kwargs):
    """Run a host command, raising with its output if it fails; return the CompletedProcess."""
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300, **kwargs)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} exited with {done.returncode}:\n{done.stdout}{done.stderr}")
    return done


def install_certrelay(root, rules_file=FILES / "rules.toml"):
    """Install the Debian package into `root` as the README says, and the hook, with
    the rules in `rules_file`.

    --keep-unit: without a systemd on the host nspawn cannot make a scope over D-Bus;
    a machine name of its own, so that it never collides with another e2e module's.
    """
    deb = debs.built_deb()
    shutil.copy(deb, root / "root" / deb.name)  # not /tmp: nspawn mounts a tmpfs there
    (root / "etc" / "letsencrypt").mkdir(mode=0o755, exist_ok=True)
    sh("systemd-nspawn", "--quiet", "--register=no", "--keep-unit", f"--machine=certrelay-setup-{os.getpid()}",
       "-D", root, "--setenv=DEBIAN_FRONTEND=noninteractive",
       "sh", "-c", f"apt-get install -y -q /root/{deb.name} && certrelay install-hook")
    rules = root / "etc" / "certrelay" / "rules.toml"
    shutil.copyfile(rules_file, rules)
    os.chown(rules, 0, 0)
    rules.chmod(0o644)


def configure_services(root):
    """Point apache2, dovecot and exim4 at the lineage example.test (TLS on 443, 993, 465)."""
    shutil.copyfile(FILES / "apache2-certrelay-e2e.conf", root / "etc/apache2/sites-available/certrelay-e2e.conf")
    shutil.copyfile(FILES / "dovecot-99-certrelay-e2e.conf", root / "etc/dovecot/conf.d/99-certrelay-e2e.conf")
    shutil.copyfile(FILES / "exim4.conf.localmacros", root / "etc/exim4/exim4.conf.localmacros")
    sh("chroot", root, "a2enmod", "-q", "ssl")
    sh("chroot", root, "a2ensite", "-q", "certrelay-e2e")
    # exim reads its key as Debian-exim, through the group ssl-cert.
    sh("chroot", root, "usermod", "--append", "--groups", "ssl-cert", "Debian-exim")
    sh("systemctl", f"--root={root}", "--quiet", "enable", "apache2.service", "dovecot.service")


def group_id(root, group):
    """Return the numeric id of `group` in root's /etc/group (the host's may differ)."""
    for line in (root / "etc" / "group").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == group:
            return int(fields[2])
    raise KeyError(f"no group {group} in {root}/etc/group")


def share_certificates(config_dir, gid):
    """Let group `gid` (ssl-cert) read the certificates, as the write-up does.

    chgrp -R on live/ and archive/, 0710 on both, 0640 on the private keys. certbot
    gives each renewed private key the group and mode of the one before.
    """
    for top in ("live", "archive"):
        top_dir = config_dir / top
        for directory, _, files in os.walk(top_dir):
            os.chown(directory, -1, gid, follow_symlinks=False)
            for file in files:
                os.chown(Path(directory) / file, -1, gid, follow_symlinks=False)
        top_dir.chmod(0o710)
    for key in (config_dir / "archive").glob("*/privkey*.pem"):
        key.chmod(0o640)


# --- looking at the container -------------------------------------------------------


def spool_entries(config_dir):
    """Return {"queue": [...], "claimed": [...]}: what the spool still holds."""
    spool = config_dir / "certrelay"
    return {
        sub: sorted(os.listdir(spool / sub)) if (spool / sub).is_dir() else []
        for sub in ("queue", "claimed")
    }


def service_pids(container):
    """Return {service: main PID} for apache2, dovecot and exim4 (0 if not running).

    exim4 is a SysV init script: systemd does not know its main PID, so it comes from
    exim's PID file.
    """
    pids = {unit: int(container.show(unit, "MainPID")["MainPID"] or 0) for unit in PORTS}
    if not pids["exim4"]:
        pid_file = container.run(["cat", "/run/exim4/exim.pid"]).stdout.strip()
        pids["exim4"] = int(pid_file) if pid_file.isdigit() else 0
    return pids


def served_serials(container):
    """Return {service: serial of the certificate it serves over TLS, or None}."""
    return {unit: container.serial_on_port(port) for unit, port in PORTS.items()}


@dataclasses.dataclass
class Snapshot:
    """What the services and the spool look like at one moment."""

    serials: dict
    pids: dict
    spool: dict

    @classmethod
    def take(cls, world):
        return cls(served_serials(world.container), service_pids(world.container), spool_entries(world.config))


@dataclasses.dataclass
class World:
    """The booted container, its root file system and the ACME server certbot uses."""

    root: Path
    config: Path  # ROOT/etc/letsencrypt, certbot's config dir
    container: Container
    server: object  # acme.AcmeServer

    def serial(self, name=NAME):
        """Return the serial of the certificate in live/NAME/cert.pem."""
        return acme.cert_serial(self.config, name)

    def explain(self, *extra):
        """Return the journals and state worth reading when a check fails."""
        state = f"spool: {spool_entries(self.config)}\nfailed units: {self.container.systemctl('--failed', '--no-legend', check=False)}"
        return "\n".join([*extra, state, self.container.journals(*DEBUG_UNITS)])


@pytest.fixture(scope="module")
def world():
    """Build (or reuse) the root file system, set everything up, boot; clean up after.

    The cached root file system is the lower layer of an overlay in a fresh work dir
    under /var/tmp: nothing the test does reaches the cache. Teardown powers the
    container off, stops Pebble, unmounts the overlay and removes the work dir (kept
    when CERTRELAY_E2E_KEEP=1).
    """
    with rootfs.scratch_root("certrelay-e2e-") as (root, work_dir, stack):
        install_certrelay(root)
        config, server = prepare_services(root, work_dir, stack)
        container = Container(root, work_dir / "console.log")
        stack.callback(container.stop)
        container.boot()
        yield World(root, config, container, server)


def prepare_services(root, work_dir, stack):
    """Configure the services, start Pebble (stopped by `stack`), obtain example.test
    and other.test, and let ssl-cert read them; return (config dir, ACME server)."""
    config = root / "etc" / "letsencrypt"
    configure_services(root)
    server = stack.enter_context(acme.acme_server(work_dir))
    # certbot runs the deploy hook for a new certificate too: the notifications of
    # these first certificates are cleared, the services start with them.
    server.certonly(config, [NAME, f"*.{NAME}"])
    server.certonly(config, [OTHER])
    for pending in (config / "certrelay" / "queue").iterdir():
        pending.unlink()
    share_certificates(config, group_id(root, "ssl-cert"))
    return config, server


# --- the three ways of running certrelay --------------------------------------------


class Integration:
    """One way of running certrelay: set it up, relay after certbot, check its own traces."""

    id = ""
    units = ()  # started for the test, stopped after it

    def activate(self, container):
        if self.units:
            container.systemctl("start", *self.units)

    def deactivate(self, container):
        if self.units:
            container.systemctl("stop", *self.units, check=False)
            container.systemctl("reset-failed", *self.units, check=False)

    def relay(self, world, failed=False):
        """What follows `certbot renew` (nothing: systemd notices the queue by itself);
        `failed`: a renewal failed, which certrelay reports (exit 1)."""

    def check(self, world, since, failed=False):
        """Assert what this integration leaves behind after a batch (`since`: epoch;
        `failed` as for relay)."""


class PathUnit(Integration):
    """certrelay.path starts certrelay.service when the queue is not empty."""

    id = "path-unit"
    units = ("certrelay.path", "certrelay-retry.timer")

    def activate(self, container):
        container.systemctl("enable", "--now", *self.units)

    def deactivate(self, container):
        container.systemctl("disable", "--now", *self.units, check=False)
        container.systemctl("reset-failed", "certrelay.service", *self.units, check=False)

    def check(self, world, since, failed=False):
        container = world.container
        # Level-triggered: had the run left the queue non-empty, the path unit would
        # have started it again and again until unit-start-limit-hit.
        path = container.show("certrelay.path", "ActiveState", "Result")
        assert path == {"ActiveState": "active", "Result": "success"}, world.explain()
        service = container.show("certrelay.service", "Result", "ExecMainStatus")
        assert service == ({"Result": "exit-code", "ExecMainStatus": "1"} if failed else
                           {"Result": "success", "ExecMainStatus": "0"}), world.explain()
        journal = container.journal("certrelay.service", since=since)
        assert f"done: restart dovecot.service ({NAME})" in journal, world.explain()


class WatchDaemon(Integration):
    """certrelay-watch.service: inotify, settle window, Type=notify with a watchdog."""

    id = "watch-daemon"
    units = ("certrelay-watch.service",)

    def check(self, world, since, failed=False):
        container = world.container
        shown = container.show("certrelay-watch.service", "ActiveState", "WatchdogUSec", "WatchdogTimestampMonotonic")
        assert shown["ActiveState"] == "active", world.explain(str(shown))
        assert shown["WatchdogUSec"] not in ("", "0", "infinity"), world.explain(str(shown))
        assert shown["WatchdogTimestampMonotonic"] not in ("", "0"), world.explain(str(shown))
        status = container.systemctl("status", "--no-pager", "--lines=0", "certrelay-watch.service", check=False)
        assert "action(s) done" in status, world.explain(status)
        journal = container.journal("certrelay-watch.service", since=since)
        assert f"done: restart dovecot.service ({NAME})" in journal, world.explain()


class CronChain(Integration):
    """`certbot renew; certrelay run`, as the write-up's cron line does (no unit runs)."""

    id = "cron-chain"

    def relay(self, world, failed=False):
        done = world.container.run(["certrelay", "run"], timeout=RELAY_TIMEOUT)
        self.output = done.stdout + done.stderr
        assert done.returncode == int(failed), world.explain(f"certrelay run exited {done.returncode}:\n{self.output}")

    def check(self, world, since, failed=False):
        assert f"done: restart dovecot.service ({NAME})" in self.output, self.output


INTEGRATIONS = (PathUnit, WatchDaemon, CronChain)


@pytest.fixture(params=INTEGRATIONS, ids=[cls.id for cls in INTEGRATIONS])
def integration(world, request):
    """One integration, active for one test and turned off after it (the next starts clean)."""
    assert spool_entries(world.config) == {"queue": [], "claimed": []}, "a previous test left the spool dirty"
    chosen = request.param()
    chosen.activate(world.container)
    try:
        yield chosen
    finally:
        chosen.deactivate(world.container)


# --- the checks ---------------------------------------------------------------------


def renew_and_relay(world, integration, cert_names=(NAME,), fail_domains=()):
    """Force a renewal with certbot, then let `integration` relay it; return (certbot's result, pids before, epoch)."""
    since = time.time() - 1
    before = service_pids(world.container)
    result = world.server.renew(world.config, cert_names=list(cert_names) or None, fail_domains=fail_domains)
    integration.relay(world, failed=bool(fail_domains))
    return result, before, since


def mailbox(world):
    """Return every mail delivered in the container: exim4 delivers root's to
    /var/mail/mail (Debian's mail4root router) unless /etc/aliases names someone."""
    box = world.root / "var" / "mail"
    return "".join(path.read_text(errors="replace") for path in sorted(box.iterdir()) if path.is_file())


def assert_relayed(world, serial, before):
    """Wait until every service serves `serial` and the restarted ones have new PIDs; assert all of it."""
    last = []

    def relayed():
        snapshot = Snapshot.take(world)
        last[:] = [snapshot]
        return (
            all(found == serial for found in snapshot.serials.values())
            and snapshot.spool == {"queue": [], "claimed": []}
            and all(snapshot.pids[unit] not in (0, before[unit]) for unit in RESTARTED)
        )

    wait_until(relayed, RELAY_TIMEOUT, interval=0.5, what=f"every service to serve serial {serial}",
               explain=lambda: world.explain(f"before: {before}", f"last: {last[-1] if last else None}"))
    snapshot = last[-1]
    assert snapshot.serials == {unit: serial for unit in PORTS}
    assert snapshot.spool == {"queue": [], "claimed": []}
    for unit in RESTARTED:
        assert snapshot.pids[unit] != before[unit], f"{unit} was not restarted"
    for unit in RELOADED:
        assert snapshot.pids[unit] == before[unit], f"{unit} was restarted, not reloaded"
    for unit in PORTS:
        assert world.container.show(unit, "ActiveState")["ActiveState"] == "active", world.explain()


def assert_key_shared(world, name=NAME):
    """The renewed private key kept the group ssl-cert and mode 0640 (exim reads it as Debian-exim)."""
    key = (world.config / "live" / name / "privkey.pem").resolve()
    info = key.stat()
    assert (info.st_gid, info.st_mode & 0o777) == (group_id(world.root, "ssl-cert"), 0o640), key


def test_services_serve_the_first_certificate(world):
    """After boot every service serves the certificate certbot got before it."""
    serial = world.serial()
    wait_until(lambda: served_serials(world.container) == {unit: serial for unit in PORTS}, 30,
               what=f"every service to serve serial {serial}", explain=world.explain)


def test_renewal_reaches_every_service(world, integration):
    """A forced renewal of example.test ends up served on 443, 993 and 465."""
    old = world.serial()
    result, before, since = renew_and_relay(world, integration)
    assert result.returncode == 0, result.stdout + result.stderr
    new = world.serial()
    assert new != old
    assert_key_shared(world)
    assert_relayed(world, new, before)
    integration.check(world, since)


def test_partial_failure_still_reaches_services_and_mails_the_admin(world, integration):
    """other.test fails to renew (certbot exits 1); example.test still reaches its
    services, and the failure, recorded by the post hook, is reported (exit 1) and
    mailed to root through the container's exim4 ([alert] mail), in every mode."""
    subject = f"Subject: certrelay on {world.container.run(['hostname']).stdout.strip()}: renewal of {OTHER} FAILED"
    mailed = mailbox(world).count(subject)
    old, other_version = world.serial(), acme.cert_version(world.config, OTHER)
    result, before, since = renew_and_relay(world, integration, cert_names=(), fail_domains=(OTHER,))
    assert result.returncode == 1, result.stdout + result.stderr
    assert acme.cert_version(world.config, OTHER) == other_version, "other.test renewed although it was to fail"
    new = world.serial()
    assert new != old
    assert_relayed(world, new, before)
    wait_until(lambda: mailbox(world).count(subject) == mailed + 1, RELAY_TIMEOUT, interval=0.5,
               what=f"a mail {subject!r}", explain=lambda: world.explain(mailbox(world)[-3000:]))
    assert f"{OTHER}: renewal FAILED in the container at " in mailbox(world)
    integration.check(world, since, failed=True)


def test_a_renewal_that_works_clears_the_failure_and_mails_that_it_is_resolved(world):
    """After the failures above, other.test renews: the next run says nothing of it,
    exits 0, and root gets one mail saying the failure is resolved."""
    hostname = world.container.run(["hostname"]).stdout.strip()
    subject = f"Subject: certrelay on {hostname}: resolved: renewal of {OTHER} FAILED"
    assert mailbox(world).count(subject) == 0
    other_version = acme.cert_version(world.config, OTHER)

    result = world.server.renew(world.config, cert_names=[OTHER])
    done = world.container.run(["certrelay", "run"], timeout=RELAY_TIMEOUT)

    assert result.returncode == 0, result.stdout + result.stderr
    assert acme.cert_version(world.config, OTHER) != other_version
    assert done.returncode == 0 and "FAILED" not in done.stderr, world.explain(done.stdout + done.stderr)
    wait_until(lambda: mailbox(world).count(subject) == 1, RELAY_TIMEOUT, interval=0.5, what=f"a mail {subject!r}",
               explain=lambda: world.explain(mailbox(world)[-3000:]))


def test_check_asks_the_booted_systemd_about_each_unit(world):
    """`certrelay check` passes with the installed setup and names a unit systemd lacks."""
    done = world.container.run(["certrelay", "check"])
    assert done.returncode == 0, done.stdout + done.stderr
    unknown = world.root / "etc" / "certrelay" / "unknown-unit.toml"
    unknown.write_text('[[rule]]\nmatch = ["*"]\nrestart = ["no-such-daemon"]\n')
    unknown.chmod(0o644)

    done = world.container.run(["certrelay", "check", "--rules", "/etc/certrelay/unknown-unit.toml"])

    assert done.returncode == 2, done.stdout + done.stderr
    assert "unit no-such-daemon.service is not known to systemd (LoadState: not-found)" in done.stderr
