"""End to end: certrelay closes the loop (issues 7, 8, 9, 10) on a real booted systemd.

The same world as test_e2e.py (systemd-nspawn, real certbot against Pebble, apache2 on
443, dovecot on 993 and 143, exim4 on 465 and 25, plus haproxy and PostgreSQL), with its
own rules (files/loop-rules.toml): the write-up's rules plus `verify` lines for every
TLS endpoint of example.test. Mostly the cron chain: renew with the harness, then
`certrelay run` in the container, whose output (stderr) is what an admin reads.

Checked: a renewal ends with every endpoint proven current; a reload that does nothing
is escalated to one restart; a service serving the wrong certificate is reported, kept
and retried, never restarted in a loop; a renewal without a notification still reaches
the services (reconcile) and `certrelay status` says so; certificates installed for
haproxy, PostgreSQL, exim4 and a PKCS#12 keystore; the watch daemon survives a reboot;
a queue/ swapped for a symlink is quarantined with the path unit staying quiet.

Every test undoes what it changed (drop-ins, config files, enabled units), so the next
starts clean. Needs what test_e2e.py needs.
"""

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from . import rootfs
from .container import Container, wait_until
from .test_e2e import (
    REASON, NAME, World, install_certrelay, prepare_services, service_pids, spool_entries,
)

FILES = Path(__file__).resolve().parent / "files"
RULES = "/etc/certrelay/rules.toml"
#: The verify endpoints of example.test in loop-rules.toml, and the port openssl checks.
ENDPOINTS = ["https://127.0.0.1:443", "imaps://127.0.0.1:993", "imap://127.0.0.1:143",
             "smtps://127.0.0.1:465", "smtp://127.0.0.1:25"]
TLS_PORTS = {"apache2": 443, "dovecot": 993, "exim4": 465}
RUN_TIMEOUT = 120  # seconds for one `certrelay run` (verify-timeout 15 s, twice at most, plus restarts)
DEBUG_UNITS = ("certrelay.path", "certrelay.service", "certrelay-watch.service", "apache2", "dovecot", "exim4",
               "haproxy", "postgresql@15-main")

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(REASON is not None, reason=REASON or "")]


# --- the world ----------------------------------------------------------------------


class LoopWorld(World):
    """test_e2e's World, with helpers for the cron chain and the rules."""

    def explain(self, *extra):
        state = f"spool: {spool_entries(self.config)}\nfailed units: {self.container.systemctl('--failed', '--no-legend', check=False)}"
        return "\n".join([*extra, state, self.container.journals(*DEBUG_UNITS)])

    def certrelay(self, *args, timeout=RUN_TIMEOUT):
        """Run `certrelay ARGS` in the container (as the cron line would); return (exit status, stdout + stderr)."""
        done = self.container.run(["certrelay", *args], timeout=timeout)
        return done.returncode, done.stdout + done.stderr

    def renew(self, name=NAME):
        """Force a renewal of `name` with certbot as its container runs it; return the new serial."""
        old = self.serial(name)
        result = self.server.renew(self.config, cert_names=[name])
        assert result.returncode == 0, result.stdout + result.stderr
        new = self.serial(name)
        assert new != old, "certbot did not renew"
        return new

    def write_rules(self, text):
        rules = self.root / RULES.lstrip("/")
        rules.write_text(text)
        os.chown(rules, 0, 0)
        rules.chmod(0o644)

    def serials(self):
        return {unit: self.container.serial_on_port(port) for unit, port in TLS_PORTS.items()}

    def live_sha256(self, name=NAME):
        """Return the SHA-256 (hex) of the DER of live/NAME/cert.pem."""
        der = subprocess.run(["openssl", "x509", "-outform", "der", "-in", str(self.config / "live" / name / "cert.pem")],
                             capture_output=True, check=True).stdout
        return hashlib.sha256(der).hexdigest()


def base_rules():
    return (FILES / "loop-rules.toml").read_text()


@pytest.fixture(scope="module")
def world():
    """Build (or reuse) the root file system, install certrelay with loop-rules.toml, boot.

    Like test_e2e.py's fixture (an overlay on the cached root file system, Pebble,
    example.test and other.test obtained before boot, keys shared with ssl-cert). After
    boot one `certrelay run` records the live certificates (the first run acts on nothing).
    """
    state = {}
    with rootfs.scratch_root("certrelay-e2e-loop-") as (root, work_dir, stack):
        install_certrelay(root, FILES / "loop-rules.toml")
        config, server = prepare_services(root, work_dir, stack)
        container = Container(root, work_dir / "console.log", name="certrelay-e2e-loop")
        # A test may reboot the container: stop whichever one is current.
        stack.callback(lambda: state["world"].container.stop() if "world" in state else container.stop())
        container.boot()
        world = LoopWorld(root, config, container, server)
        state["world"] = world
        world.write_rules(base_rules())
        wait_until(lambda: all(world.serials().values()), 60, what="apache2, dovecot, exim4 to serve TLS",
                   explain=world.explain)
        world.first_run = world.certrelay("run")
        yield world


@pytest.fixture
def clean(world):
    """Each test starts with an empty spool and the base rules; afterwards the same."""
    assert spool_entries(world.config) == {"queue": [], "claimed": []}, "a previous test left the spool dirty"
    world.write_rules(base_rules())
    yield world
    world.write_rules(base_rules())


def assert_verified_everywhere(output, endpoints=ENDPOINTS):
    for url in endpoints:
        assert f"verified: {url}" in output, f"no 'verified: {url}' line:\n{output}"


def count(output, text):
    return sum(text in line for line in output.splitlines())


#: The certrelay units that start `certrelay run` by themselves.
CERTRELAY_UNITS = ("certrelay.service", "certrelay.path", "certrelay-retry.timer", "certrelay-watch.service")


def queued_jobs(container, *names):
    """Return the lines of `systemctl list-jobs` that name one of `names`."""
    jobs = container.systemctl("list-jobs", "--no-legend", check=False).splitlines()
    return [line for line in jobs if any(name in line for name in names)]


def assert_nothing_pending(world, service):
    """Assert that no job for `service` or a certrelay unit is queued and that no
    certrelay unit runs or waits to trigger: nothing will act on `service` until
    someone runs certrelay again."""
    jobs = queued_jobs(world.container, service, "certrelay")
    assert not jobs, world.explain("jobs queued:", *jobs)
    states = {unit: world.container.show(unit, "ActiveState")["ActiveState"] for unit in CERTRELAY_UNITS}
    assert set(states.values()) <= {"inactive", "failed"}, world.explain(str(states))


def starts(journal, unit):
    """How many times systemd says it started `unit` in `journal` (its journalctl text)."""
    return count(journal, f"Starting {unit}")


def write_file(root, path, text, mode=0o644):
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    target.chmod(mode)
    return target


# --- issue 8: verify, escalate ------------------------------------------------------


def test_first_run_acts_on_nothing(world):
    """The first `certrelay run` on an existing config dir records the lineages and restarts nothing."""
    status, output = world.first_run
    assert status == 0, output
    assert "done: restart" not in output and "done: reload" not in output, output


def test_renewal_is_verified_current_on_every_endpoint(clean):
    """Cron chain: after a forced renewal `certrelay run` exits 0 with a `verified:` line for
    443, 993, 143 (STARTTLS), 465 and 25 (STARTTLS); openssl sees the new serial too."""
    world = clean
    new = world.renew()

    status, output = world.certrelay("run")
    print(output)  # shown with pytest -rP: what the cron mail would hold

    assert status == 0, world.explain(output)
    assert_verified_everywhere(output)
    assert world.serials() == {unit: new for unit in TLS_PORTS}, world.explain(output)
    assert spool_entries(world.config) == {"queue": [], "claimed": []}


def test_reload_that_does_nothing_is_escalated_to_one_restart(clean):
    """apache2's reload made a no-op by a drop-in: certrelay sees the old certificate on 443,
    says it escalates, restarts apache2 once, then 443 serves the new one; exit 0."""
    world = clean
    dropin = write_file(world.root, "/etc/systemd/system/apache2.service.d/loop-noreload.conf",
                        "[Service]\nExecReload=\nExecReload=/bin/true\n")
    world.container.systemctl("daemon-reload")
    try:
        pid_before = service_pids(world.container)["apache2"]
        new = world.renew()

        status, output = world.certrelay("run")
        print(output)

        assert status == 0, world.explain(output)
        assert "escalating" in output, output
        assert count(output, "done: restart apache2.service") == 1, output
        assert_verified_everywhere(output)
        assert world.container.serial_on_port(443) == new
        assert service_pids(world.container)["apache2"] not in (0, pid_before), "apache2 was not restarted"
    finally:
        dropin.unlink()
        shutil.rmtree(dropin.parent, ignore_errors=True)
        world.container.systemctl("daemon-reload")


def test_service_serving_another_certificate_is_kept_not_looped(clean):
    """dovecot serving other.test: `run` exits 1 naming imaps://127.0.0.1:993 as not current,
    keeps the notification in claimed/, restarts dovecot once and then leaves it alone;
    `certrelay verify` exits 1 naming it; once fixed, the next `run` exits 0 and claimed/ is empty."""
    world = clean
    wrong = write_file(world.root, "/etc/dovecot/conf.d/99-loop-other.conf",
                       (FILES / "loop-dovecot-other.conf").read_text())
    try:
        world.container.systemctl("restart", "dovecot")
        world.renew()
        pid_before = service_pids(world.container)["dovecot"]

        status, output = world.certrelay("run")
        print(output)

        assert status == 1, world.explain(output)
        not_current = [line for line in output.splitlines() if "not current" in line and "imaps://127.0.0.1:993" in line]
        assert not_current, output
        assert "no lineage" in not_current[0] or "other" in not_current[0], not_current[0]
        assert count(output, "done: restart dovecot.service") <= 1, output
        assert spool_entries(world.config)["claimed"], "the notification was not kept"
        pid_after = service_pids(world.container)["dovecot"]
        assert pid_after not in (0, pid_before), "dovecot was not restarted by the rule"
        # No loop: the run has returned and nothing is left that would restart dovecot.
        assert_nothing_pending(world, "dovecot")

        status, output = world.certrelay("verify")
        print(output)
        assert status == 1, output
        assert "imaps://127.0.0.1:993" in output, output
        assert service_pids(world.container)["dovecot"] == pid_after, "dovecot was restarted again"
    finally:
        wrong.unlink()
        world.container.systemctl("restart", "dovecot")

    status, output = world.certrelay("run")
    assert status == 0, world.explain(output)
    assert spool_entries(world.config) == {"queue": [], "claimed": []}
    status, output = world.certrelay("verify")
    assert status == 0, output


# --- issue 9: reconcile, status ------------------------------------------------------


def test_renewal_without_notification_still_reaches_services(clean):
    """The hook removed from renewal-hooks/deploy: after a renewal the queue stays empty, yet
    `certrelay run` acts (saying no notification came), 443/993/465 serve the new serial and
    `certrelay status --json` lists example.test as current with the new SHA-256."""
    world = clean
    hook = world.config / "renewal-hooks" / "deploy" / "certrelay-hook"
    aside = world.root / "root" / "certrelay-hook.aside"
    os.rename(hook, aside)
    try:
        new = world.renew()
        assert spool_entries(world.config)["queue"] == [], "a notification came although the hook is gone"

        status, output = world.certrelay("run")
        print(output)

        assert status == 0, world.explain(output)
        assert "no notification came" in output, output
        assert world.serials() == {unit: new for unit in TLS_PORTS}, world.explain(output)
        done = world.container.run(["certrelay", "status", "--json"])
        assert done.returncode == 0, done.stdout + done.stderr
        report = json.loads(done.stdout)
        entry = next(c for c in report["certificates"] if c["name"] == NAME)
        assert entry["state"] == "current", entry
        assert entry["sha256"].replace(":", "").lower() == world.live_sha256(), entry
    finally:
        os.rename(aside, hook)


# --- issue 10: install ---------------------------------------------------------------


def test_installed_certificates_reach_haproxy_postgresql_exim4_and_a_keystore(clean):
    """haproxy (8443) from a combined PEM root:haproxy 0640; PostgreSQL with its key postgres
    0600 (verified over SSLRequest); exim4 reading a key root:Debian-exim 0640 without the
    ssl-cert group; a PKCS#12 file read back with openssl. First delivery by a replayed
    notification (`run --force`), then a renewal: every one serves or holds the new certificate."""
    world = clean
    root, container = world.root, world.container
    install_rules = (FILES / "loop-rules-install.toml").read_text()
    password = write_file(root, "/etc/certrelay/loop-keystore.pass", "loop-secret\n", mode=0o600)
    haproxy_cfg = root / "etc/haproxy/haproxy.cfg"
    haproxy_original = haproxy_cfg.read_text()
    localmacros = root / "etc/exim4/exim4.conf.localmacros"
    exim_original = localmacros.read_text()
    pg_conf = root / "etc/postgresql/15/main/conf.d/loop-ssl.conf"
    try:
        # 1. Deliver the files the daemons will read (no verify lines yet: not configured).
        without_verify = "\n".join(line for line in install_rules.splitlines() if not line.startswith("verify ="))
        world.write_rules(base_rules() + without_verify)
        status, output = world.certrelay("check")
        assert status == 0, output
        container.run(["env", f"RENEWED_LINEAGE=/etc/letsencrypt/live/{NAME}", f"RENEWED_DOMAINS={NAME} *.{NAME}",
                       "/etc/letsencrypt/renewal-hooks/deploy/certrelay-hook"], check=True)
        status, output = world.certrelay("run", "--force")
        assert status == 0, world.explain(output)

        # 2. Point the daemons at them, as an admin would.
        haproxy_cfg.write_text(haproxy_original + (FILES / "loop-haproxy-frontend.cfg").read_text())
        pg_conf.write_text((FILES / "loop-postgresql-ssl.conf").read_text())
        localmacros.write_text((FILES / "loop-exim4.conf.localmacros").read_text())
        container.run(["gpasswd", "-d", "Debian-exim", "ssl-cert"], check=True)
        for unit in ("haproxy", "postgresql@15-main", "exim4"):
            container.systemctl("restart", unit)
        world.write_rules(base_rules() + install_rules)

        # 3. Renew: certrelay installs, reloads, verifies.
        new = world.renew()
        status, output = world.certrelay("run")
        print(output)

        assert status == 0, world.explain(output)
        assert_verified_everywhere(output, [*ENDPOINTS, "https://127.0.0.1:8443", "postgres://127.0.0.1:5432"])
        assert container.serial_on_port(8443) == new
        assert container.serial_on_port(465) == new

        def attributes(path):
            return container.run(["stat", "-c", "%U:%G %a", path], check=True).stdout.strip()

        assert attributes(f"/etc/haproxy/certs/{NAME}.pem") == "root:haproxy 640"
        assert attributes(f"/etc/ssl/certrelay-postgresql/{NAME}.key") == "postgres:postgres 600"
        assert attributes(f"/etc/ssl/certrelay-postgresql/{NAME}.crt") == "root:root 644"
        assert attributes(f"/etc/exim4/certrelay/{NAME}.key") == "root:Debian-exim 640"
        assert attributes(f"/etc/loop-keystore/{NAME}.p12") == "root:root 600"
        keystore = container.run(["sh", "-c", f"openssl pkcs12 -in /etc/loop-keystore/{NAME}.p12"
                                  " -passin file:/etc/certrelay/loop-keystore.pass -nokeys | openssl x509 -noout -serial"])
        assert keystore.returncode == 0, keystore.stdout + keystore.stderr
        assert keystore.stdout.strip().partition("=")[2] == new, keystore.stdout
    finally:
        haproxy_cfg.write_text(haproxy_original)
        localmacros.write_text(exim_original)
        pg_conf.unlink(missing_ok=True)
        password.unlink()
        container.run(["usermod", "--append", "--groups", "ssl-cert", "Debian-exim"])
        for unit in ("haproxy", "postgresql@15-main", "exim4"):
            container.systemctl("restart", unit, check=False)


# --- issue 7: enable, reboot, hostile spool -------------------------------------------


def test_symlinked_queue_is_quarantined_and_path_unit_stays_quiet(clean):
    """With certrelay.path and the retry timer enabled, queue/ replaced by a symlink to a
    host directory: within seconds the link is in quarantine/, a real empty queue/ is in its
    place, the host directory is untouched, certrelay.service exited 1, and certrelay.path
    stays active (no start-limit-hit): it started the service once, and nothing is queued."""
    world = clean
    container = world.container
    hostdir = world.root / "root" / "hostdir"
    hostdir.mkdir()
    (hostdir / "precious").write_text("keep me\n")
    spool = world.config / "certrelay"
    quarantine = spool / "quarantine"
    before = set(os.listdir(quarantine)) if quarantine.is_dir() else set()
    since = time.time() - 1
    container.systemctl("enable", "--now", "certrelay.path", "certrelay-retry.timer")
    try:
        for unit in ("certrelay.path", "certrelay-retry.timer"):
            assert container.systemctl("is-enabled", unit).strip() == "enabled"
        (spool / "queue").rmdir()
        os.symlink("/root/hostdir", spool / "queue")

        def quarantined():
            new = set(os.listdir(quarantine)) - before if quarantine.is_dir() else set()
            links = [entry for entry in new if (quarantine / entry).is_symlink()]
            queue = spool / "queue"
            return links if links and queue.is_dir() and not queue.is_symlink() else None

        links = wait_until(quarantined, 20, what="the symlinked queue/ to be quarantined", explain=world.explain)
        assert os.readlink(quarantine / links[0]) == "/root/hostdir"
        assert os.listdir(spool / "queue") == []
        assert sorted(os.listdir(hostdir)) == ["precious"]
        assert (hostdir / "precious").read_text() == "keep me\n"
        wait_until(lambda: container.show("certrelay.service", "ActiveState")["ActiveState"] in ("inactive", "failed"),
                   20, what="certrelay.service to finish")
        assert container.show("certrelay.service", "ExecMainStatus")["ExecMainStatus"] == "1", world.explain()
        # Quiet: the queue is empty, so certrelay.path (level-triggered: it checks again when
        # the service stops) has nothing to start; the service ran once, and nothing is queued.
        shown = container.show("certrelay.path", "ActiveState", "Result")
        assert shown == {"ActiveState": "active", "Result": "success"}, world.explain(str(shown))

        def journal_of_its_start():
            journal = container.journal("certrelay.service", since=since)
            return journal if starts(journal, "certrelay.service") else None

        journal = wait_until(journal_of_its_start, 20, what="certrelay.service's start in its journal",
                             explain=world.explain)
        assert starts(journal, "certrelay.service") == 1, world.explain(journal)
        jobs = queued_jobs(container, "certrelay")
        assert not jobs, world.explain("jobs queued:", *jobs)
    finally:
        container.systemctl("disable", "--now", "certrelay.path", "certrelay-retry.timer", check=False)
        container.systemctl("reset-failed", "certrelay.service", "certrelay.path", check=False)
        if (spool / "queue").is_symlink():
            (spool / "queue").unlink()
            (spool / "queue").mkdir()
        for entry in set(os.listdir(quarantine)) - before if quarantine.is_dir() else ():
            path = quarantine / entry
            if path.is_symlink() or not path.is_dir():
                path.unlink()
            else:
                shutil.rmtree(path)
        shutil.rmtree(hostdir)


def test_enabled_watch_daemon_comes_back_after_reboot(clean):
    """`systemctl enable --now certrelay-watch.service`: is-enabled says enabled, and after
    the container is powered off and booted again the daemon is active."""
    world = clean
    container = world.container
    container.systemctl("enable", "--now", "certrelay-watch.service")
    try:
        assert container.systemctl("is-enabled", "certrelay-watch.service").strip() == "enabled"
        assert container.show("certrelay-watch.service", "ActiveState")["ActiveState"] == "active", world.explain()

        container.stop()
        world.container = Container(world.root, container.log_path, name=container.name).boot()

        wait_until(lambda: world.container.show("certrelay-watch.service", "ActiveState")["ActiveState"] == "active",
                   30, what="certrelay-watch.service to be active after the reboot", explain=world.explain)
        assert world.container.systemctl("is-enabled", "certrelay-watch.service").strip() == "enabled"
    finally:
        world.container.systemctl("disable", "--now", "certrelay-watch.service", check=False)
