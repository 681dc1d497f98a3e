"""Pins for certrelay.plan that mutation testing (make mutants, docs/mutants.md) found
missing: how install and precheck actions describe themselves, the boundary of the
names a description shows, and what a command shared by two rules requires."""

from certrelay import install, plan, rules, spool

CONFIG_DIR = "/srv/certbot/etc"


def notification(name):
    return spool.Notification(entry=f"{name}@1", name=name, lineage=f"/etc/letsencrypt/live/{name}",
                              domains=(name,), time="2024-05-01T03:04:05+00:00")


def test_an_install_describes_itself_with_its_first_certificate():
    spec = install.Install(line=1, dest="/etc/haproxy/{name}.pem", content=("fullchain", "privkey"), mode=0o640)
    values = {"name": "a.ch", "lineage": f"{CONFIG_DIR}/live/a.ch", "domains": "a.ch"}

    action = plan.Action("install", "/etc/haproxy/a.ch.pem", ("a.ch", "b.ch"), payload=(spec, "a.ch", values))

    assert action.describe() == "install fullchain+privkey to /etc/haproxy/a.ch.pem (mode 0640) (a.ch)"


def test_a_precheck_describes_its_argv():
    action = plan.Action("precheck", ("/usr/sbin/nginx", "-t"), ("a.ch",))

    assert action.describe() == "precheck /usr/sbin/nginx -t (a.ch)"


def test_a_description_shows_ten_names_in_full():
    names = tuple(f"c{index}.ch" for index in range(plan.NAMES_SHOWN))

    assert plan.Action("reload", "apache2.service", names).describe() == f"reload apache2.service ({', '.join(names)})"


def test_a_command_two_rules_share_requires_the_installs_of_both():
    text = (
        '[[rule]]\nmatch = ["*"]\nrun = [["/usr/local/bin/deploy"]]\n'
        '  [[rule.install]]\n  dest = "/etc/one/{name}.pem"\n  content = ["cert"]\n'
        '\n[[rule]]\nmatch = ["*"]\nrun = [["/usr/local/bin/deploy"]]\n'
        '  [[rule.install]]\n  dest = "/etc/two/{name}.pem"\n  content = ["cert"]\n'
    )

    result = plan.make_plan([notification("a.ch")], rules.parse(text.encode(), "rules.toml"), CONFIG_DIR)

    [command] = [action for action in result.actions if action.verb == "run"]
    assert command.requires == {"install:/etc/one/a.ch.pem", "install:/etc/two/a.ch.pem"}


def test_installs_and_prechecks_name_their_certificates_and_keep_what_they_need():
    text = (
        '[[rule]]\nmatch = ["*"]\nreload = ["haproxy"]\nprecheck = [["/usr/sbin/haproxy", "-c", "{name}"]]\n'
        '  [[rule.install]]\n  dest = "/etc/haproxy/{name}.pem"\n  content = ["fullchain", "privkey"]\n'
    )
    parsed = rules.parse(text.encode(), "rules.toml")

    result = plan.make_plan([notification("a.ch")], parsed, CONFIG_DIR, {"a.ch@1": ["unit:haproxy.service"]})

    installed, checked = result.actions
    assert (installed.verb, installed.target, installed.certificates) == ("install", "/etc/haproxy/a.ch.pem", ("a.ch",))
    assert installed.payload == (parsed.rules[0].install[0], "a.ch",
                                 {"name": "a.ch", "lineage": f"{CONFIG_DIR}/live/a.ch", "domains": "a.ch"})
    assert installed.describe() == "install fullchain+privkey to /etc/haproxy/a.ch.pem (a.ch)"
    assert (checked.verb, checked.target, checked.certificates) == ("precheck", ("/usr/sbin/haproxy", "-c", "a.ch"),
                                                                     ("a.ch",))
    assert checked.requires == {"install:/etc/haproxy/a.ch.pem"}
    assert result.needs == {"a.ch@1": {"install:/etc/haproxy/a.ch.pem", 'precheck:["/usr/sbin/haproxy", "-c", "a.ch"]'}}


def test_an_install_done_in_an_earlier_run_is_not_done_again():
    text = '[[rule]]\nmatch = ["*"]\nreload = ["haproxy"]\n  [[rule.install]]\n  dest = "/etc/h/{name}.pem"\n  content = ["cert"]\n'

    result = plan.make_plan([notification("a.ch")], rules.parse(text.encode(), "rules.toml"), CONFIG_DIR,
                            {"a.ch@1": ["install:/etc/h/a.ch.pem"]})

    assert [(action.verb, action.requires) for action in result.actions] == [("reload", {"install:/etc/h/a.ch.pem"})]


VERIFIED = (
    '[[rule]]\nmatch = ["*"]\nreload = ["apache2"]\nverify = ["https://127.0.0.1:8443"]\n'
    '\n[[rule]]\nmatch = ["a.ch"]\nrestart = ["exim4"]\nescalate = false\nverify = ["smtp://127.0.0.1:25?sni=mx.a.ch"]\n'
)


def test_each_endpoint_of_a_selecting_rule_is_a_check_of_the_notification():
    parsed = rules.parse(VERIFIED.encode(), "rules.toml")
    first, second = parsed.rules
    a_ch = spool.Notification(entry="a.ch@1", name="a.ch", lineage="", domains=("*.a.ch", "a.ch"), time="")

    result = plan.make_plan([a_ch], parsed, CONFIG_DIR)

    assert result.checks == {"a.ch@1": [
        plan.Check("a.ch", first.verify[0], "certrelay-probe.a.ch", (("reload", "apache2.service"),), True,
                   frozenset({"unit:apache2.service"})),
        plan.Check("a.ch", second.verify[0], "mx.a.ch", (("restart", "exim4.service"),), False,
                   frozenset({"unit:exim4.service"})),
    ]}
    assert result.needs == {"a.ch@1": {"unit:apache2.service", "unit:exim4.service",
                                       "verify:https://127.0.0.1:8443#certrelay-probe.a.ch", "verify:smtp://127.0.0.1:25?sni=mx.a.ch#mx.a.ch"}}


def test_a_check_done_in_an_earlier_run_is_not_done_again():
    parsed = rules.parse(VERIFIED.encode(), "rules.toml")
    done = {"a.ch@1": ["unit:apache2.service", "verify:https://127.0.0.1:8443#a.ch"]}

    result = plan.make_plan([notification("a.ch")], parsed, CONFIG_DIR, done)

    assert [check.endpoint.url for check in result.checks["a.ch@1"]] == ["smtp://127.0.0.1:25?sni=mx.a.ch"]
    assert result.needs["a.ch@1"] == {"unit:exim4.service", "verify:smtp://127.0.0.1:25?sni=mx.a.ch#mx.a.ch"}


def test_a_unit_two_rules_name_requires_the_prechecks_of_both():
    text = (
        '[[rule]]\nmatch = ["*"]\nreload = ["haproxy"]\nprecheck = [["/usr/sbin/haproxy", "-c"]]\n'
        '\n[[rule]]\nmatch = ["*"]\nreload = ["haproxy"]\nprecheck = [["/usr/local/bin/check"]]\n'
        '\n[[rule]]\nmatch = ["*"]\nreload = ["haproxy"]\n'
    )

    result = plan.make_plan([notification("a.ch")], rules.parse(text.encode(), "rules.toml"), CONFIG_DIR)

    assert result.actions[-1].target == "haproxy.service"
    assert result.actions[-1].requires == {'precheck:["/usr/sbin/haproxy", "-c"]', 'precheck:["/usr/local/bin/check"]'}


def test_installs_come_first_even_from_a_later_rule():
    text = (
        '[[rule]]\nmatch = ["*"]\nrestart = ["nginx"]\nrun = [["/usr/local/bin/deploy"]]\nprecheck = [["/bin/true"]]\n'
        '\n[[rule]]\nmatch = ["*"]\nreload = ["haproxy"]\n'
        '  [[rule.install]]\n  dest = "/etc/h/{name}.pem"\n  content = ["cert"]\n'
    )

    result = plan.make_plan([notification("a.ch")], rules.parse(text.encode(), "rules.toml"), CONFIG_DIR)

    assert [action.verb for action in result.actions] == ["install", "run", "precheck", "restart", "reload"]
