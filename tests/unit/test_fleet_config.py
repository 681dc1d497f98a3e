"""The rules file's [fleet], [[fleet.host]] and [subscribe] tables: what they become,
and each mistake reported at its FILE:LINE with what to write instead."""

import pytest

from certrelay import rules

seal = pytest.importorskip("certrelay.fleet.seal", reason="the fleet needs PyNaCl: apt-get install python3-nacl")

RECIPIENT = seal.new_identity()[1]
PUBLISHER = seal.new_signing_key()[1]

FLEET = f'''[fleet]
endpoints = ["https://etcd1.example.net:2379"]
ca-file = "/etc/certrelay/fleet/ca.pem"
user = "certrelay-publisher"
password-file = "/etc/certrelay/fleet/etcd.password"
signing-key = "/etc/certrelay/fleet/publisher.key"
ack-timeout = "2h"

[[fleet.host]]
name = "mail"
recipient = "{RECIPIENT}"
match = ["herzbube.ch"]

[[fleet.host]]
name = "web"
recipient = "{RECIPIENT}"
domains = ["*.example.ch"]
'''

SUBSCRIBE = f'''[[rule]]
match = ["herzbube.ch"]
restart = ["dovecot"]

[subscribe]
endpoints = ["https://etcd1.example.net:2379"]
ca-file = "/etc/certrelay/fleet/ca.pem"
host = "mail"
user = "certrelay-host-mail"
password-file = "/etc/certrelay/fleet/etcd.password"
identity = "/etc/certrelay/fleet/host.key"
publisher = "{PUBLISHER}"
'''


def problems(text, config_dir=None):
    with pytest.raises(rules.RulesError) as raised:
        rules.parse(text.encode(), "r.toml", config_dir)
    return raised.value.problems


def test_a_fleet_needs_no_rule_and_selects_as_rules_do():
    parsed = rules.parse(FLEET.encode(), "r.toml")
    assert parsed.rules == ()
    assert parsed.fleet.ack_timeout == 7200
    assert parsed.fleet.selecting("herzbube.ch", ()) == ("mail",)
    assert parsed.fleet.selecting("other", ("www.example.ch",)) == ("web",)
    assert parsed.selects("other", ("www.example.ch",)) and not parsed.selects("other", ("example.org",))
    assert parsed.fleet.connection.endpoints == ("https://etcd1.example.net:2379",)


def test_subscribe_beside_ordinary_rules():
    parsed = rules.parse(SUBSCRIBE.encode(), "r.toml")
    assert parsed.subscribe.host == "mail" and parsed.subscribe.resync_interval == 3600
    assert parsed.subscribe.identity == "/etc/certrelay/fleet/host.key"


@pytest.mark.parametrize("old, new, line, words", [
    ('"https://etcd1.example.net:2379"]\nca', '"http://etcd1.example.net:2379"]\nca', 2, "plain http"),
    ('signing-key = "/etc/certrelay/fleet/publisher.key"\n', "", 1, "needs signing-key"),
    ('ack-timeout = "2h"', 'ack-timeout = "soon"', 7, "ack-timeout"),
    ('name = "web"', 'name = "Web/1"', 15, "name must be like"),
    ('name = "web"', 'name = "mail"', 14, "also on line 9"),
    (f'domains = ["*.example.ch"]', 'colour = "red"', 17, "unknown key 'colour'"),
    (f'name = "web"\nrecipient = "{RECIPIENT}"', f'name = "web"\nrecipient = "{PUBLISHER}"', 16,
     "publisher key"),
    ('user = "certrelay-publisher"\npassword-file = "/etc/certrelay/fleet/etcd.password"\n',
     'user = "certrelay-publisher"\n', 1, "needs password-file"),
])
def test_fleet_mistakes_are_reported_at_their_line(old, new, line, words):
    assert old in FLEET
    found = problems(FLEET.replace(old, new, 1))
    assert any(problem.startswith(f"r.toml:{line}:") and words in problem for problem in found), found


def test_keys_inside_the_certbot_config_dir_are_refused():
    found = problems(SUBSCRIBE.replace('"/etc/certrelay/fleet/host.key"', '"/etc/letsencrypt/host.key"'),
                     "/etc/letsencrypt")
    assert any(problem.startswith("r.toml:11:") and "container can write" in problem for problem in found), found


def test_subscribe_needs_its_host_and_a_publisher_key():
    found = problems(SUBSCRIBE.replace('host = "mail"\n', "").replace(PUBLISHER, RECIPIENT))
    assert any(problem.startswith("r.toml:5:") and "needs host" in problem for problem in found), found
    assert any(problem.startswith("r.toml:11:") and "[subscribe] publisher" in problem for problem in found), found


def test_once_etcd_cannot_be_reached_the_batch_asks_no_more():
    # Behind a firewall that drops packets each request waits out its timeout: a batch
    # that found etcd unreachable must not wait again for each host and the acks.
    from certrelay.fleet import publish, store

    class Unreachable:
        calls = 0

        def range(self, *arguments, **options):
            Unreachable.calls += 1
            raise store.StoreError("https://etcd1.example.net:2379: timed out")

    publisher = publish.Publisher(rules.parse(FLEET.encode(), "r.toml").fleet, "/nonexistent", "/nonexistent")
    publisher._store = Unreachable()
    for _ in range(3):
        with pytest.raises(store.StoreError, match="timed out"):
            publisher.acknowledgements()
    assert Unreachable.calls == 1
    assert [problem.subject for problem in publisher.problems(0)] == ["fleet store unreachable"]


def test_keygen_works_beside_the_packaged_rules_file_that_has_no_rule_yet(tmp_path):
    # docs/fleet.md step 1 comes before the admin writes any rule or [subscribe]
    import os

    from click.testing import CliRunner

    from certrelay import cli

    packaged = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "etc", "rules.toml")
    key = tmp_path / "fleet" / "host.key"
    made = CliRunner().invoke(cli.main, ["fleet", "keygen", "--rules", packaged, "--config-dir", str(tmp_path),
                                         "--key", str(key)])
    assert made.exit_code == 0, made.output
    assert 'recipient = "' in made.output and oct(key.stat().st_mode & 0o777) == "0o600"
