"""The Debian package, end to end, on a booted Debian 12 (systemd-nspawn).

The way an admin does it, in order: `apt-get install ./certrelay_*.deb` (the
dependencies are Debian's, already in the root file system: no pip, no make, no source
tree inside), `man certrelay`, Tab completion, `certrelay install-hook`, `systemctl
enable --now` of each unit the README names, a notification published by the hook
relayed by the path unit to a real unit, an upgrade to a newer build (the edited rules
kept, the running daemon restarted), and `apt-get purge` (nothing of certrelay left,
/etc/letsencrypt untouched).

The tests run in file order on one container; each builds on the one before.
Needs root, systemd-nspawn, mmdebstrap (the cached root file system of rootfs.py) and
the package's build dependencies.
"""

import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from . import debs, rootfs
from .container import Container, wait_until

REASON = rootfs.skip_reason() or debs.skip_reason()
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(REASON is not None, reason=REASON or "")]

NAME = "example.test"
TARGET = "certrelay-e2e-target.service"
#: A real unit for the rules to restart: each start appends a line to STARTS.
STARTS = "/var/lib/certrelay-e2e-target/starts"
TARGET_UNIT = f"""[Unit]
Description=certrelay end-to-end test: a service that records its starts

[Service]
Type=oneshot
RemainAfterExit=yes
StateDirectory=certrelay-e2e-target
ExecStart=/bin/sh -c 'echo started >> {STARTS}'
"""
RULES = f"""# edited by the admin
[[rule]]
match = ["{NAME}"]
restart = ["certrelay-e2e-target"]

[settings]
min-interval = 0
"""
UNITS = ("certrelay.path", "certrelay-retry.timer", "certrelay-watch.service", "certrelay.service",
         "certbot-docker-renew.service", "certbot-docker-renew.timer")


def make_lineage(config, name):
    """Give `config` a certbot lineage `name`: archive/NAME/*1.pem, live/NAME/* relative links."""
    archive, live = config / "archive" / name, config / "live" / name
    archive.mkdir(parents=True)
    live.mkdir(parents=True)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}", "-days", "90",
         "-keyout", archive / "privkey1.pem", "-out", archive / "cert1.pem"],
        check=True, capture_output=True,
    )
    shutil.copyfile(archive / "cert1.pem", archive / "fullchain1.pem")
    (archive / "chain1.pem").write_text("")
    for part in ("cert", "chain", "fullchain", "privkey"):
        (live / f"{part}.pem").symlink_to(f"../../archive/{name}/{part}1.pem")


def tree_digest(top):
    """Return {relative path: (mode, owner, content hash or link target)} for everything under `top`."""
    found = {}
    for directory, names, files in os.walk(top):
        for name in names + files:
            path = Path(directory) / name
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                what = os.readlink(path)
            elif stat.S_ISREG(info.st_mode):
                what = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                what = ""
            found[str(path.relative_to(top))] = (info.st_mode, info.st_uid, info.st_gid, what)
    return found


class Machine:
    """The booted container and its root, with the two builds of the package in /root."""

    def __init__(self, root, container, first, second):
        self.root, self.container, self.first, self.second = root, container, first, second

    def run(self, *argv, timeout=120, check=True):
        done = self.container.run(["env", "DEBIAN_FRONTEND=noninteractive", *argv], timeout=timeout)
        if check:
            assert done.returncode == 0, f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
        return done

    def show(self, unit, *properties):
        return self.container.show(unit, *properties)

    def starts(self):
        path = self.root / STARTS.lstrip("/")
        return len(path.read_text().splitlines()) if path.exists() else 0

    def explain(self, *extra):
        units = ("certrelay.path", "certrelay.service", "certrelay-watch.service", TARGET)
        return "\n".join([*extra, self.container.journals(*units)])


@pytest.fixture(scope="module")
def machine():
    """Boot an overlay of the cached root file system holding both .debs and a target unit."""
    first, second = debs.built_deb(), debs.built_deb("e2e1")
    with rootfs.scratch_root("certrelay-e2e-package-") as (root, work_dir, stack):
        # Not /tmp: nspawn mounts a tmpfs there.
        for deb in (first, second):
            shutil.copy(deb, root / "root" / deb.name)
        # The cached root file system keeps dpkg from installing man pages (smaller):
        # a normal Debian installs them.
        dpkg_config = root / "etc" / "dpkg" / "dpkg.cfg.d" / "99mmdebstrap"
        if dpkg_config.exists():
            kept = [line for line in dpkg_config.read_text().splitlines() if "/usr/share/man" not in line]
            dpkg_config.write_text("\n".join(kept) + "\n")
        (root / "etc" / "systemd" / "system" / TARGET).write_text(TARGET_UNIT)
        config = root / "etc" / "letsencrypt"
        config.mkdir(mode=0o755)
        make_lineage(config, NAME)
        container = Container(root, work_dir / "console.log", name="certrelay-e2e-package")
        stack.callback(container.stop)
        container.boot()
        yield Machine(root, container, first, second)


def test_apt_installs_the_package_and_starts_nothing(machine):
    done = machine.run("apt-get", "install", "-y", f"/root/{machine.first.name}")
    assert "certrelay" in done.stdout

    version = machine.run("certrelay", "--version").stdout
    assert debs.version(debs.source_tree()) in version
    for unit in UNITS:
        state = machine.show(unit, "UnitFileState", "ActiveState", "LoadState")
        assert state["LoadState"] == "loaded", (unit, state)
        assert state["ActiveState"] == "inactive", (unit, state)
        assert state["UnitFileState"] in ("disabled", "static"), (unit, state)
    state_dir = machine.root / "var" / "lib" / "certrelay"
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    conffiles = machine.run("dpkg-query", "-W", "-f=${Conffiles}", "certrelay").stdout
    assert "/etc/certrelay/rules.toml" in conffiles
    assert not (machine.root / "etc" / "letsencrypt" / "renewal-hooks").exists(), "the package wrote into /etc/letsencrypt"
    assert (machine.root / "usr" / "share" / "certrelay" / "certrelay-hook").stat().st_mode & 0o111


def test_man_pages_resolve(machine):
    assert machine.run("man", "-w", "certrelay").stdout.strip() == "/usr/share/man/man8/certrelay.8.gz"
    assert machine.run("man", "-w", "certrelay-rules").stdout.strip() == "/usr/share/man/man5/certrelay-rules.5.gz"
    page = machine.run("env", "MANPAGER=cat", "MANWIDTH=100", "man", "certrelay").stdout
    for command in ("install-hook", "run", "watch", "check", "explain"):
        assert f"\n   {command} [options]" in page, page
    rules_page = machine.run("env", "MANPAGER=cat", "MANWIDTH=100", "man", "5", "certrelay-rules").stdout
    assert "min-interval" in rules_page and "[[rule.install]]" in rules_page


def test_bash_completes_commands_and_options(machine):
    script = (
        "source /usr/share/bash-completion/completions/certrelay; "
        'COMP_WORDS=(certrelay "$1"); COMP_CWORD=1; _certrelay_completion certrelay; printf "%s\\n" "${COMPREPLY[@]}"'
    )
    words = machine.run("bash", "-c", script, "-", "in").stdout.split()
    assert "install-hook" in words, words
    script = script.replace('COMP_WORDS=(certrelay "$1"); COMP_CWORD=1', 'COMP_WORDS=(certrelay run "$1"); COMP_CWORD=2')
    words = machine.run("bash", "-c", script, "-", "--dr").stdout.split()
    assert words == ["--dry-run"], words


def test_autopkgtest_smoke_test_passes(machine):
    """debian/tests/smoke, the package's autopkgtest, on the installed package."""
    shutil.copy(debs.source_tree() / "debian" / "tests" / "smoke", machine.root / "root" / "smoke")
    (machine.root / "root" / "smoke-tmp").mkdir()

    done = machine.run("env", "AUTOPKGTEST_TMP=/root/smoke-tmp", "sh", "/root/smoke")

    assert done.stdout.strip().endswith("ok"), done.stdout + done.stderr


def test_install_hook_puts_the_packaged_hook_where_certbot_runs_it(machine):
    done = machine.run("certrelay", "install-hook")

    hook = machine.root / "etc/letsencrypt/renewal-hooks/deploy/certrelay-hook"
    assert "installed" in done.stderr
    assert hook.read_bytes() == (machine.root / "usr/share/certrelay/certrelay-hook").read_bytes()
    assert stat.S_IMODE(hook.stat().st_mode) == 0o755
    (machine.root / "etc/certrelay/rules.toml").write_text(RULES)
    machine.run("systemctl", "start", TARGET)
    check = machine.run("certrelay", "check")
    assert "certrelay-hook: current" in check.stderr


@pytest.mark.parametrize(
    "units",
    [("certrelay.path", "certrelay-retry.timer"), ("certrelay-watch.service",), ("certbot-docker-renew.timer",)],
    ids=["path-unit", "daemon", "docker-renew-timer"],
)
def test_enable_now_works_for_each_unit(machine, units):
    for unit in units:
        machine.run("systemctl", "enable", "--now", unit)
        assert machine.run("systemctl", "is-enabled", unit).stdout.strip() == "enabled"
        assert machine.run("systemctl", "is-active", unit).stdout.strip() == "active", machine.explain()
    for unit in units:
        machine.run("systemctl", "disable", "--now", unit)


def publish(machine):
    """Run the installed hook inside the container as certbot does after renewing NAME."""
    machine.run("env", f"RENEWED_LINEAGE=/etc/letsencrypt/live/{NAME}", f"RENEWED_DOMAINS={NAME}",
                "/bin/sh", "-c", "/etc/letsencrypt/renewal-hooks/deploy/certrelay-hook")


def renew(machine):
    """Do what a renewal does to the live certificate: a new certN.pem, live/NAME/cert.pem pointing at it."""
    archive, live = machine.root / "etc/letsencrypt/archive" / NAME, machine.root / "etc/letsencrypt/live" / NAME
    number = len(list(archive.glob("cert*.pem"))) + 1
    subprocess.run(
        ["openssl", "req", "-x509", "-key", archive / "privkey1.pem", "-subj", f"/CN={NAME}",
         "-addext", f"subjectAltName=DNS:{NAME}", "-days", "90", "-out", archive / f"cert{number}.pem"],
        check=True, capture_output=True,
    )
    (live / "cert.pem").unlink()
    (live / "cert.pem").symlink_to(f"../../archive/{NAME}/cert{number}.pem")


def queue(machine):
    path = machine.root / "etc/letsencrypt/certrelay/queue"
    return sorted(os.listdir(path)) if path.is_dir() else []


def test_path_unit_relays_a_notification_from_the_hook_to_a_real_unit(machine):
    machine.run("systemctl", "enable", "--now", "certrelay.path", "certrelay-retry.timer")
    before = machine.starts()
    renew(machine)

    publish(machine)

    wait_until(lambda: machine.starts() == before + 1 and not queue(machine), 30,
               what=f"{TARGET} to be restarted by certrelay.service", explain=machine.explain)
    service = machine.show("certrelay.service", "Result", "ExecMainStatus")
    assert service == {"Result": "success", "ExecMainStatus": "0"}, machine.explain()
    assert machine.show("certrelay.path", "ActiveState")["ActiveState"] == "active"
    assert f"done: restart {TARGET} ({NAME})" in machine.container.journal("certrelay.service")
    machine.run("systemctl", "disable", "--now", "certrelay.path", "certrelay-retry.timer")


def test_upgrade_keeps_the_edited_rules_and_restarts_the_running_daemon(machine):
    machine.run("systemctl", "enable", "--now", "certrelay-watch.service")
    wait_until(lambda: machine.show("certrelay-watch.service", "ActiveState")["ActiveState"] == "active", 30,
               what="the daemon to be active", explain=machine.explain)
    pid = machine.show("certrelay-watch.service", "MainPID")["MainPID"]

    machine.run("apt-get", "install", "-y", f"/root/{machine.second.name}")

    assert machine.run("dpkg-query", "-W", "-f=${Version}", "certrelay").stdout == debs.version(
        debs.source_tree()) + "+e2e1"
    assert (machine.root / "etc/certrelay/rules.toml").read_text() == RULES
    assert not list((machine.root / "etc/certrelay").glob("rules.toml.dpkg-*"))
    shown = machine.show("certrelay-watch.service", "ActiveState", "MainPID")
    assert shown["ActiveState"] == "active" and shown["MainPID"] not in ("0", pid), machine.explain(str(shown))
    assert machine.run("systemctl", "is-enabled", "certrelay-watch.service").stdout.strip() == "enabled"
    for unit in ("certrelay.path", "certrelay-retry.timer"):  # disabled before: still disabled, not started
        assert machine.show(unit, "UnitFileState", "ActiveState") == {"UnitFileState": "disabled",
                                                                       "ActiveState": "inactive"}
    # The new daemon relays.
    before = machine.starts()
    renew(machine)
    publish(machine)
    wait_until(lambda: machine.starts() == before + 1 and not queue(machine), 30,
               what=f"the upgraded daemon to restart {TARGET}", explain=machine.explain)


def test_purge_leaves_nothing_behind_and_letsencrypt_untouched(machine):
    files = machine.run("dpkg", "-L", "certrelay").stdout.split("\n")
    files = [Path(line) for line in files if line.startswith("/") and line != "/."]
    letsencrypt = tree_digest(machine.root / "etc/letsencrypt")

    machine.run("apt-get", "purge", "-y", "certrelay")

    assert machine.run("dpkg-query", "-W", "-f=${Status}", "certrelay", check=False).stdout in ("", "unknown ok not-installed")
    left = []
    for path in files:
        inside = machine.root / path.relative_to("/")
        if not os.path.lexists(inside):
            continue
        # A directory other packages share (/usr/share/man/man8, /lib/systemd/system) stays.
        owned = machine.run("dpkg-query", "-S", str(path), check=False).returncode == 0
        if not (inside.is_dir() and owned):
            left.append(str(path))
    assert left == [], left
    for gone in ("etc/certrelay", "var/lib/certrelay"):
        assert not (machine.root / gone).exists(), gone
    strays = subprocess.run(
        ["find", machine.root, "-xdev", "-name", "*certrelay*", "-not", "-path", f"{machine.root}/etc/letsencrypt/*",
         "-not", "-path", f"{machine.root}/root/*", "-not", "-name", "certrelay-e2e-target*"],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    assert strays == [], strays
    assert tree_digest(machine.root / "etc/letsencrypt") == letsencrypt
    assert machine.show("certrelay-watch.service", "ActiveState")["ActiveState"] == "inactive"
    assert machine.show(TARGET, "ActiveState")["ActiveState"] == "active"
