"""Unit tests for certrelay.plan.make_plan: notifications + rules -> actions, needs, unmatched."""

import pytest

from certrelay import plan
from certrelay import rules
from certrelay import spool
from tests.writeup import WRITE_UP_CERTIFICATES, WRITE_UP_RULES

CONFIG_DIR = "/srv/certbot/etc"

EXAMPLE = WRITE_UP_RULES


def notification(name, domains=None, entry=None):
    """Return the notification for lineage `name` (by default for `name *.name`)."""
    return spool.Notification(
        entry=entry or f"{name}@1",
        name=name,
        lineage=f"/etc/letsencrypt/live/{name}",  # the container's path: never used on the host
        domains=(name, f"*.{name}") if domains is None else tuple(domains),
        time="2024-05-01T03:04:05+00:00",
    )


def parse(text):
    return rules.parse(text.encode(), "rules.toml")


def make_plan(notifications, text=EXAMPLE, done=None):
    return plan.make_plan(notifications, parse(text), CONFIG_DIR, done)


ECHO = '[[rule]]\nmatch = ["*"]\nrun = [["/bin/echo", "{name}"]]\n'


def summary(result):
    """Return the plan's actions as (verb, target, certificates) tuples, in order."""
    return [(action.verb, action.target, action.certificates) for action in result.actions]


# --- units ----------------------------------------------------------------------------


def test_write_up_certificates_give_three_actions():
    notifications = [notification(name) for name in WRITE_UP_CERTIFICATES]

    result = make_plan(notifications)

    assert summary(result) == [
        ("restart", "dovecot.service", ("herzbube.ch",)),
        ("restart", "exim4.service", ("herzbube.ch",)),
        ("reload", "apache2.service", tuple(sorted(WRITE_UP_CERTIFICATES))),
    ]
    assert result.unmatched == []


def test_write_up_needs_name_the_actions_of_each_certificate():
    notifications = [notification(name) for name in WRITE_UP_CERTIFICATES]

    result = make_plan(notifications)

    assert result.needs == {
        "herzbube.ch@1": {"unit:dovecot.service", "unit:exim4.service", "unit:apache2.service"},
        "moser-naef.ch@1": {"unit:apache2.service"},
        "francescamoser.ch@1": {"unit:apache2.service"},
        "francescamoser.ch-0001@1": {"unit:apache2.service"},
        "grunzwanzling.ch@1": {"unit:apache2.service"},
    }
    assert {action.key for action in result.actions} == set().union(*result.needs.values())


@pytest.mark.parametrize(
    "names",
    [WRITE_UP_CERTIFICATES, WRITE_UP_CERTIFICATES[::-1], ("moser-naef.ch", "herzbube.ch")],
    ids=["write-up-order", "reversed", "herzbube-second"],
)
def test_unit_actions_follow_the_rules_file_order_whatever_the_notification_order(names):
    result = make_plan([notification(name) for name in names])

    assert [action.target for action in result.actions] == [
        "dovecot.service", "exim4.service", "apache2.service",
    ]


@pytest.mark.parametrize(
    "verbs, strongest",
    [
        (("reload", "restart"), "restart"),
        (("restart", "reload"), "restart"),
        (("reload", "reload-or-restart"), "reload-or-restart"),
        (("reload-or-restart", "reload"), "reload-or-restart"),
        (("reload-or-restart", "restart"), "restart"),
        (("restart", "reload-or-restart"), "restart"),
        (("reload", "reload-or-restart", "restart"), "restart"),
        (("restart", "reload-or-restart", "reload"), "restart"),
        (("reload", "reload"), "reload"),
    ],
)
def test_unit_named_by_several_rules_gets_the_strongest_action_once(verbs, strongest):
    text = "".join(f'[[rule]]\nmatch = ["*"]\n{verb} = ["apache2"]\n\n' for verb in verbs)

    result = make_plan([notification("herzbube.ch")], text)

    assert summary(result) == [(strongest, "apache2.service", ("herzbube.ch",))]
    assert result.needs == {"herzbube.ch@1": {"unit:apache2.service"}}


def test_unit_named_with_and_without_suffix_is_one_unit():
    text = """\
[[rule]]
match = ["*"]
reload = ["apache2"]

[[rule]]
match = ["herzbube.ch"]
restart = ["apache2.service"]
"""
    result = make_plan([notification("herzbube.ch"), notification("moser-naef.ch")], text)

    assert summary(result) == [("restart", "apache2.service", ("herzbube.ch", "moser-naef.ch"))]


def test_unit_named_twice_in_one_rule_gets_the_strongest_action():
    text = '[[rule]]\nmatch = ["*"]\nreload = ["apache2"]\nrestart = ["apache2"]\n'

    assert summary(make_plan([notification("herzbube.ch")], text)) == [
        ("restart", "apache2.service", ("herzbube.ch",)),
    ]


def test_restart_for_one_certificate_wins_over_reload_for_another():
    text = """\
[[rule]]
match = ["moser-naef.ch"]
reload = ["apache2"]

[[rule]]
domains = ["mail.herzbube.ch"]
restart = ["apache2"]
"""
    result = make_plan([notification("moser-naef.ch"), notification("herzbube.ch")], text)

    assert summary(result) == [("restart", "apache2.service", ("herzbube.ch", "moser-naef.ch"))]
    assert result.needs == {
        "moser-naef.ch@1": {"unit:apache2.service"},
        "herzbube.ch@1": {"unit:apache2.service"},
    }


def test_notification_no_rule_selects_is_listed_as_unmatched():
    text = '[[rule]]\nmatch = ["herzbube.ch"]\nrestart = ["dovecot"]\n'
    other = notification("moser-naef.ch")

    result = make_plan([other, notification("herzbube.ch"), notification("grunzwanzling.ch")], text)

    assert [item.name for item in result.unmatched] == ["moser-naef.ch", "grunzwanzling.ch"]
    assert result.unmatched[0] is other
    assert result.needs == {"herzbube.ch@1": {"unit:dovecot.service"}}
    assert summary(result) == [("restart", "dovecot.service", ("herzbube.ch",))]


def test_no_notifications_give_an_empty_plan():
    result = make_plan([])

    assert (result.actions, result.needs, result.unmatched) == ([], {}, [])


def test_action_describes_itself_with_its_certificates():
    result = make_plan([notification("herzbube.ch"), notification("moser-naef.ch")])

    assert [action.describe() for action in result.actions] == [
        "restart dovecot.service (herzbube.ch)",
        "restart exim4.service (herzbube.ch)",
        "reload apache2.service (herzbube.ch, moser-naef.ch)",
    ]


def test_run_action_describes_its_argv():
    result = make_plan([notification("herzbube.ch")], ECHO)

    assert [action.describe() for action in result.actions] == ["run /bin/echo herzbube.ch (herzbube.ch)"]


# --- run commands ---------------------------------------------------------------------

DEPLOY = """\
[[rule]]
match = ["*"]
run = [["/usr/local/bin/deploy", "{name}", "--lineage={lineage}", "{domains}", "{{name}}"]]
"""


def test_run_placeholders_are_filled_in_per_certificate():
    notifications = [notification("herzbube.ch"), notification("moser-naef.ch", ["moser-naef.ch"])]

    result = make_plan(notifications, DEPLOY)

    assert summary(result) == [
        (
            "run",
            (
                "/usr/local/bin/deploy", "herzbube.ch", "--lineage=/srv/certbot/etc/live/herzbube.ch",
                "herzbube.ch *.herzbube.ch", "{name}",
            ),
            ("herzbube.ch",),
        ),
        (
            "run",
            (
                "/usr/local/bin/deploy", "moser-naef.ch", "--lineage=/srv/certbot/etc/live/moser-naef.ch",
                "moser-naef.ch", "{name}",
            ),
            ("moser-naef.ch",),
        ),
    ]


def test_run_needs_are_keyed_by_the_filled_in_argv():
    result = make_plan([notification("herzbube.ch")], ECHO)

    (action,) = result.actions
    assert action.key == plan.action_key("run", ("/bin/echo", "herzbube.ch"))
    assert result.needs == {"herzbube.ch@1": {action.key}}


def test_identical_run_commands_run_once_for_all_their_certificates():
    text = """\
[[rule]]
match = ["*"]
run = [["/usr/local/bin/refresh-bundle", "--all"]]

[[rule]]
match = ["herzbube.ch"]
run = [["/usr/local/bin/refresh-bundle", "--all"], ["/usr/local/bin/mail-ok", "{name}"]]
"""
    result = make_plan([notification("moser-naef.ch"), notification("herzbube.ch")], text)

    assert summary(result) == [
        ("run", ("/usr/local/bin/refresh-bundle", "--all"), ("herzbube.ch", "moser-naef.ch")),
        ("run", ("/usr/local/bin/mail-ok", "herzbube.ch"), ("herzbube.ch",)),
    ]
    refresh = plan.action_key("run", ("/usr/local/bin/refresh-bundle", "--all"))
    assert result.needs["moser-naef.ch@1"] == {refresh}
    mail_ok = plan.action_key("run", ("/usr/local/bin/mail-ok", "herzbube.ch"))
    assert result.needs["herzbube.ch@1"] == {refresh, mail_ok}


@pytest.mark.parametrize(
    "domains",
    [
        ("evil.ch --really-do-it",),
        ("evil.ch", "--really-do-it", "; rm -rf /"),
        ("$(touch /tmp/x)", "`id`", "a\tb", "*"),
    ],
)
def test_run_argument_stays_one_argument_whatever_the_domains(domains):
    result = make_plan([notification("evil.ch", domains)], DEPLOY)

    (action,) = result.actions
    assert len(action.target) == 5
    assert action.target[3] == " ".join(domains)


def test_run_arguments_that_look_like_placeholders_are_not_filled_in_twice():
    result = make_plan([notification("{lineage}", ["{name}"])], DEPLOY)

    (action,) = result.actions
    assert action.target[1] == "{lineage}"
    assert action.target[3] == "{name}"


def test_run_actions_come_before_unit_actions():
    text = """\
[[rule]]
match = ["*"]
restart = ["dovecot"]
reload = ["apache2"]
run = [["/usr/local/bin/deploy", "{name}"]]
"""
    result = make_plan([notification("herzbube.ch"), notification("moser-naef.ch")], text)

    assert [action.verb for action in result.actions[:2]] == ["run", "run"]
    assert sorted((action.verb, action.target) for action in result.actions[2:]) == [
        ("reload", "apache2.service"), ("restart", "dovecot.service"),
    ]
    assert [action.target for action in result.actions[:2]] == [
        ("/usr/local/bin/deploy", "herzbube.ch"),
        ("/usr/local/bin/deploy", "moser-naef.ch"),
    ]


# --- done -----------------------------------------------------------------------------


def test_done_skips_an_action_for_that_entry_only():
    notifications = [notification("herzbube.ch"), notification("moser-naef.ch")]

    done = {"herzbube.ch@1": {"unit:apache2.service", "unit:dovecot.service"}}

    result = make_plan(notifications, done=done)

    assert summary(result) == [
        ("restart", "exim4.service", ("herzbube.ch",)),
        ("reload", "apache2.service", ("moser-naef.ch",)),
    ]
    assert result.needs == {
        "herzbube.ch@1": {"unit:exim4.service"},
        "moser-naef.ch@1": {"unit:apache2.service"},
    }


def test_done_is_per_entry_not_per_certificate_name():
    notifications = [notification("herzbube.ch", entry=f"herzbube.ch@{claim}") for claim in (1, 2)]
    every_unit = {"unit:dovecot.service", "unit:exim4.service", "unit:apache2.service"}

    result = make_plan(notifications, done={"herzbube.ch@1": every_unit})

    assert result.needs == {"herzbube.ch@1": set(), "herzbube.ch@2": every_unit}
    assert [action.target for action in result.actions] == [
        "dovecot.service", "exim4.service", "apache2.service",
    ]


def test_done_for_every_entry_leaves_nothing_to_do_but_keeps_the_entries():
    notifications = [notification("moser-naef.ch"), notification("grunzwanzling.ch")]
    done = {entry: {"unit:apache2.service"} for entry in ("moser-naef.ch@1", "grunzwanzling.ch@1")}

    result = make_plan(notifications, done=done)

    assert result.actions == []
    assert result.needs == {"moser-naef.ch@1": set(), "grunzwanzling.ch@1": set()}
    assert result.unmatched == []


def test_done_skips_a_run_command_by_its_filled_in_argv():
    text = '[[rule]]\nmatch = ["*"]\nrun = [["/bin/echo", "{name}"], ["/bin/true"]]\n'
    done = {"herzbube.ch@1": {plan.action_key("run", ("/bin/echo", "herzbube.ch"))}}

    result = make_plan([notification("herzbube.ch"), notification("moser-naef.ch")], text, done)

    assert sorted(summary(result)) == [
        ("run", ("/bin/echo", "moser-naef.ch"), ("moser-naef.ch",)),
        ("run", ("/bin/true",), ("herzbube.ch", "moser-naef.ch")),
    ]


def test_done_restart_does_not_lower_another_entrys_action():
    text = """\
[[rule]]
match = ["herzbube.ch"]
restart = ["apache2"]

[[rule]]
match = ["*"]
reload = ["apache2"]
"""
    done = {"herzbube.ch@1": {"unit:apache2.service"}}

    result = make_plan([notification("herzbube.ch"), notification("moser-naef.ch")], text, done)

    assert summary(result) == [("reload", "apache2.service", ("moser-naef.ch",))]


def test_action_description_names_at_most_ten_certificates():
    names = tuple(f"c{index:02}.ch" for index in range(25))

    described = plan.Action("reload", "apache2.service", names).describe()

    assert described == "reload apache2.service (c00.ch, c01.ch, c02.ch, c03.ch, c04.ch, c05.ch, c06.ch, c07.ch, c08.ch, c09.ch and 15 more)"


def test_installs_then_commands_then_prechecks_then_units_each_unit_requiring_what_guards_it():
    text = (
        '[[rule]]\nmatch = ["herzbube.ch"]\nreload = ["haproxy"]\nrestart = ["dovecot"]\n'
        'precheck = [["/usr/sbin/haproxy", "-c"]]\nrun = [["/usr/local/bin/prepare", "{name}"]]\n'
        '  [[rule.install]]\n  dest = "/etc/haproxy/certs/{name}.pem"\n  content = ["fullchain", "privkey"]\n'
        '  group = "root"\n  mode = "0640"\n'
        '\n[[rule]]\nmatch = ["*"]\nreload = ["apache2"]\n'
    )

    result = make_plan([notification("herzbube.ch")], text)

    assert [(action.verb, action.target) for action in result.actions] == [
        ("install", "/etc/haproxy/certs/herzbube.ch.pem"),
        ("run", ("/usr/local/bin/prepare", "herzbube.ch")),
        ("precheck", ("/usr/sbin/haproxy", "-c")),
        ("reload", "haproxy.service"), ("restart", "dovecot.service"), ("reload", "apache2.service"),
    ]
    guards = {"install:/etc/haproxy/certs/herzbube.ch.pem", 'precheck:["/usr/sbin/haproxy", "-c"]'}
    requires = {action.target: action.requires for action in result.actions}
    assert requires["haproxy.service"] == requires["dovecot.service"] == guards
    assert requires["apache2.service"] == frozenset()  # another rule's unit: not held back
    assert requires[("/usr/local/bin/prepare", "herzbube.ch")] == {"install:/etc/haproxy/certs/herzbube.ch.pem"}
