"""The fleet end to end on one machine: a real etcd on loopback (tests/etcd.py), a
certbot host and three fleet hosts, each a certrelay installation driven as its admin
would (`certrelay fleet init|keygen|roles`, `run`, `subscribe`, `fleet status`), with
the roles made by running the lines `fleet roles` prints."""

import json
import os
import signal
import subprocess

import pytest

from tests import wait
from tests.conftest import Relay

pytest.importorskip("nacl", reason="the fleet needs PyNaCl: apt-get install python3-nacl")
etcd_module = pytest.importorskip("tests.etcd")
if not os.path.exists(etcd_module.ETCD):
    pytest.skip("needs etcd: apt-get install etcd-server etcd-client", allow_module_level=True)

NAME = "example.ch"
HOSTS = ("mail", "web", "proxy")


class Fleet:
    """etcd, the certbot host `publisher` and the fleet hosts `hosts` {name: Relay}."""

    def __init__(self, tmp_path, etcd, ack_timeout="1h", endpoints=None):
        """`endpoints`: {host: the etcd URL it uses} where not etcd.endpoint."""
        self.etcd, self.root = etcd, str(tmp_path)
        self.publisher = Relay(tmp_path / "certbot")
        self.hosts = {host: Relay(tmp_path / host) for host in HOSTS}
        keys = os.path.join(self.root, "keys")
        os.makedirs(keys)
        init = fleet_command(self.publisher, "init", "--key", os.path.join(keys, "publisher.key"))
        assert init.returncode == 0, init.stderr
        publisher_key = quoted(init.stdout, "publisher")
        password = os.path.join(keys, "certrelay-publisher.password")
        write(password, "publisher-secret\n")
        tables = ""
        for host, relay in self.hosts.items():
            identity = os.path.join(keys, f"{host}.key")
            made = fleet_command(relay, "keygen", "--key", identity)
            assert made.returncode == 0, made.stderr
            tables += f'\n[[fleet.host]]\nname = "{host}"\nrecipient = "{quoted(made.stdout, "recipient")}"\n' \
                      f'match = ["{NAME}"]\n'
            host_password = os.path.join(self.root, f"certrelay-host-{host}.password")
            write(host_password, f"{host}-secret\n")
            relay.write_rules(
                f'[[rule]]\nmatch = ["{NAME}"]\nrestart = ["dovecot"]\n\n'
                f'[subscribe]\nendpoints = ["{(endpoints or {}).get(host, etcd.endpoint)}"]\nca-file = "{etcd.ca_file}"\nhost = "{host}"\n'
                f'user = "certrelay-host-{host}"\npassword-file = "{host_password}"\nidentity = "{identity}"\n'
                f'publisher = "{publisher_key}"\n')
        self.publisher.write_rules(
            f'[fleet]\nendpoints = ["{etcd.endpoint}"]\nca-file = "{etcd.ca_file}"\nuser = "certrelay-publisher"\n'
            f'password-file = "{password}"\nsigning-key = "{os.path.join(keys, "publisher.key")}"\n'
            f'ack-timeout = "{ack_timeout}"\n' + tables)
        # The admin's part: the lines `fleet roles` prints, run as etcd's root.
        etcd.enable_auth()
        roles = fleet_command(self.publisher, "roles")
        assert roles.returncode == 0, roles.stderr
        environment = {key: value for key, value in os.environ.items() if not key.startswith("ETCDCTL_")}
        environment["ETCDCTL_USER"] = f"root:{etcd.root_password}"
        done = subprocess.run(["sh", "-e"], input=roles.stdout, text=True, cwd=self.root, env=environment,
                              capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr + done.stdout

    def renew(self):
        """Renew the certificate on the certbot host, as certbot and its hook do, and
        run certrelay there: it publishes. Return the new fingerprint."""
        self.publisher.publish(NAME)
        ran = self.publisher.run()
        assert ran.returncode == 0, ran.stderr
        return live_fingerprint(self.publisher)

    def status(self):
        shown = fleet_command(self.publisher, "status", "--json")
        assert shown.returncode in (0, 1), shown.stderr
        return {(row["host"], row["name"]): row for row in json.loads(shown.stdout)}


def fleet_command(relay, command, *arguments):
    """Run `certrelay fleet COMMAND ARGUMENTS...` as `relay`'s admin would."""
    argv = relay.command("fleet", *arguments)
    argv.insert(argv.index("fleet") + 1, command)
    return subprocess.run(argv, env=relay.environment(), capture_output=True, text=True, timeout=120)


def quoted(output, key):
    """The value of `key = "..."` in a command's output."""
    for line in output.splitlines():
        if line.startswith(key + " = "):
            return line.split('"')[1]
    raise AssertionError(f"no {key} line in {output!r}")


def write(path, text):
    with open(path, "w", encoding="utf-8") as file:
        file.write(text)
    os.chmod(path, 0o600)


def live_fingerprint(relay):
    from certrelay import certificate

    return certificate.fingerprint(relay.config_dir, NAME)


@pytest.fixture
def fleet(tmp_path):
    with etcd_module.Etcd(tmp_path / "etcd") as etcd:
        built = Fleet(tmp_path, etcd)
        yield built
        for relay in (built.publisher, *built.hosts.values()):
            relay.stop()


def subscribe_once(relay):
    done = relay.run("--once", command="subscribe")
    return done


def test_a_renewal_reaches_every_host_which_acts_once_and_acknowledges(fleet):
    fingerprint = fleet.renew()
    daemons = {host: relay.start(command="subscribe") for host, relay in fleet.hosts.items()}
    for host, relay in fleet.hosts.items():
        wait.until(lambda relay=relay: relay.entries("queue") == [NAME], what=f"{host}'s notification")
        assert live_fingerprint(relay) == fingerprint
        # The certificate and its key switch together, and the key is the host's alone.
        live = os.path.join(relay.config_dir, "live", NAME)
        assert os.readlink(os.path.join(live, "privkey.pem")) == f"../../archive/{NAME}/current/privkey.pem"
        assert os.stat(os.path.join(live, "privkey.pem")).st_mode & 0o077 == 0
        ran = relay.run()  # the host's own certrelay (its path unit would)
        assert ran.returncode == 0, ran.stderr
        assert relay.calls() == ["restart dovecot.service"]
    wait.until(lambda: all(row["state"] == "current" and row["acked"] == fingerprint
                           for row in fleet.status().values()) and len(fleet.status()) == 3,
               what="every host to acknowledge", explain=fleet.status)
    for process in daemons.values():
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=wait.GENEROUS) == 0
    assert fleet_command(fleet.publisher, "status").returncode == 0
    # Nothing more to do anywhere: a second subscribe and run act on nothing.
    for relay in fleet.hosts.values():
        assert subscribe_once(relay).returncode == 0
        assert relay.entries("queue") == []
        relay.run()
        assert relay.calls() == ["restart dovecot.service"]


def test_a_stopped_host_catches_up_once_on_the_newest_across_a_compaction(fleet):
    mail = fleet.hosts["mail"]
    fleet.renew()
    daemon = mail.start(command="subscribe")
    wait.until(lambda: mail.entries("queue") == [NAME], what="the first notification")
    assert mail.run().returncode == 0
    daemon.send_signal(signal.SIGSTOP)
    try:
        for _ in range(3):
            newest = fleet.renew()
        revision = int(json.loads(fleet.etcd.etcdctl("get", "/", "--prefix", "--keys-only", "-w", "json"))
                       ["header"]["revision"])
        fleet.etcd.compact(revision)
    finally:
        daemon.send_signal(signal.SIGCONT)
    wait.until(lambda: os.path.exists(os.path.join(mail.config_dir, "live", NAME, "cert.pem"))
               and live_fingerprint(mail) == newest, what="the newest certificate on mail")
    wait.until(lambda: mail.entries("queue") == [NAME], what="one notification")
    assert mail.run().returncode == 0
    assert mail.calls() == ["restart dovecot.service"] * 2  # once for the first, once for the newest


def test_etcd_down_while_publishing_keeps_the_renewal_and_publishes_it_later(fleet):
    fleet.etcd.kill()
    fleet.publisher.publish(NAME)
    failed = fleet.publisher.run()
    assert failed.returncode == 1
    assert "cannot publish to mail" in failed.stderr
    assert fleet.publisher.entries("claimed"), "the notification must be kept"
    fleet.etcd.restart()
    again = fleet.publisher.run()
    assert again.returncode == 0, again.stderr
    assert fleet.publisher.entries("claimed") == []
    for relay in fleet.hosts.values():
        assert subscribe_once(relay).returncode == 0
        assert live_fingerprint(relay) == live_fingerprint(fleet.publisher)


def test_a_tampered_or_replayed_value_is_refused_and_the_host_keeps_what_it_has(fleet):
    from certrelay.fleet import store

    mail = fleet.hosts["mail"]
    first = fleet.renew()
    assert subscribe_once(mail).returncode == 0
    key = f"/certrelay/v1/hosts/mail/lineages/{NAME}"
    publisher = store.Store([fleet.etcd.endpoint], fleet.etcd.ca_file, "certrelay-publisher", "publisher-secret")
    old = publisher.get(key).value
    newest = fleet.renew()
    assert subscribe_once(mail).returncode == 0
    # A writer to the store replays the older value: refused, said, acknowledged.
    publisher.put(key, old)
    replayed = subscribe_once(mail)
    assert replayed.returncode == 1
    assert "refused" in replayed.stderr and "replayed" in replayed.stderr
    # ... or flips a byte of the sealed part.
    data = json.loads(old)
    data["sealed"] = data["sealed"][:40] + ("A" if data["sealed"][40] != "A" else "B") + data["sealed"][41:]
    publisher.put(key, json.dumps(data).encode())
    tampered = subscribe_once(mail)
    assert tampered.returncode == 1 and "tampered" in tampered.stderr
    assert live_fingerprint(mail) == newest != first
    row = fleet.status()["mail", NAME]
    assert row["state"] != "current" and "refused" in row["reason"]


def test_isolation_a_host_cannot_read_another_hosts_prefix(fleet):
    from certrelay.fleet import store

    fleet.renew()
    mail = store.Store([fleet.etcd.endpoint], fleet.etcd.ca_file, "certrelay-host-mail", "mail-secret")
    assert mail.range("/certrelay/v1/hosts/mail/")[1]
    with pytest.raises(store.Denied):
        mail.range("/certrelay/v1/hosts/web/")
    with pytest.raises(store.Denied):
        mail.put("/certrelay/v1/hosts/mail/lineages/other", b"forged")
    checked = fleet.hosts["mail"].run(command="check")
    assert checked.returncode == 0, checked.stderr
    assert "other hosts' values are refused" in checked.stderr


def test_a_host_added_later_gets_the_current_certificate_without_a_renewal(fleet):
    fingerprint = fleet.renew()
    # The admin re-keys web (its key was lost): the next run of the certbot host seals
    # for the new key, with no renewal and no notification.
    web = fleet.hosts["web"]
    identity = os.path.join(fleet.root, "keys", "web.key")
    os.unlink(identity)
    made = fleet_command(web, "keygen", "--key", identity)
    rules = open(fleet.publisher.rules_path, encoding="utf-8").read()
    old = rules.split('name = "web"\nrecipient = "')[1].split('"')[0]
    fleet.publisher.write_rules(rules.replace(old, quoted(made.stdout, "recipient")))
    assert fleet.publisher.run().returncode == 0
    assert subscribe_once(web).returncode == 0
    assert live_fingerprint(web) == fingerprint


def test_a_value_sealed_for_another_host_is_refused(fleet):
    from certrelay.fleet import store

    fleet.renew()
    publisher = store.Store([fleet.etcd.endpoint], fleet.etcd.ca_file, "certrelay-publisher", "publisher-secret")
    web_value = publisher.get(f"/certrelay/v1/hosts/web/lineages/{NAME}").value
    publisher.put(f"/certrelay/v1/hosts/mail/lineages/{NAME}", web_value)
    refused = subscribe_once(fleet.hosts["mail"])
    assert refused.returncode == 1
    assert "refused" in refused.stderr and "sealed to another recipient key" in refused.stderr
    assert not os.path.exists(os.path.join(fleet.hosts["mail"].config_dir, "live", NAME))


def test_a_subscriber_outlives_etcd_killed_mid_watch(fleet):
    mail = fleet.hosts["mail"]
    fleet.renew()
    daemon = mail.start(command="subscribe")
    wait.until(lambda: mail.entries("queue") == [NAME], what="the first notification")
    fleet.etcd.kill()
    fleet.etcd.restart()
    newest = fleet.renew()
    wait.until(lambda: live_fingerprint(mail) == newest, timeout=120, what="the renewal after etcd's restart",
               explain=lambda: daemon.poll())
    assert daemon.poll() is None


@pytest.fixture
def link():
    """A network namespace joined to this one by a veth pair: (namespace, the host
    side's interface, its address, the address inside). Removed at the end."""
    if os.geteuid() != 0 or not os.path.exists("/usr/sbin/ip"):
        pytest.skip("needs root and iproute2 (network namespaces)")
    namespace, outside = f"crfleet{os.getpid()}", f"crf{os.getpid()}"
    inside = outside + "n"
    commands = [
        ["ip", "netns", "add", namespace],
        ["ip", "link", "add", outside, "type", "veth", "peer", "name", inside],
        ["ip", "link", "set", inside, "netns", namespace],
        ["ip", "addr", "add", "10.250.7.1/30", "dev", outside],
        ["ip", "link", "set", outside, "up"],
        ["ip", "netns", "exec", namespace, "ip", "addr", "add", "10.250.7.2/30", "dev", inside],
        ["ip", "netns", "exec", namespace, "ip", "link", "set", inside, "up"],
        ["ip", "netns", "exec", namespace, "ip", "link", "set", "lo", "up"],
    ]
    try:
        for command in commands:
            subprocess.run(command, check=True, capture_output=True)
        yield namespace, outside, "10.250.7.1"
    finally:
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)  # takes both ends with it


def test_a_partitioned_host_keeps_serving_alarms_after_its_setting_and_converges(tmp_path, link):
    namespace, interface, address = link
    with etcd_module.Etcd(tmp_path / "etcd", addresses=(address,)) as etcd:
        fleet = Fleet(tmp_path, etcd, ack_timeout="3s", endpoints={"mail": etcd.endpoint_on(address)})
        mail, web = fleet.hosts["mail"], fleet.hosts["web"]
        try:
            first = fleet.renew()
            web.start(command="subscribe")  # web reaches etcd on loopback, never cut off
            # mail's subscriber reaches etcd only through the veth.
            daemon = subprocess.Popen(["ip", "netns", "exec", namespace, *mail.command("subscribe")],
                                      env=mail.environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True)
            mail.processes.append(daemon)
            wait.until(lambda: mail.entries("queue") == [NAME], what="mail's first notification")
            assert mail.run().returncode == 0
            wait.until(lambda: fleet.status()["mail", NAME]["state"] == "current", what="mail's acknowledgement")
            subprocess.run(["ip", "link", "set", interface, "down"], check=True)
            newest = fleet.renew()
            wait.until(lambda: live_fingerprint(web) == newest, what="web to get the newest")
            wait.until(lambda: web.entries("queue") == [NAME], what="web's notification")
            assert web.run().returncode == 0
            wait.until(lambda: fleet.status()["web", NAME]["state"] == "current", what="web current",
                       explain=fleet.status)
            # Cut off, mail keeps serving what it has; past ack-timeout the certbot host says so.
            said = {}

            def alarmed():
                said["run"] = fleet.publisher.run()
                return said["run"].returncode == 1 and "mail has not acknowledged serving" in said["run"].stderr

            wait.until(alarmed, what="the alarm for mail", explain=lambda: said)
            assert live_fingerprint(mail) == first
            rows = fleet.status()
            assert rows["mail", NAME]["state"] == "late"
            assert "web has not" not in said["run"].stderr
            subprocess.run(["ip", "link", "set", interface, "up"], check=True)
            wait.until(lambda: live_fingerprint(mail) == newest, timeout=180, what="mail to converge")
            wait.until(lambda: mail.entries("queue") == [NAME], what="mail's notification of the newest")
            assert mail.run().returncode == 0
            wait.until(lambda: fleet.status()["mail", NAME]["state"] == "current", what="mail current again")
        finally:
            for relay in (fleet.publisher, *fleet.hosts.values()):
                relay.stop()


def test_metrics_say_which_host_serves_what_was_published(fleet):
    metrics = os.path.join(fleet.root, "certrelay.prom")
    rules = open(fleet.publisher.rules_path, encoding="utf-8").read()
    fleet.publisher.write_rules(rules.replace("[settings]\n", f'[settings]\nmetrics = "{metrics}"\n'))
    fleet.renew()
    mail = fleet.hosts["mail"]
    assert subscribe_once(mail).returncode == 0
    assert mail.run().returncode == 0
    assert subscribe_once(mail).returncode == 0  # acknowledges what its certrelay did
    fleet.publisher.run()
    text = open(metrics, encoding="utf-8").read()
    assert f'certrelay_fleet_served_current{{host="mail",name="{NAME}"}} 1' in text
    assert f'certrelay_fleet_served_current{{host="web",name="{NAME}"}} 0' in text
    assert f'certrelay_fleet_published_timestamp_seconds{{host="proxy",name="{NAME}"}}' in text


def test_the_same_certificate_published_again_acts_on_nothing(fleet):
    fleet.renew()
    mail = fleet.hosts["mail"]
    assert subscribe_once(mail).returncode == 0
    assert mail.run().returncode == 0
    # The certbot host lost its state: its next run publishes everything again, anew.
    os.unlink(os.path.join(fleet.publisher.state_dir, "fleet.json"))
    again = fleet.publisher.run()
    assert again.returncode == 0 and "it lacked them" in again.stderr, again.stderr
    assert subscribe_once(mail).returncode == 0
    assert mail.entries("queue") == []
    assert mail.run().returncode == 0
    assert mail.calls() == ["restart dovecot.service"]


def test_the_acknowledgement_says_what_failed_on_the_host(fleet):
    fleet.renew()
    mail, web = fleet.hosts["mail"], fleet.hosts["web"]
    mail.behave("fail", "dovecot.service")
    web.write_rules(open(web.rules_path, encoding="utf-8").read().replace(f'match = ["{NAME}"]', 'match = ["other"]'))
    for relay in (mail, web):
        assert subscribe_once(relay).returncode == 0
        assert relay.run().returncode in (0, 1)
        assert subscribe_once(relay).returncode == 0
    rows = fleet.status()
    assert rows["mail", NAME]["state"] == "failed" and "restart dovecot.service" in rows["mail", NAME]["reason"]
    assert rows["web", NAME]["state"] == "failed" and "[[rule]]" in rows["web", NAME]["reason"]
    os.unlink(os.path.join(mail.bin, "fail", "dovecot.service"))
    assert mail.run().returncode == 0
    assert subscribe_once(mail).returncode == 0
    assert fleet.status()["mail", NAME]["state"] == "current"


def test_while_the_hosts_batch_runs_the_acknowledgement_waits_for_it(fleet):
    # A batch deletes the notification before it saves its ledger, under its lock: a
    # subscriber looking in between must not call the certificate failed.
    import fcntl

    fleet.renew()
    mail = fleet.hosts["mail"]
    assert subscribe_once(mail).returncode == 0
    os.makedirs(mail.state_dir, exist_ok=True)
    lock = os.open(os.path.join(mail.state_dir, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as state.locked: a batch under way
        os.unlink(os.path.join(mail.spool, "queue", NAME))  # it took the notification
        assert subscribe_once(mail).returncode == 0
        assert fleet.status()["mail", NAME]["state"] == "pending"
    finally:
        os.close(lock)
    assert subscribe_once(mail).returncode == 0  # that batch ended and acted on nothing
    row = fleet.status()["mail", NAME]
    assert row["state"] == "failed" and "did not act on it" in row["reason"]
