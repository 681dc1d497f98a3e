"""End to end, the fleet (issue 20) on real booted Debian systems: one certbot host, a
mail host and a web host, each a systemd-nspawn container with its own root (an overlay
of one cached root file system that also holds etcd and python3-nacl), linked by a
private network the test makes (container.Lan: 192.0.2.0/24, no route anywhere else;
the names in each /etc/hosts). nspawn lets them use bpf(), so that systemd enforces the
units' IP firewall (IPAddressAllow=) as on a real server.

    certbot 192.0.2.10   etcd (Debian's etcd.service, TLS), certbot's /etc/letsencrypt,
                         certrelay with [fleet] only: `certrelay run` publishes
    mail    192.0.2.25   dovecot (993), exim4 (465, its key installed by certrelay for
                         Debian-exim), certrelay.path + certrelay-subscribe.service
    web     192.0.2.80   apache2 (443), certrelay.path + certrelay-subscribe.service

certrelay is installed in each from its Debian package as the README says (test_e2e's
install_certrelay). Before the fleet, mail and web serve a copy of the lineage made the
way admins copy today (rsync of live/ and archive/). The fleet is then set up as
docs/fleet.md tells an admin, with the commands it shows (a test checks that the docs
still show them): etcd's CA and server certificate with openssl and TLS in
/etc/default/etcd, `certrelay fleet keygen` and `init` on the packaged rules file, the
rules tables, the password files, etcd's root user and the lines `certrelay fleet roles`
prints run as that root, `systemctl edit certrelay-subscribe.service` (IPAddressAllow),
`systemctl enable --now certrelay.path certrelay-subscribe.service`.

Checked: the units' firewall holds (etcd out of reach with the hardening's loopback,
reachable with the drop-in's address); every unit enabled and active and `certrelay
check` passing everywhere (a host's says other hosts' values are refused); the first
`certrelay run` on the certbot host publishes the current certificate to the hosts just
added, which install it, restart or reload their services, verify and acknowledge; a
real `certbot renew` (tests/acme.py, as test_e2e.py runs it: Pebble and certbot on the
test's own machine, certbot in a mount namespace of its own on the certbot host's
/etc/letsencrypt, as a certbot container sharing only that directory; its deploy hook
is the one `certrelay install-hook` put there) and `certrelay run` publish the new
certificate, each host's
own `certrelay verify` says every endpoint serves it (openssl sees its serial), and
`certrelay fleet status` has every host current with the new fingerprint; the certbot
host's certrelay.path, with the drop-in docs/fleet.md asks for, publishes the next
renewal by itself. Last, neither etcd's keys (`etcdctl get`) nor a snapshot of its
data hold a private key: no PEM, no DER, no base64 of either, no raw private number, of
any certificate key or fleet key.

Needs what test_e2e.py needs; the root file system with etcd is built once into .cache/
(about two minutes); a run on it takes about a minute.
"""

import base64
import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from .. import acme
from . import rootfs
from .container import Container, Lan, boot_all, stop_all, wait_until
from .test_e2e import REASON, group_id, install_certrelay, sh

REPO = Path(__file__).resolve().parents[2]
FILES = Path(__file__).resolve().parent / "files"
NAME = "example.test"
#: The root file system of every machine here: the shared one plus the fleet's packages.
FLEET_PACKAGES = (*rootfs.PACKAGES, "python3-nacl", "etcd-server", "etcd-client")
ADDRESSES = {"certbot": "192.0.2.10", "mail": "192.0.2.25", "web": "192.0.2.80"}
HOSTS = ("mail", "web")  # the fleet hosts
ETCD = "https://certbot.fleet.test:2379"
FLEET_DIR = "/etc/certrelay/fleet"
RULES = "/etc/certrelay/rules.toml"
#: The TLS services of each fleet host: {unit: port}, and the endpoints its rules verify.
SERVICES = {"mail": {"dovecot": 993, "exim4": 465}, "web": {"apache2": 443}}
ENDPOINTS = {"mail": ["imaps://127.0.0.1:993", "smtps://127.0.0.1:465"], "web": ["https://127.0.0.1:443"]}
#: Units in the image that are no part of these hosts, disabled before boot.
NOT_HERE = {"certbot": ("haproxy.service", "postgresql.service"),
            "mail": ("haproxy.service", "postgresql.service", "etcd.service", "apache2.service"),
            "web": ("haproxy.service", "postgresql.service", "etcd.service", "dovecot.service", "exim4.service")}
DEBUG_UNITS = {"certbot": ("etcd", "certrelay.service"),
               "mail": ("certrelay-subscribe.service", "certrelay.service", "dovecot", "exim4"),
               "web": ("certrelay-subscribe.service", "certrelay.service", "apache2")}
#: bpf(): without it systemd in the container cannot load the units' IP firewall and
#: silently runs them without (IPAddressAllow/IPAddressDeny then allow everything), and
#: the drop-in docs/fleet.md asks for would prove nothing.
NSPAWN_OPTIONS = ("--system-call-filter=bpf",)
RELAY_TIMEOUT = 90  # seconds from `certrelay run` on the certbot host until every host serves it

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(REASON is not None, reason=REASON or "")]

# The rules, as an admin writes them from docs/fleet.md (the keys filled in by setup).
CERTBOT_RULES = f"""\
# The certbot host serves nothing itself: no [[rule]], only the fleet it publishes to.
[fleet]
endpoints = ["{ETCD}"]
ca-file = "{FLEET_DIR}/ca.pem"
user = "certrelay-publisher"
password-file = "{FLEET_DIR}/etcd.password"
signing-key = "{FLEET_DIR}/publisher.key"
ack-timeout = "1h"

[[fleet.host]]
name = "mail"
recipient = "{{mail}}"
match = ["{NAME}"]

[[fleet.host]]
name = "web"
recipient = "{{web}}"
domains = ["www.{NAME}"]
"""
SUBSCRIBE = f"""
[subscribe]
endpoints = ["{ETCD}"]
ca-file = "{FLEET_DIR}/ca.pem"
host = "{{host}}"
user = "certrelay-host-{{host}}"
password-file = "{FLEET_DIR}/etcd.password"
identity = "{FLEET_DIR}/host.key"
publisher = "{{publisher}}"
resync-interval = "1h"
"""
SETTINGS = """\
[settings]
# The test acts twice within a minute (the first publication, then the renewal): never
# hold an action back for the per-unit interval.
min-interval = 0
"""
MAIL_RULES = SETTINGS + f"""
[[rule]]
match = ["{NAME}"]
restart = ["dovecot", "exim4"]
verify = {json.dumps(ENDPOINTS["mail"])}

  # exim4 reads its key as Debian-exim (docs/install.md); the subscriber's keys are root's.
  [[rule.install]]
  dest = "/etc/exim4/certrelay/{{{{name}}}}.key"
  content = ["privkey"]
  group = "Debian-exim"
  mode = "0640"

  [[rule.install]]
  dest = "/etc/exim4/certrelay/{{{{name}}}}.crt"
  content = ["fullchain"]
  mode = "0644"
""" + SUBSCRIBE
WEB_RULES = SETTINGS + f"""
[[rule]]
match = ["{NAME}"]
reload = ["apache2"]
verify = {json.dumps(ENDPOINTS["web"])}
""" + SUBSCRIBE


# --- the machines -------------------------------------------------------------------


@dataclasses.dataclass
class Fleet:
    """The three booted machines, their roots, the ACME server and what setup learned."""

    roots: dict  # {"certbot"|"mail"|"web": Path}
    machines: dict  # {...: Container}
    server: object  # acme.AcmeServer
    lan: Lan
    root_password: str = ""  # etcd's root user's, set by setup

    @property
    def config(self):
        """The certbot host's /etc/letsencrypt (certbot's config dir), seen from the test's host."""
        return self.roots["certbot"] / "etc" / "letsencrypt"

    def run(self, host, argv, check=True, **kwargs):
        """Run `argv` on `host` (as its root); return the CompletedProcess; with `check`,
        assert exit status 0 (the output and the journals in the message)."""
        done = self.machines[host].run([str(word) for word in argv], **kwargs)
        if check:
            assert done.returncode == 0, self.explain(f"{host}: {' '.join(map(str, argv))} exited {done.returncode}:\n"
                                                      f"{done.stdout}{done.stderr}")
        return done

    def certrelay(self, host, *args, check=True, timeout=120):
        return self.run(host, ["certrelay", *args], check=check, timeout=timeout)

    def write(self, host, path, text, mode=0o644, group=None):
        """Write the file `path` on `host` as root would (owner root, `group` by name)."""
        target = self.roots[host] / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text) if isinstance(text, str) else target.write_bytes(text)
        os.chown(target, 0, group_id(self.roots[host], group) if group else 0)
        target.chmod(mode)

    def status(self):
        """Return {(host, lineage): row} of `certrelay fleet status --json` on the certbot host."""
        done = self.certrelay("certbot", "fleet", "status", "--json", check=False)
        assert done.returncode in (0, 1), self.explain(f"fleet status exited {done.returncode}: {done.stderr}")
        return {(row["host"], row["name"]): row for row in json.loads(done.stdout)}

    def verified(self, host):
        """Return `certrelay verify --json` on `host`: [{endpoint, outcome, served_sha256, ...}]."""
        done = self.certrelay(host, "verify", "--json", check=False)
        return json.loads(done.stdout or "[]")

    def serials(self, host):
        """Return {unit: serial served} for `host`'s TLS services, from openssl in its network."""
        return {unit: self.machines[host].serial_on_port(port) for unit, port in SERVICES[host].items()}

    def explain(self, *extra):
        """The journals and state worth reading when something failed."""
        parts = list(extra)
        for host, machine in self.machines.items():
            if machine.leader:
                failed = machine.systemctl("--failed", "--no-legend", check=False)
                parts.append(f"=== {host}: failed units: {failed.strip() or 'none'}")
                parts.append(machine.journals(*DEBUG_UNITS[host], lines=30))
        return "\n".join(parts)


def fingerprint(pem_path):
    """Return the SHA-256 (hex) of the DER of the certificate in `pem_path`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    certificate = x509.load_pem_x509_certificate(Path(pem_path).read_bytes())
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def disable(root, units):
    sh("systemctl", f"--root={root}", "--quiet", "disable", *units)


def copy_lineage(source_config, root):
    """Copy live/NAME and archive/NAME into `root`'s /etc/letsencrypt as `rsync -a` does:
    how the hosts got their certificates before the fleet."""
    target = root / "etc" / "letsencrypt"
    for top in ("live", "archive"):
        (target / top).mkdir(mode=0o700, parents=True, exist_ok=True)
        shutil.copytree(source_config / top / NAME, target / top / NAME, symlinks=True)


def configure_mail(fleet_roots, config):
    """dovecot and exim4 with the lineage; exim's copy of cert and key as certrelay will
    install it (root:Debian-exim 0640)."""
    root = fleet_roots["mail"]
    copy_lineage(config, root)
    shutil.copyfile(FILES / "dovecot-99-certrelay-e2e.conf", root / "etc/dovecot/conf.d/99-certrelay-e2e.conf")
    shutil.copyfile(FILES / "loop-exim4.conf.localmacros", root / "etc/exim4/exim4.conf.localmacros")
    exim = root / "etc" / "exim4" / "certrelay"
    exim.mkdir(mode=0o755)
    for part, suffix, mode in (("fullchain", "crt", 0o644), ("privkey", "key", 0o640)):
        target = exim / f"{NAME}.{suffix}"
        target.write_bytes((config / "live" / NAME / f"{part}.pem").read_bytes())
        os.chown(target, 0, group_id(root, "Debian-exim"))
        target.chmod(mode)


def configure_web(fleet_roots, config):
    """apache2 with an SSL vhost for the lineage on 443."""
    root = fleet_roots["web"]
    copy_lineage(config, root)
    shutil.copyfile(FILES / "apache2-certrelay-e2e.conf", root / "etc/apache2/sites-available/certrelay-e2e.conf")
    sh("chroot", root, "a2enmod", "-q", "ssl")
    sh("chroot", root, "a2ensite", "-q", "certrelay-e2e")


def etc_hosts(root):
    """Every machine knows the others by name (no DNS on this network)."""
    lines = "".join(f"{address}\t{host}.fleet.test {host}\n" for host, address in ADDRESSES.items())
    with open(root / "etc" / "hosts", "a") as hosts:
        hosts.write("# the fleet's private network (test_fleet_e2e.py)\n" + lines)


@pytest.fixture(scope="module")
def machines():
    """Build (or reuse) the root file system with etcd, give each machine its overlay,
    install certrelay, get example.test from Pebble on the certbot host, copy it to mail
    and web, boot the three side by side and link them. Teardown powers them off (by
    PID, in parallel), stops Pebble, unmounts the overlays, removes the work dir."""
    with rootfs.scratch_roots("certrelay-e2e-fleet-", ["certbot", *HOSTS], FLEET_PACKAGES) as (roots, work_dir, stack):
        for root in roots.values():
            install_certrelay(root, REPO / "etc" / "rules.toml")  # the package's own, no rule yet
            etc_hosts(root)
        server = stack.enter_context(acme.acme_server(work_dir))
        config = roots["certbot"] / "etc" / "letsencrypt"
        server.certonly(config, [NAME, f"*.{NAME}"])
        for pending in (config / "certrelay" / "queue").iterdir():  # the services start with it
            pending.unlink()
        configure_mail(roots, config)
        configure_web(roots, config)
        for host, units in NOT_HERE.items():
            disable(roots[host], units)
        containers = {host: Container(root, work_dir / f"{host}-console.log", name=f"certrelay-fleet-{host}",
                                      options=NSPAWN_OPTIONS)
                      for host, root in roots.items()}
        stack.callback(stop_all, list(containers.values()))
        boot_all(list(containers.values()))
        lan = Lan(containers["certbot"], ADDRESSES["certbot"])
        for host in HOSTS:
            lan.connect(containers[host], ADDRESSES[host])
        yield Fleet(roots, containers, server, lan)


# --- the admin's setup, as docs/fleet.md says ---------------------------------------


def quoted(output, key):
    """The value of the line `key = "..."` a command printed."""
    for line in output.splitlines():
        if line.startswith(f"{key} = "):
            return line.split('"')[1]
    raise AssertionError(f"no {key} line in {output!r}")


#: docs/fleet.md's commands for etcd's TLS on the certbot host (its name and address filled in).
ETCD_TLS = """\
mkdir -p /etc/etcd && cd /etc/etcd
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \\
    -subj "/CN=fleet etcd CA" -keyout ca.key -out ca.pem
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN={name}" \\
    -keyout server-key.pem -out server.csr
echo "subjectAltName = DNS:{name}, IP:{address}" > server.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 825 \\
    -extfile server.ext -out server.pem
chmod 0600 ca.key && chgrp etcd server-key.pem && chmod 0640 server-key.pem
cat >> /etc/default/etcd <<EOF
ETCD_LISTEN_CLIENT_URLS=https://0.0.0.0:2379
ETCD_ADVERTISE_CLIENT_URLS=https://{name}:2379
ETCD_CERT_FILE=/etc/etcd/server.pem
ETCD_KEY_FILE=/etc/etcd/server-key.pem
EOF
systemctl restart etcd
"""


def setup_etcd(fleet):
    """etcd on the certbot host for a small fleet, as docs/fleet.md says: a CA and a
    server certificate made with openssl, TLS on every address (/etc/default/etcd); the
    CA file copied to every host (the certbot host too) as /etc/certrelay/fleet/ca.pem."""
    fleet.run("certbot", ["sh", "-ec", ETCD_TLS.format(name="certbot.fleet.test", address=ADDRESSES["certbot"])])
    authority = (fleet.roots["certbot"] / "etc" / "etcd" / "ca.pem").read_bytes()
    for host in fleet.roots:
        fleet.write(host, f"{FLEET_DIR}/ca.pem", authority)


def etcdctl_environment(root_password=None):
    environment = [f"ETCDCTL_ENDPOINTS={ETCD}", f"ETCDCTL_CACERT={FLEET_DIR}/ca.pem"]
    return environment + ([f"ETCDCTL_USER=root:{root_password}"] if root_password else [])


def systemctl_edit(fleet, host, unit, text):
    """`systemctl edit UNIT` on `host`, the editor writing `text` (systemctl edit wants a
    terminal: `script` gives it one)."""
    fleet.write(host, "/root/drop-in.conf", text)
    fleet.write(host, "/root/editor", '#!/bin/sh\ncat /root/drop-in.conf > "$1"\n', mode=0o755)
    fleet.run(host, ["script", "--quiet", "--return", "--command", f"systemctl edit {unit}", "/dev/null"],
              environment=["SYSTEMD_EDITOR=/root/editor", "TERM=dumb"])


#: docs/fleet.md step 3 on the certbot host: the password files the comments of `certrelay
#: fleet roles` say how to make, etcd's root user (once per cluster; the admin types its
#: password at `etcdctl user add root`, here it comes from a file), then the lines `fleet
#: roles` prints, run as that root (ETCDCTL_USER=root:PASSWORD from the environment).
ROLES = """\
(umask 077; openssl rand -base64 24 > /etc/certrelay/fleet/etcd.password)
mkdir -p /root/fleet && cd /root/fleet
{host_passwords}
certrelay fleet roles > roles.sh
export ETCDCTL_ENDPOINTS={etcd} ETCDCTL_CACERT=/etc/certrelay/fleet/ca.pem
(umask 077; openssl rand -base64 24 > /root/etcd-root.password)
etcdctl user add root --interactive=false < /root/etcd-root.password
etcdctl user grant-role root root
etcdctl auth enable
ETCDCTL_USER="root:$(cat /root/etcd-root.password)" sh -e roles.sh
"""


@pytest.fixture(scope="module")
def fleet(machines):
    """Set the fleet up from nothing, step by step as docs/fleet.md says."""
    fleet = machines
    setup_etcd(fleet)
    # 1. On each fleet host: its key, printing its recipient.
    recipients = {}
    for host in HOSTS:
        made = fleet.certrelay(host, "fleet", "keygen")
        recipients[host] = quoted(made.stdout, "recipient")
    # 2. On the certbot host: the signing key, then [fleet] with a [[fleet.host]] per host.
    publisher = quoted(fleet.certrelay("certbot", "fleet", "init").stdout, "publisher")
    fleet.write("certbot", RULES, CERTBOT_RULES.format(**recipients))
    # 3. The etcd users and roles; each host's password file copied to it, mode 0600.
    host_passwords = "\n".join(f"(umask 077; openssl rand -base64 24 > certrelay-host-{host}.password)"
                               for host in HOSTS)
    fleet.run("certbot", ["sh", "-ec", ROLES.format(host_passwords=host_passwords, etcd=ETCD)])
    fleet.root_password = (fleet.roots["certbot"] / "root" / "etcd-root.password").read_text().strip()
    for host in HOSTS:
        password = (fleet.roots["certbot"] / f"root/fleet/certrelay-host-{host}.password").read_text()
        fleet.write(host, f"{FLEET_DIR}/etcd.password", password, mode=0o600)
    # 4. On each fleet host: [subscribe] beside its rules, the subscriber's drop-in (the
    #    etcd address), on mail the drop-in letting certrelay.service write exim's copies
    #    (docs/install.md), then the units.
    for host, rules in (("mail", MAIL_RULES), ("web", WEB_RULES)):
        fleet.write(host, RULES, rules.format(host=host, publisher=publisher))
        systemctl_edit(fleet, host, "certrelay-subscribe.service",
                       f"[Service]\nIPAddressAllow={ADDRESSES['certbot']}\n")
    systemctl_edit(fleet, "mail", "certrelay.service", "[Service]\nReadWritePaths=/etc/exim4/certrelay\n")
    for host in HOSTS:
        fleet.run(host, ["systemctl", "enable", "--now", "certrelay.path", "certrelay-subscribe.service"])
    return fleet


# --- the checks ---------------------------------------------------------------------


def test_the_docs_give_the_commands_this_test_runs():
    """docs/fleet.md shows the commands of steps 0 and 3 that the setup here runs, line
    for line, with its example name and address (comments aside)."""
    docs = {line.partition(" #")[0].strip() for line in (REPO / "docs" / "fleet.md").read_text().splitlines()}
    scripts = (ETCD_TLS.format(name="etcd1.example.net", address="192.0.2.10"),
               ROLES.format(host_passwords="(umask 077; openssl rand -base64 24 > certrelay-host-mail.password)",
                            etcd="https://etcd1.example.net:2379"))
    missing = [line for script in scripts for line in script.splitlines() if line.strip() not in docs]
    assert not missing, f"docs/fleet.md lacks these lines of the setup: {missing}"


#: Connects to etcd on the certbot host (argv[1]), or fails.
PROBE = "import socket, sys; socket.create_connection((sys.argv[1], 2379), 3).close()"


def reaches_etcd(fleet, host, *properties):
    """Whether a process on `host` run as a unit with `properties` connects to etcd."""
    done = fleet.run(host, ["systemd-run", "--wait", "--pipe", "--quiet", *(f"--property={p}" for p in properties),
                            "python3", "-c", PROBE, ADDRESSES["certbot"]], check=False)
    return done.returncode == 0


def test_the_units_firewall_holds_here(fleet):
    """The units' IP firewall works in these machines, so the drop-ins count: with the
    hardening's own allowance (loopback only) etcd is out of reach, with the address
    the drop-in adds it is not."""
    hardening = ("IPAddressDeny=any", "IPAddressAllow=localhost")
    assert not reaches_etcd(fleet, "mail", *hardening)
    assert reaches_etcd(fleet, "mail", *hardening, f"IPAddressAllow={ADDRESSES['certbot']}")


def test_the_units_run_and_every_check_passes(fleet):
    """After the setup, each host's units are enabled and active, and `certrelay check`
    passes on every machine: etcd answers, the own prefix is readable, others' refused."""
    for host in HOSTS:
        units = ("certrelay.path", "certrelay-subscribe.service")
        enabled = fleet.run(host, ["systemctl", "is-enabled", *units], check=False)
        assert enabled.stdout.split() == ["enabled", "enabled"], fleet.explain(enabled.stdout + enabled.stderr)
        active = fleet.run(host, ["systemctl", "is-active", *units], check=False)
        assert active.stdout.split() == ["active", "active"], fleet.explain(active.stdout + active.stderr)
        drop_in = fleet.machines[host].show("certrelay-subscribe.service", "IPAddressAllow", "DropInPaths")
        assert ADDRESSES["certbot"] in drop_in["IPAddressAllow"], drop_in
        checked = fleet.certrelay(host, "check", check=False)
        assert checked.returncode == 0, fleet.explain(checked.stderr)
        assert f"[subscribe]: etcd answers at {ETCD}" in checked.stderr, checked.stderr
        assert "other hosts' values are refused to certrelay-host-" + host in checked.stderr, checked.stderr
    checked = fleet.certrelay("certbot", "check", check=False)
    assert checked.returncode == 0, fleet.explain(checked.stderr)
    assert f"[fleet]: etcd answers at {ETCD}" in checked.stderr, checked.stderr


def wait_served(fleet, expected):
    """Wait until every host's `certrelay verify` says each endpoint serves `expected`
    (SHA-256) and `fleet status` has every host current with it; return the status."""
    last = {}

    def everywhere():
        last["status"] = fleet.status()
        last.update({host: fleet.verified(host) for host in HOSTS})
        rows = last["status"]
        return (
            set(rows) == {(host, NAME) for host in HOSTS}
            and all(row["state"] == "current" and row["fingerprint"] == row["acked"] == expected
                    for row in rows.values())
            and all(sorted(check["endpoint"] for check in last[host]) == sorted(ENDPOINTS[host])
                    and all(check["outcome"] == "current" and check["served_sha256"] == expected
                            for check in last[host]) for host in HOSTS)
        )

    wait_until(everywhere, RELAY_TIMEOUT, interval=0.5, what=f"every host to serve {expected[:16]}...",
               explain=lambda: fleet.explain(json.dumps(last, indent=1, default=str)))
    return last["status"]


def published_to(output):
    """Return the hosts that `certrelay run` says it published NAME to ("done: publish
    HOST (NAME): ...", for a notification and for what a host lacked alike)."""
    said = [line.partition("done: publish")[2] for line in output.splitlines() if "done: publish" in line]
    return {host for line in said if NAME in line
            for host in HOSTS if host in re.findall(r"[a-z0-9_-]+", line.replace(NAME, ""))}


def test_the_first_run_publishes_to_the_hosts_just_added(fleet):
    """No renewal yet: the certbot host's next `certrelay run` publishes what the new
    hosts lack; each installs it, restarts its services, verifies and acknowledges."""
    ran = fleet.certrelay("certbot", "run")
    assert published_to(ran.stderr) == set(HOSTS), ran.stderr
    expected = fingerprint(fleet.config / "live" / NAME / "cert.pem")
    wait_served(fleet, expected)


def test_a_renewal_reaches_every_host_which_proves_it_serves_it(fleet):
    """A real `certbot renew` on the certbot host, then `certrelay run` there: each host
    serves the new certificate, said by its own `certrelay verify` (and seen by openssl),
    and `certrelay fleet status` has every host current with the new fingerprint."""
    old_serial = acme.cert_serial(fleet.config, NAME)
    old = fingerprint(fleet.config / "live" / NAME / "cert.pem")
    started = time.time() - 1
    renewed = fleet.server.renew(fleet.config, cert_names=[NAME])
    assert renewed.returncode == 0, renewed.stdout + renewed.stderr
    serial = acme.cert_serial(fleet.config, NAME)
    new = fingerprint(fleet.config / "live" / NAME / "cert.pem")
    assert serial != old_serial and new != old
    assert os.listdir(fleet.config / "certrelay" / "queue") == [NAME], "certbot's deploy hook wrote no notification"

    ran = fleet.certrelay("certbot", "run")
    assert published_to(ran.stderr) == set(HOSTS), ran.stderr

    rows = wait_served(fleet, new)
    assert all(row["published"] is not None and row["since"] is not None for row in rows.values()), rows
    for host in HOSTS:
        verified = fleet.certrelay(host, "verify", check=False)
        assert verified.returncode == 0, fleet.explain(verified.stderr)
        for endpoint in ENDPOINTS[host]:
            assert f"{endpoint} (SNI {NAME}) serves the current certificate of {NAME}" in verified.stderr, \
                verified.stderr
        assert fleet.serials(host) == {unit: serial for unit in SERVICES[host]}, fleet.explain()
        journal = fleet.machines[host].journal("certrelay.service", since=started)
        for unit in SERVICES[host]:
            verb = "reload" if host == "web" else "restart"
            assert f"done: {verb} {unit}.service ({NAME})" in journal, fleet.explain(journal)
    shown = fleet.certrelay("certbot", "fleet", "status")  # exit 0: every host current
    for host in HOSTS:
        line = next((line for line in shown.stdout.splitlines() if line.startswith(host + " ")), "")
        assert NAME in line and "current" in line and new[:16] in line, shown.stdout


def test_the_certbot_hosts_path_unit_publishes_with_its_drop_in(fleet):
    """The certbot host may run certrelay from its path unit instead of the cron line:
    certrelay.service is hardened to loopback, so it gets the etcd address in a drop-in
    (docs/fleet.md, step 5). Then the next renewal reaches every host with no command."""
    systemctl_edit(fleet, "certbot", "certrelay.service", f"[Service]\nIPAddressAllow={ADDRESSES['certbot']}\n")
    fleet.run("certbot", ["systemctl", "enable", "--now", "certrelay.path"])
    started = time.time() - 1
    renewed = fleet.server.renew(fleet.config, cert_names=[NAME])
    assert renewed.returncode == 0, renewed.stdout + renewed.stderr
    wait_served(fleet, fingerprint(fleet.config / "live" / NAME / "cert.pem"))
    journal = fleet.machines["certbot"].journal("certrelay.service", since=started)
    assert published_to(journal) == set(HOSTS), fleet.explain(journal)


def base64_forms(data):
    """The characters that `data` alone decides in any longer base64 text holding it, at
    each of the three alignments (standard and URL-safe alphabets)."""
    forms = []
    for shift in range(3):
        text = base64.b64encode(bytes(shift) + data)[4 if shift else 0:-4]
        forms += [text, text.translate(bytes.maketrans(b"+/", b"-_"))]
    return forms


def secrets(fleet):
    """Return {what: bytes} a store holding a usable private key would contain: each
    private key certbot made for the lineage (PEM body, PKCS#8 and traditional DER, the
    raw private number, each also in base64) and the fleet's own private keys."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    found = {}
    for path in sorted((fleet.config / "archive" / NAME).glob("privkey*.pem")):
        pem = path.read_bytes()
        key = serialization.load_pem_private_key(pem, password=None)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            number = key.private_numbers().private_value.to_bytes((key.curve.key_size + 7) // 8, "big")
        else:
            assert isinstance(key, rsa.RSAPrivateKey)
            number = key.private_numbers().d.to_bytes((key.key_size + 7) // 8, "big")
        body = b"".join(line for line in pem.splitlines() if not line.startswith(b"-----"))
        blobs = {"PEM body": body[:64], "raw private number": number}
        for form in (serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL):
            blobs[f"{form.name} DER"] = key.private_bytes(serialization.Encoding.DER, form,
                                                          serialization.NoEncryption())
        for what, blob in list(blobs.items()):
            if what != "PEM body":
                for number_, form in enumerate(base64_forms(blob)):
                    blobs[f"{what} in base64 ({number_})"] = form
        found.update({f"{path.name}: {what}": blob for what, blob in blobs.items()})
    for host, path in (("certbot", "publisher.key"), ("mail", "host.key"), ("web", "host.key")):
        text = (fleet.roots[host] / FLEET_DIR.lstrip("/") / path).read_text().strip()
        raw = base64.b64decode(text.partition(":")[2])
        found[f"{host}'s {path}"] = text.partition(":")[2].encode()
        found[f"{host}'s {path} raw"] = raw
    for marker in (b"PRIVATE KEY",):
        found[f"{marker.decode()!r}"] = marker
        for number_, form in enumerate(base64_forms(marker)):
            found[f"{marker.decode()!r} in base64 ({number_})"] = form
    return found


def test_etcd_holds_no_private_key(fleet):
    """What etcd holds (its keys through etcdctl, and a snapshot of its data with every
    revision kept) has no private key of any host, in any encoding; the sealed values
    and the fingerprints are there."""
    environment = etcdctl_environment(fleet.root_password)
    listed = fleet.run("certbot", ["etcdctl", "get", "--prefix", "/certrelay/"], environment=environment).stdout
    fleet.run("certbot", ["etcdctl", "snapshot", "save", "/root/etcd.snapshot"], environment=environment)
    snapshot = (fleet.roots["certbot"] / "root" / "etcd.snapshot").read_bytes()
    current = fingerprint(fleet.config / "live" / NAME / "cert.pem")
    for host in HOSTS:  # what is looked at holds what was published
        assert f"/certrelay/v1/hosts/{host}/lineages/{NAME}" in listed
        assert f"/certrelay/v1/acks/{host}/{NAME}".encode() in snapshot
    assert current in listed and current.encode() in snapshot and '"sealed": "' in listed
    for what, secret in secrets(fleet).items():
        assert secret not in listed.encode(), f"etcdctl get shows {what}"
        assert secret not in snapshot, f"etcd's snapshot holds {what}"
