"""Unit tests for certrelay.rules: parsing, validation with locations, permissions, matching."""

import os

import pytest

from certrelay import durations, rules
from tests.writeup import WRITE_UP_RULES

EXAMPLE = WRITE_UP_RULES
DEFAULT_SETTINGS = {
    **{key: default for key, (default, _, _) in rules.SETTINGS.items()},
    "expiry-warning": durations.Threshold(fraction=0.2), "expiry-critical": durations.Threshold(fraction=0.1),
    "metrics": None,
}


def problems_of(text, path="rules.toml"):
    """Return the problems parsing `text` reports; fail if it parses."""
    data = text if isinstance(text, bytes) else text.encode("utf-8")
    with pytest.raises(rules.RulesError) as caught:
        rules.parse(data, path)
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


def assert_single_problem(text, line, fragment):
    problems = problems_of(text)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"rules.toml:{line}: "), problems
    assert fragment in problems[0], problems


def rule_with_unit(unit, verb="restart"):
    return f'[[rule]]\nmatch = ["x"]\n{verb} = ["{unit}"]\n'


# --- parse: valid files ---------------------------------------------------------------


def test_example_rules_parse_into_two_rules_with_normalized_units():
    parsed = rules.parse(EXAMPLE.encode(), "/etc/certrelay/rules.toml")

    assert parsed.path == "/etc/certrelay/rules.toml"
    assert [rule.line for rule in parsed.rules] == [1, 5]
    assert parsed.rules[0].match == ("herzbube.ch",)
    assert parsed.rules[0].units == (("restart", "dovecot.service"), ("restart", "exim4.service"))
    assert parsed.rules[0].run == ()
    assert parsed.rules[1].match == ("*",)
    assert parsed.rules[1].units == (("reload", "apache2.service"),)
    assert parsed.settings == DEFAULT_SETTINGS


def test_rule_keeps_domains_run_and_every_verb():
    text = """\
[[rule]]
domains = ["mail.herzbube.ch", "*.moser-naef.ch"]
reload = ["apache2.service"]
reload-or-restart = ["postfix@-.service"]
restart = ["foo.socket"]
run = [["/usr/local/bin/deploy-cert", "{name}", "{lineage}", "{domains}", "{{x}}"], ["/bin/true"]]
"""
    (rule,) = rules.parse(text.encode()).rules

    assert rule.match == ()
    assert rule.domains == ("mail.herzbube.ch", "*.moser-naef.ch")
    assert rule.units == (
        ("reload", "apache2.service"),
        ("reload-or-restart", "postfix@-.service"),
        ("restart", "foo.socket"),
    )
    assert rule.run == (
        ("/usr/local/bin/deploy-cert", "{name}", "{lineage}", "{domains}", "{{x}}"),
        ("/bin/true",),
    )


@pytest.mark.parametrize(
    "unit, normalized",
    [
        ("getty@tty1.service", "getty@tty1.service"),
        ("apache2", "apache2.service"),
        ("apache2.service", "apache2.service"),
        ("foo.socket", "foo.socket"),
        ("foo.timer", "foo.timer"),
        ("php8.2-fpm", "php8.2-fpm.service"),
        ("systemd-fsck@dev-disk-by\\\\x2duuid.service", "systemd-fsck@dev-disk-by\\x2duuid.service"),
        ("a" * 247 + ".service", "a" * 247 + ".service"),  # 255 characters: the longest
    ],
)
def test_valid_unit_name_is_accepted_and_normalized(unit, normalized):
    (rule,) = rules.parse(rule_with_unit(unit).encode()).rules

    assert rule.units == (("restart", normalized),)


@pytest.mark.parametrize(
    "settings, expected",
    [
        ("timeout = 1", {"timeout": 1.0}),
        ("timeout = 3600", {"timeout": 3600.0}),
        ("timeout = 2.5", {"timeout": 2.5}),
        ("settle = 0\nmax-wait = 0", {"settle": 0.0, "max-wait": 0.0}),
        ("settle = 600\nmax-wait = 600", {"settle": 600.0, "max-wait": 600.0}),
        ("retry-min = 5\nretry-max = 5", {"retry-min": 5.0, "retry-max": 5.0}),
        ("min-interval = 86400", {"min-interval": 86400.0}),
        ('min-interval = "1d"', {"min-interval": 86400.0}),
        ('timeout = "1h"\nsettle = "30s"', {"timeout": 3600.0, "settle": 30.0}),
        ('reconcile-interval = "15min"\nverify-timeout = "1min 30s"', {"reconcile-interval": 900.0, "verify-timeout": 90.0}),
        ('expiry-warning = "20d"\nexpiry-critical = 0.05', {
            "expiry-warning": durations.Threshold(duration=20 * 86400.0),
            "expiry-critical": durations.Threshold(fraction=0.05),
        }),
        ('metrics = "/var/lib/prometheus/node-exporter/certrelay.prom"',
         {"metrics": "/var/lib/prometheus/node-exporter/certrelay.prom"}),
    ],
)
def test_settings_in_range_replace_the_defaults_as_float_seconds(settings, expected):
    parsed = rules.parse((EXAMPLE + "\n[settings]\n" + settings + "\n").encode())

    assert parsed.settings == {**DEFAULT_SETTINGS, **expected}
    assert all(type(parsed.settings[key]) is float for key in rules.SETTINGS)


# --- parse: one problem, reported at its line ------------------------------------------


@pytest.mark.parametrize(
    "text, line",
    [
        ('[[rule]]\nmatch = ["x"]\nrestart = [dovecot]\n', 3),
        ('[[rule]]\nmatch = ["x"]\nmatch = ["y"]\n', 3),
        ('[[rule]\nmatch = ["x"]\n', 1),
        ('[[rule]]\nmatch = ["x"]\nrestart = ["dovecot"\n\n\nreload = 1\n', 6),
        ('[[rule]]\nmatch = [', 2),  # at end of document
    ],
    ids=["bad-value", "duplicate-key", "bad-table-header", "unclosed-array", "end-of-document"],
)
def test_toml_syntax_error_reports_the_line_of_the_error(text, line):
    problems = problems_of(text)

    assert len(problems) == 1
    assert problems[0].startswith(f"rules.toml:{line}: TOML syntax: ")
    assert "(at " not in problems[0]  # the position is in the prefix, not repeated


@pytest.mark.parametrize(
    "data, line",
    [
        (b'[[rule]]\nmatch = ["caf\xe9"]\nrestart = ["x"]\n', 2),
        (b"\xff\xfe[\x00[\x00", 1),
        (b'# comment\n\n[[rule]]\nmatch = ["x"]\nrestart = ["\x80"]\n', 5),
    ],
)
def test_file_that_is_not_utf8_reports_the_line_of_the_first_bad_byte(data, line):
    assert_single_problem(data, line, "not UTF-8")


@pytest.mark.parametrize(
    "text, line",
    [
        ('color = "blue"\n' + EXAMPLE, 1),
        (EXAMPLE + '\n[rules]\nmatch = ["x"]\n', 9),
        (EXAMPLE + '\n[[rulez]]\nmatch = ["x"]\n', 9),
        (EXAMPLE + "\n[setting]\ntimeout = 5\n", 9),
    ],
    ids=["key", "table", "array-of-tables", "misspelt-settings"],
)
def test_unknown_top_level_key_is_reported_at_its_line(text, line):
    assert_single_problem(text, line, "unknown table or key")


def test_rule_written_as_a_single_table_is_reported_at_its_line():
    assert_single_problem('# one rule\n[rule]\nmatch = ["x"]\nrestart = ["y"]\n', 2, "[[rule]]")


@pytest.mark.parametrize(
    "text, line, key",
    [
        ('[[rule]]\nmatch = ["x"]\nrestart = ["y"]\nrestrat = ["z"]\n', 4, "restrat"),
        ('[[rule]]\nmatches = ["x"]\nmatch = ["x"]\nrestart = ["y"]\n', 2, "matches"),
        (EXAMPLE + 'unit = "nginx"\n', 8, "unit"),
        (EXAMPLE + '\n[[rule]]\nmatch = ["x"]\n\nstart = ["y"]\nrestart = ["y"]\n', 12, "start"),
    ],
    ids=["after-known-keys", "first-key", "second-rule", "third-rule"],
)
def test_unknown_key_in_rule_is_reported_at_the_line_of_that_key(text, line, key):
    assert_single_problem(text, line, f"unknown key {key!r} in [[rule]]")


@pytest.mark.parametrize("key", ["match", "domains", "restart", "reload", "reload-or-restart"])
@pytest.mark.parametrize(
    "value",
    ['"x.ch"', "[1]", '["x.ch", 2]', '[""]', '[["x.ch"]]', "true"],
    ids=["string", "number", "mixed", "empty-string", "nested-list", "bool"],
)
def test_wrong_type_is_reported_at_the_line_of_its_key(key, value):
    selector = 'domains = ["x.ch"]' if key == "match" else 'match = ["x"]'
    text = f'[[rule]]\n{selector}\nrun = [["/bin/true"]]\n{key} = {value}\n'

    assert_single_problem(text, 4, f"{key!r} must be a list of non-empty strings")


@pytest.mark.parametrize(
    "text, line",
    [
        ('[[rule]]\nrestart = ["x"]\n', 1),
        ('[[rule]]\nmatch = []\ndomains = []\nrestart = ["x"]\n', 1),
        (EXAMPLE + '\n# no selector\n[[rule]]\nreload = ["nginx"]\n', 10),
    ],
)
def test_rule_that_selects_nothing_is_reported_at_its_header(text, line):
    assert_single_problem(text, line, "rule selects nothing")


@pytest.mark.parametrize(
    "text, line",
    [
        ('[[rule]]\nmatch = ["x"]\n', 1),
        ('[[rule]]\nmatch = ["x"]\nrestart = []\nreload = []\nreload-or-restart = []\nrun = []\n', 1),
        (EXAMPLE + '\n[[rule]]\ndomains = ["x.ch"]\n', 9),
    ],
)
def test_rule_with_no_action_is_reported_at_its_header(text, line):
    assert_single_problem(text, line, "rule has no action")


@pytest.mark.parametrize(
    "unit, fragment",
    [
        ("apache*", "glob"),
        ("apache?", "glob"),
        ("apache[12]", "glob"),
        ("-foo", "not a valid systemd unit name"),
        ("--now", "not a valid systemd unit name"),
        ("foo bar", "not a valid systemd unit name"),
        ("foo@.service", "not a valid systemd unit name"),
        ("foo@bar@baz", "not a valid systemd unit name"),
        ("@foo", "not a valid systemd unit name"),
        ("..service", "not a valid systemd unit name"),
        (".service", "not a valid systemd unit name"),
        ("foo/bar", "not a valid systemd unit name"),
        ("a" * 248 + ".service", "longer than 255 characters"),  # 256 characters
        ("a" * 250, "longer than 255 characters"),  # 258 with the .service added
    ],
)
def test_invalid_unit_name_is_reported_at_the_line_of_its_verb(unit, fragment):
    assert_single_problem(rule_with_unit(unit), 3, fragment)


def test_empty_unit_name_is_reported_at_the_line_of_its_verb():
    assert_single_problem(rule_with_unit(""), 3, "non-empty strings")


@pytest.mark.parametrize("verb", rules.UNIT_VERBS)
def test_invalid_unit_is_reported_for_every_verb(verb):
    text = f'[[rule]]\nmatch = ["x"]\n\n{verb} = ["ok", "apache*"]\n'

    assert_single_problem(text, 4, "'apache*'")


@pytest.mark.parametrize(
    "run",
    ['"/bin/true"', '["/bin/true"]', '[["/bin/true"], "/bin/false"]', "[1]", "{ program = '/bin/true' }"],
    ids=["string", "list-of-strings", "mixed", "number", "table"],
)
def test_run_that_is_not_a_list_of_lists_is_reported_at_its_line(run):
    text = f'[[rule]]\nmatch = ["x"]\nreload = ["y"]\nrun = {run}\n'

    assert_single_problem(text, 4, "'run' must be a list of commands")


@pytest.mark.parametrize("command", ["[]", '["/bin/echo", 1]', '["/bin/echo", ["x"]]'])
def test_run_command_that_is_not_a_non_empty_list_of_strings_is_reported(command):
    text = f'[[rule]]\nmatch = ["x"]\nrun = [\n  ["/bin/true"],\n  {command},\n]\n'

    assert_single_problem(text, 3, "non-empty list of strings")


@pytest.mark.parametrize("program", ["deploy-cert", "./deploy-cert", "bin/deploy-cert", "", "~/deploy"])
def test_run_program_that_is_not_an_absolute_path_is_reported(program):
    text = f'[[rule]]\nmatch = ["x"]\nrun = [["{program}", "{{name}}"]]\n'

    assert_single_problem(text, 3, "must be an absolute path")


@pytest.mark.parametrize(
    "argument",
    [
        "{nope}",
        "{",
        "}",
        "x{name",
        "{0}",
        "{}",
        "{name.upper}",
        "{domains[0]}",
        "{name!x}",
        "{lineage:d}",
        # A format spec built from a placeholder's value is empty at validation but the
        # certificate's name when planning, where it raises ValueError.
        "{name:{name}}",
    ],
)
def test_run_argument_with_bad_placeholder_is_reported(argument):
    text = f'[[rule]]\nmatch = ["x"]\nrun = [["/usr/local/bin/deploy", "{argument}"]]\n'

    assert_single_problem(text, 3, "bad placeholder")


@pytest.mark.parametrize("argument", ["{{x}}", "{{", "}}", "{{name}}", "--cert={lineage}/fullchain.pem"])
def test_run_argument_with_literal_braces_or_known_placeholders_is_accepted(argument):
    text = f'[[rule]]\nmatch = ["x"]\nrun = [["/usr/local/bin/deploy", "{argument}"]]\n'

    (rule,) = rules.parse(text.encode()).rules

    assert rule.run == (("/usr/local/bin/deploy", argument),)


@pytest.mark.parametrize(
    "setting, fragment",
    [
        ("bogus = 1", "unknown setting 'bogus'"),
        ("max_wait = 10", "unknown setting 'max_wait'"),
        ('timeout = "10x"', "setting 'timeout': duration '10x': unknown unit 'x'"),
        ('timeout = "soon"', "cannot read 'soon'"),
        ("timeout = true", "expected a number of seconds or a text like '20d'"),
        ("settle = false", "expected a number of seconds or a text like '20d'"),
        ("timeout = [10]", "expected a number of seconds or a text like '20d'"),
        ("timeout = 0", "between 1 and 3600"),
        ("timeout = 3601", "between 1 and 3600"),
        ('timeout = "2h"', "between 1 and 3600"),
        ("settle = -1", "must be a non-negative number of seconds"),
        ("retry-min = 0", f"between {rules.SETTINGS['retry-min'][1]:g} and 86400"),
        ("min-interval = 86401", "between 0 and 86400"),
        ("timeout = nan", "must be a non-negative number of seconds"),
        ("timeout = inf", "must be a non-negative number of seconds"),
        ("expiry-warning = 1.5", "a number is a fraction of the lifetime"),
        ('expiry-critical = "1 fortnight"', "setting 'expiry-critical'"),
        ('metrics = "relative.prom"', "must be the absolute path of a file"),
    ],
)
def test_bad_setting_is_reported_at_its_line(setting, fragment):
    text = EXAMPLE + f"\n[settings]\nretry-max = 3600\n{setting}\n"

    assert_single_problem(text, 11, fragment)


@pytest.mark.parametrize(
    "settings, line, fragment",
    [
        ("settle = 30\nmax-wait = 10", 11, "'max-wait' must not be less than 'settle'"),
        ("max-wait = 10\nsettle = 30", 10, "'max-wait' must not be less than 'settle'"),
        ("settle = 100", 9, "'max-wait' must not be less than 'settle'"),
        ("retry-min = 600\nretry-max = 60", 11, "'retry-max' must not be less than 'retry-min'"),
    ],
    ids=["max-wait-after", "max-wait-before", "max-wait-default", "retry-max"],
)
def test_limit_below_its_partner_setting_is_reported(settings, line, fragment):
    assert_single_problem(EXAMPLE + "\n[settings]\n" + settings + "\n", line, fragment)


def test_settings_that_is_not_a_table_is_reported_at_its_line():
    assert_single_problem("# settings\nsettings = 5\n" + EXAMPLE, 2, "'settings' must be a table")


@pytest.mark.parametrize(
    "text",
    ["", "# only a comment\n", "[settings]\ntimeout = 10\n", "rule = []\n"],
    ids=["empty", "comment", "settings-only", "empty-array"],
)
def test_file_without_rules_is_refused(text):
    assert_single_problem(text, 1, "no [[rule]] tables")


# --- parse: several problems -----------------------------------------------------------

SEVERAL_PROBLEMS = """\
color = "blue"
[settings]
settle = true
bogus = 1

[[rule]]
match = "herzbube.ch"
restart = ["apache*", "dovecot", "-x"]
frobnicate = 1

[[rule]]
run = [["deploy", "{nope}"]]
"""


def test_every_problem_of_a_file_is_reported_at_once_in_a_stable_order():
    expected = [
        (1, "unknown table or key 'color'"),
        (3, "setting 'settle': duration True"),
        (4, "unknown setting 'bogus'"),
        (9, "unknown key 'frobnicate'"),
        (7, "'match' must be a list"),
        (8, "'apache*'"),
        (8, "'-x'"),
        (12, "'deploy' must be an absolute path"),
        (12, "'{nope}' has a bad placeholder"),
        (11, "rule selects nothing"),
    ]

    problems = problems_of(SEVERAL_PROBLEMS, "/etc/certrelay/rules.toml")

    assert len(problems) == len(expected), problems
    for problem, (line, fragment) in zip(problems, expected):
        assert problem.startswith(f"/etc/certrelay/rules.toml:{line}: "), problems
        assert fragment in problem, problems
    assert problems_of(SEVERAL_PROBLEMS, "/etc/certrelay/rules.toml") == problems


# --- load: reading and permissions -----------------------------------------------------


@pytest.fixture
def rules_dir(tmp_path):
    directory = tmp_path / "etc"
    directory.mkdir()
    os.chmod(directory, 0o755)
    return directory


def write(directory, text=EXAMPLE, mode=0o644):
    path = directory / "rules.toml"
    path.write_text(text, encoding="utf-8")
    os.chmod(path, mode)
    return path


def load_problems(path):
    with pytest.raises(rules.RulesError) as caught:
        rules.load(str(path), check_permissions=True)
    return caught.value.problems


@pytest.mark.parametrize("mode", [0o644, 0o600, 0o400])
def test_load_accepts_a_root_owned_file_nobody_else_can_write(rules_dir, mode):
    path = write(rules_dir, mode=mode)

    loaded = rules.load(str(path), check_permissions=True)

    assert loaded.path == str(path)
    assert len(loaded.rules) == 2


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666, 0o620])
def test_load_refuses_a_file_writable_by_group_or_others(rules_dir, mode):
    path = write(rules_dir, mode=mode)

    (problem,) = load_problems(path)

    assert problem.startswith(f"{path}: refused: ")
    assert f"chmod go-w {path}" in problem
    assert f"mode {mode:04o}" in problem


def test_load_refuses_a_file_owned_by_another_user(rules_dir):
    path = write(rules_dir)
    os.chown(path, 65534, 65534)

    (problem,) = load_problems(path)

    assert problem.startswith(f"{path}: refused: ")
    assert "uid 65534" in problem
    assert f"chown root {path}" in problem


def test_load_reports_both_owner_and_mode_of_the_file(rules_dir):
    path = write(rules_dir, mode=0o666)
    os.chown(path, 65534, 0)

    problems = load_problems(path)

    assert len(problems) == 2
    assert f"chown root {path}" in problems[0]
    assert f"chmod go-w {path}" in problems[1]


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_load_refuses_a_file_in_a_directory_others_can_write(rules_dir, mode):
    path = write(rules_dir)
    os.chmod(rules_dir, mode)

    (problem,) = load_problems(path)

    assert problem.startswith(f"{path}: refused: the directory {rules_dir} ")
    assert f"chmod go-w {rules_dir}" in problem


def test_load_refuses_a_file_in_a_directory_owned_by_another_user(rules_dir):
    path = write(rules_dir)
    os.chown(rules_dir, 65534, 65534)

    (problem,) = load_problems(path)

    assert f"the directory {rules_dir} is owned by uid 65534" in problem
    assert f"chown root {rules_dir}" in problem


def test_load_accepts_a_file_in_a_sticky_directory_others_can_write(rules_dir):
    path = write(rules_dir)
    os.chmod(rules_dir, 0o1777)

    assert len(rules.load(str(path), check_permissions=True).rules) == 2


def test_load_without_permission_check_accepts_a_file_others_can_write(rules_dir):
    path = write(rules_dir, mode=0o666)
    os.chown(path, 65534, 65534)

    assert len(rules.load(str(path), check_permissions=False).rules) == 2


def test_load_of_a_missing_file_reports_the_path(tmp_path):
    path = tmp_path / "nowhere" / "rules.toml"

    (problem,) = load_problems(path)

    assert problem.startswith(f"{path}: cannot read the rules file")
    assert "No such file or directory" in problem


def test_load_reports_content_problems_under_the_files_path(rules_dir):
    path = write(rules_dir, text='[[rule]]\nmatch = ["x"]\n')

    (problem,) = load_problems(path)

    assert problem.startswith(f"{path}:1: rule has no action")


# --- matching -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern, domain, selected",
    [
        ("herzbube.ch", "herzbube.ch", True),
        ("herzbube.ch", "moser-naef.ch", False),
        ("herzbube.ch", "mail.herzbube.ch", False),
        ("*.herzbube.ch", "mail.herzbube.ch", True),
        ("*.herzbube.ch", "herzbube.ch", False),
        ("*.herzbube.ch", "*.herzbube.ch", True),  # the wildcard domain itself, literally
        ("mail.herzbube.ch", "*.herzbube.ch", True),  # a wildcard covers one host below it
        ("a.b.herzbube.ch", "*.herzbube.ch", False),  # ... but only one label
        ("herzbube.ch", "*.herzbube.ch", False),
        ("mail.other.ch", "*.herzbube.ch", False),
        ("mail.*.ch", "*.herzbube.ch", False),
        ("MAIL.Herzbube.CH", "*.herzbube.ch", True),
        ("mail.herzbube.ch", "*.HERZBUBE.CH", True),
        ("HerzBube.CH", "herzbube.ch", True),
        ("*.HERZBUBE.ch", "Mail.herzbube.CH", True),
        ("*", "anything.example", True),
    ],
)
def test_domain_matches(pattern, domain, selected):
    assert rules.domain_matches(pattern, domain) is selected


@pytest.mark.parametrize(
    "pattern, name, selected",
    [
        ("herzbube.ch", "herzbube.ch", True),
        ("herzbube.ch", "herzbube.ch-0001", False),
        ("francescamoser.ch*", "francescamoser.ch-0001", True),
        ("francescamoser.ch*", "francescamoser.ch", True),
        ("*.ch", "grunzwanzling.ch", True),
        ("*", "moser-naef.ch", True),
        ("moser-naef.c?", "moser-naef.ch", True),
    ],
)
def test_match_globs_the_lineage_name(pattern, name, selected):
    rule = rules.Rule(line=1, match=(pattern,))

    assert rule.selects(name, ()) is selected


def test_match_ignores_the_domains_and_domains_ignore_the_name():
    assert not rules.Rule(line=1, match=("herzbube.ch",)).selects("other", ("herzbube.ch",))
    assert not rules.Rule(line=1, domains=("herzbube.ch",)).selects("herzbube.ch", ("other.ch",))


@pytest.mark.parametrize(
    "domains, selected",
    [
        (("herzbube.ch", "*.herzbube.ch"), True),
        (("a.b.herzbube.ch",), False),
        (("HERZBUBE.ch", "Mail.Herzbube.CH"), True),
        (("moser-naef.ch", "*.moser-naef.ch"), False),
        ((), False),
    ],
)
def test_domains_rule_selects_a_certificate_covering_the_domain(domains, selected):
    rule = rules.Rule(line=1, domains=("mail.herzbube.ch",))

    assert rule.selects("some-lineage", domains) is selected


@pytest.mark.parametrize(
    "name, domains, selected",
    [
        ("herzbube.ch", ("unrelated.ch",), True),
        ("other", ("mail.herzbube.ch",), True),
        ("other", ("unrelated.ch",), False),
    ],
    ids=["by-match", "by-domains", "neither"],
)
def test_rule_with_match_and_domains_selects_when_either_matches(name, domains, selected):
    rule = rules.Rule(line=1, match=("herzbube.ch",), domains=("mail.herzbube.ch",))

    assert rule.selects(name, domains) is selected


def test_matching_returns_the_selecting_rules_in_file_order():
    parsed = rules.parse(EXAMPLE.encode())

    assert parsed.matching("herzbube.ch", ()) == list(parsed.rules)
    assert parsed.matching("moser-naef.ch", ()) == [parsed.rules[1]]


# --- verify, escalate, precheck, [[rule.install]] ----------------------------------------

CLOSING = """\
[[rule]]
match = ["herzbube.ch"]
restart = ["dovecot"]
precheck = [["/usr/bin/doveconf", "-n"]]
verify = ["imaps://127.0.0.1", "smtp://mail.herzbube.ch:25?sni=mx.herzbube.ch"]
escalate = false

  [[rule.install]]
  dest = "/etc/exim4/tls/{name}.key"
  content = ["privkey"]
  mode = "0600"

[[rule]]
domains = ["*.example.org"]
verify = ["https://[::1]:8443"]
"""


def test_verify_precheck_escalate_and_installs_parse_into_the_rule():
    first, second = rules.parse(CLOSING.encode()).rules

    assert [(endpoint.scheme, endpoint.host, endpoint.port, endpoint.sni) for endpoint in first.verify] == [
        ("imaps", "127.0.0.1", 993, None), ("smtp", "mail.herzbube.ch", 25, "mx.herzbube.ch"),
    ]
    assert first.precheck == (("/usr/bin/doveconf", "-n"),) and first.escalate is False
    [install] = first.install
    assert (install.line, install.dest, install.content, install.mode) == (8, "/etc/exim4/tls/{name}.key", ("privkey",), 0o600)
    # A rule that only verifies is valid: it checks what another rule (or a person) did.
    assert second.verify[0].host == "::1" and second.units == () and second.escalate is True


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ('[[rule]]\nmatch = ["x"]\nrestart = ["a"]\nverify = ["gopher://x"]\n', 4, "verify endpoint 'gopher://x': "),
        ('[[rule]]\nmatch = ["x"]\nrestart = ["a"]\nverify = ["tls://127.0.0.1"]\n', 4, "verify endpoint 'tls://127.0.0.1'"),
        ('[[rule]]\nmatch = ["x"]\nrestart = ["a"]\nescalate = "no"\n', 4, "'escalate' must be true or false"),
        ('[[rule]]\nmatch = ["x"]\nrun = [["/bin/true"]]\nprecheck = [["/bin/true"]]\n', 4,
         "'precheck' guards unit actions, but this rule has none"),
        ('[[rule]]\nmatch = ["x"]\nrestart = ["a"]\nprecheck = [["nginx", "-t"]]\n', 4,
         "precheck command 'nginx' must be an absolute path"),
        ('[[rule]]\nmatch = ["x"]\nrestart = ["a"]\n\n  [[rule.install]]\n  dest = "/etc/x.pem"\n  content = ["cert"]\n'
         '  colour = "red"\n', 8, "unknown key 'colour' in [[rule.install]]"),
        ('[[rule]]\nmatch = ["x"]\nrestart = ["a"]\ninstall = 5\n', 4, "'install' must be written as [[rule.install]] tables"),
    ],
    ids=["unknown-scheme", "tls-without-port", "escalate-not-bool", "precheck-without-units", "precheck-relative",
         "install-unknown-key", "install-not-tables"],
)
def test_bad_closing_the_loop_keys_are_reported_at_their_line(text, line, fragment):
    assert_single_problem(text, line, fragment)


def test_two_installs_of_one_destination_are_refused_at_the_second():
    text = (
        '[[rule]]\nmatch = ["a"]\nreload = ["x"]\n  [[rule.install]]\n  dest = "/etc/ssl/one.pem"\n  content = ["cert"]\n'
        '\n[[rule]]\nmatch = ["b"]\nreload = ["y"]\n  [[rule.install]]\n  dest = "/etc/ssl/one.pem"\n  content = ["cert"]\n'
    )

    assert_single_problem(text, 11, "install dest '/etc/ssl/one.pem' is also written by the install on line 4")


def test_an_install_destination_inside_the_config_dir_is_refused(tmp_path):
    text = f'[[rule]]\nmatch = ["a"]\nreload = ["x"]\n  [[rule.install]]\n  dest = "{tmp_path}/live/a.pem"\n  content = ["cert"]\n'

    with pytest.raises(rules.RulesError) as caught:
        rules.parse(text.encode(), "rules.toml", config_dir=str(tmp_path))

    assert caught.value.problems[0].startswith("rules.toml:5: ") and "config dir" in caught.value.problems[0]


RULE = '\n[[rule]]\nmatch = ["*"]\nreload = ["apache2"]\n'


def test_alert_table_parses_into_its_channels():
    parsed = rules.parse((
        '[alert]\nmail = ["root", "admin@example.ch"]\ncommand = [["/usr/local/bin/page", "{literal}"]]\n'
        'apprise = ["ntfy://ntfy.example.ch/certs"]\nping = "https://hc-ping.com/1234"\n' + RULE).encode())

    assert parsed.alert.mail == ("root", "admin@example.ch")
    assert parsed.alert.command == (("/usr/local/bin/page", "{literal}"),)  # no placeholders: taken as written
    assert parsed.alert.apprise == ("ntfy://ntfy.example.ch/certs",)
    assert parsed.alert.ping == "https://hc-ping.com/1234"
    assert parsed.alert.names() == ["mail", "command /usr/local/bin/page {literal}", "apprise ntfy://ntfy.example.ch/certs"]
    assert rules.parse(RULE.encode()).alert is None


@pytest.mark.parametrize("line, fragment", [
    ('mail = "root"', "[alert] mail must be a list of addresses"),
    ('mail = ["-oQ/tmp"]', "[alert] mail must be a list of addresses"),
    ('command = [["page"]]', "command command 'page' must be an absolute path (no PATH lookup, no shell)"),
    ('command = ["/bin/page"]', "'command' must be a list of commands, each a list of strings"),
    ('apprise = ["not a url"]', "[alert] apprise must be a list of apprise URLs"),
    ('ping = "ftp://example.ch/"', "[alert] ping must be an http(s) URL"),
    ('pager = "x"', "unknown key 'pager' in [alert]; known: mail, command, apprise, ping"),
])
def test_a_bad_alert_key_is_reported_at_its_line(line, fragment):
    assert_single_problem(f"# alerts\n[alert]\n{line}\n" + RULE, 3, fragment)


def test_an_alert_table_without_a_channel_is_reported():
    assert_single_problem("# alerts\n\n[alert]\n" + RULE, 3, "[alert] has no channel: add mail, command, apprise or ping")
