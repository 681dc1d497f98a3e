"""Fuzz of certrelay.rules.parse: whatever the bytes, the result is `Rules` or a
`RulesError` whose every problem is one line `rules.toml:LINE: message` with LINE inside
the file; never another exception. Plus `certrelay check --rules-only` as a real process."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from certrelay import rules

REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROBLEM = re.compile(r"rules\.toml:(?P<line>[0-9]+): [^\n\r]+")
FUZZ = settings(max_examples=200, deadline=None)


def parse_outcome(data):
    """Parse `data`; return the Rules or the RulesError, after checking the promises of each.

    Any other exception propagates and fails the test.
    """
    try:
        result = rules.parse(data, "rules.toml")
    except rules.RulesError as error:
        assert error.problems and str(error) == "\n".join(error.problems)
        lines = max(1, data.count(b"\n") + 1)
        for problem in error.problems:
            found = PROBLEM.fullmatch(problem)
            assert found, f"not one line rules.toml:LINE: message: {problem!r}"
            assert 1 <= int(found["line"]) <= lines, f"line outside the file's {lines} lines: {problem!r}"
        return error
    assert isinstance(result, rules.Rules) and result.rules and result.path == "rules.toml"
    for rule in result.rules:
        assert rule.match or rule.domains
        assert rule.units or rule.run
        assert all(verb in rules.UNIT_VERBS and rules.unit_problem(unit) is None for verb, unit in rule.units)
        assert all(argv and os.path.isabs(argv[0]) for argv in rule.run)
    for key, (_, low, high) in rules.SETTINGS.items():
        assert isinstance(result.settings[key], float) and low <= result.settings[key] <= high
    return result


# --- Strategies ------------------------------------------------------------------------

def toml_string(text):
    """Return `text` as a TOML basic string (JSON's escapes are TOML's, bar DEL)."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_key(key):
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else toml_string(key)


def toml_value(value):
    """Return the TOML inline form of a Python value made by VALUES."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("-inf" if value < 0 else "inf") if math.isinf(value) else repr(value)
    if isinstance(value, (int, str)):
        return str(value) if isinstance(value, int) else toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(key)} = {toml_value(item)}" for key, item in value.items()) + "}"
    return value.isoformat()  # a datetime


TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
UNITS = st.one_of(TEXT, st.sampled_from([
    "apache2", "nginx.service", "postfix@-.service", "foo.socket", "x.timer", "-x", "apache*", "a?",
    "", "a b", "@x", "x@", "a" * 300, "a\\x2d.service", "..service",
]))
ARGUMENTS = st.one_of(TEXT, st.sampled_from([
    "/usr/bin/deploy", "relative", "{name}", "{lineage}", "{domains}", "{{x}}", "{x}", "{name!r}",
    "{name:>9}", "{", "}", "{}", "{0}", "{name.real}", "{name[0]}", "{na\nme}", "",
]))
SELECTORS = st.one_of(TEXT, st.sampled_from(["*", "herzbube.ch", "*.example.ch", "mail.*", "[", ""]))
SCALARS = st.one_of(
    st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(), TEXT, st.datetimes(),
)
VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(TEXT, children, max_size=3)),
    max_leaves=6,
)
GOOD_UNITS = st.sampled_from(["apache2", "nginx.service", "postfix@-.service", "foo.socket", "x.timer"])
GOOD_ARGUMENTS = st.sampled_from(["{name}", "{lineage}", "{domains}", "{{x}}", "--flag", "plain"])
UNIT_LISTS = st.one_of(
    st.lists(GOOD_UNITS, min_size=1, max_size=3), st.lists(st.one_of(GOOD_UNITS, UNITS), min_size=1, max_size=3),
)
RUN_LISTS = st.lists(
    st.tuples(st.sampled_from(["/usr/bin/deploy", "/bin/true", "relative"]), st.lists(st.one_of(GOOD_ARGUMENTS, ARGUMENTS), max_size=3))
    .map(lambda argv: [argv[0], *argv[1]]),
    min_size=1, max_size=2,
)
GOOD_SELECTORS = st.sampled_from(["*", "herzbube.ch", "*.example.ch", "mail.*"])
SELECTOR_LISTS = st.one_of(
    st.lists(GOOD_SELECTORS, min_size=1, max_size=3), st.lists(st.one_of(GOOD_SELECTORS, SELECTORS), min_size=1, max_size=3),
)
#: Rules close to valid: a selector and an action, and maybe more known keys (or one unknown).
PLAUSIBLE_RULE_TABLES = st.builds(
    lambda selector, verb, units, extra: {"match": selector, verb: units, **extra},
    SELECTOR_LISTS, st.sampled_from(rules.UNIT_VERBS), UNIT_LISTS,
    st.one_of(st.just({}), st.fixed_dictionaries({}, optional={"domains": SELECTOR_LISTS, "run": RUN_LISTS, "frobnicate": VALUES})),
)
RULE_KEYS = st.one_of(st.sampled_from(sorted(rules.RULE_KEYS) + ["frobnicate", "Match", ""]), TEXT)
RULE_VALUES = st.one_of(UNIT_LISTS, SELECTOR_LISTS, RUN_LISTS, VALUES)
RULE_TABLES = st.one_of(PLAUSIBLE_RULE_TABLES, st.dictionaries(RULE_KEYS, RULE_VALUES, max_size=6))
SETTING_VALUES = st.one_of(
    st.sampled_from([0, 0.0, 0.1, 1, 5, 60, 3600, 86400]), st.sampled_from([86401, -1, 1e999, True, "5"]),
    st.floats(), st.integers(-10, 100000), VALUES,
)
SETTINGS = st.dictionaries(
    st.one_of(st.sampled_from(sorted(rules.SETTINGS) + ["bogus"]), TEXT), SETTING_VALUES, max_size=4,
)
DOCUMENTS = st.one_of(
    st.fixed_dictionaries(
        {"rule": st.lists(PLAUSIBLE_RULE_TABLES, min_size=1, max_size=3)},
        optional={"settings": st.dictionaries(st.sampled_from(sorted(rules.SETTINGS)), SETTING_VALUES, max_size=3)},
    ),
    st.fixed_dictionaries(
        {},
        optional={
            "rule": st.one_of(st.lists(RULE_TABLES, max_size=3), VALUES),
            "settings": st.one_of(SETTINGS, VALUES),
            "extra": VALUES,
        },
    ),
)


@st.composite
def toml_documents(draw):
    """A TOML text for a random document: tables as [x] / [[x]] or inline, random
    comments and blank lines, LF or CRLF."""
    document = draw(DOCUMENTS)
    inline, tables = [], []
    for key, value in document.items():
        if isinstance(value, dict) and draw(st.booleans()):
            tables.append([f"[{key}]"] + [f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()])
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value) and draw(st.booleans()):
            for table in value:
                tables.append([f"[[{key}]]"] + [f"{toml_key(k)} = {toml_value(v)}" for k, v in table.items()])
        else:
            inline.append(f"{toml_key(key)} = {toml_value(value)}")
    lines = inline + [line for table in draw(st.permutations(tables)) for line in table]
    for _ in range(draw(st.integers(0, 3))):
        filler = draw(st.sampled_from(["", "# a comment", "   ", "# \u2028 \x85 separators"]))
        lines.insert(draw(st.integers(0, len(lines))), filler)
    newline = draw(st.sampled_from(["\n", "\n", "\r\n"]))
    return (newline.join(lines) + draw(st.sampled_from(["", newline]))).encode("utf-8")


@st.composite
def fragment_soups(draw):
    """Lines glued from TOML-looking fragments, most of them invalid together."""
    fragments = st.sampled_from([
        "[[rule]]", "[rule]", "[settings]", "[[settings]]", "[rule.x]", "[ settings ]", "[[ rule ]] # c",
        'match = ["*"]', 'domains = ["*.example.ch"]', 'restart = ["apache2"]', 'reload = "apache2"',
        'run = [["/bin/true", "{name}"]]', "run = [[]]", "timeout = 0", "settle = 1e999", "max-wait = -1",
        "retry-min = nan", "min-interval = true", 'x = """', "'''", "= 1", "a.b.c = 1", "a = {b = {c = 1}}",
        "a = [", "]", "key = 1979-05-27T07:32:00Z", "\x00", "\t", "\\", '"\\u0000"',
    ])
    lines = draw(st.lists(st.one_of(fragments, TEXT), max_size=12))
    return "\n".join(lines).encode("utf-8", "surrogatepass")


# --- Properties ----------------------------------------------------------------------------

@FUZZ
@given(data=st.binary(max_size=500))
def test_parse_of_arbitrary_bytes_gives_rules_or_located_problems(data):
    parse_outcome(data)


@FUZZ
@given(text=st.text(max_size=500))
def test_parse_of_arbitrary_text_gives_rules_or_located_problems(text):
    parse_outcome(text.encode("utf-8", "surrogatepass"))


@FUZZ
@given(data=fragment_soups())
def test_parse_of_toml_fragment_soup_gives_rules_or_located_problems(data):
    parse_outcome(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=toml_documents())
def test_parse_of_random_toml_documents_gives_rules_or_located_problems(data):
    parse_outcome(data)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"x = " + b"[" * 5000, id="arrays-nested-5000-deep"),
        pytest.param(b"x = " + b"{a = " * 5000, id="inline-tables-nested-5000-deep"),
        pytest.param(b'[[rule]]\nmatch = ["*"]\nrestart = ' + b"[" * 3000 + b"]" * 3000 + b"\n", id="deep-value-of-a-known-key"),
    ],
)
def test_deeply_nested_toml_is_a_located_problem_not_a_crash(data):
    outcome = parse_outcome(data)

    assert isinstance(outcome, rules.RulesError)


@pytest.mark.parametrize(
    "separator",
    [
        pytest.param("\u2028", id="line-separator"),
        pytest.param("\u2029", id="paragraph-separator"),
        pytest.param("\x85", id="next-line"),
    ],
)
@pytest.mark.parametrize("where", ["comment", "string"])
def test_problem_line_counts_only_newlines(separator, where):
    # TOML ends lines at \n only; these characters may appear in comments and strings.
    if where == "comment":
        text = f"# one{separator}two{separator}three\n[[rule]]\nmatch = [\"x\"]\nfrobnicate = 1\n"
        line = 4
    else:
        text = f'[[rule]]\nmatch = ["a{separator}b{separator}c"]\nfrobnicate = 1\n'
        line = 3

    problems = parse_outcome(text.encode()).problems

    assert any(problem.startswith(f"rules.toml:{line}: unknown key 'frobnicate'") for problem in problems), problems


@pytest.mark.parametrize(
    "argument",
    [
        pytest.param("{na\\nme}", id="newline-in-field"),
        pytest.param("{name:\\r}", id="carriage-return-in-spec"),
        pytest.param("{name:\\u2028}", id="line-separator-in-spec"),
    ],
)
def test_problem_about_a_placeholder_stays_on_one_line(argument):
    text = f'[[rule]]\nmatch = ["x"]\nrun = [["/bin/x", "{argument}"]]\n'

    problems = parse_outcome(text.encode()).problems

    assert len(problems) == 1 and "bad placeholder" in problems[0]
    assert len(problems[0].splitlines()) == 1, problems


# --- `certrelay check --rules-only` as a real process ------------------------------------

def check_rules_only(tmp_path, data):
    """Run `certrelay check --rules-only` on a rules file holding `data`."""
    directory = tmp_path / "etc"
    directory.mkdir(mode=0o755, exist_ok=True)
    path = directory / "rules.toml"
    path.write_bytes(data)
    path.chmod(0o644)
    environment = dict(os.environ, PYTHONPATH=REPOSITORY)
    return subprocess.run(
        [
            sys.executable, "-m", "certrelay", "check", "--rules-only", "--rules", str(path),
            "--config-dir", str(tmp_path / "letsencrypt"), "--state-dir", str(tmp_path / "state"),
        ],
        env=environment, capture_output=True, encoding="utf-8", errors="replace", timeout=60,
    )


def assert_refused_cleanly(result):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), result.stderr


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\xff\xfe[[rule]]\n", id="not-utf8"),
        pytest.param(b'[[rule]]\nmatch = ["*"\n', id="toml-syntax"),
        pytest.param(b"", id="empty"),
        pytest.param(b"x = " + b"[" * 5000, id="nested-5000-deep"),
        pytest.param(b'[[rule]]\nmatch = ["x"]\nrun = [["/bin/x", "{na\\nme}"]]\n', id="newline-in-placeholder"),
    ],
)
def test_check_rules_only_refuses_invalid_rules_with_error_lines_only(tmp_path, data):
    assert_refused_cleanly(check_rules_only(tmp_path, data))


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(toml_documents(), fragment_soups()))
def test_check_rules_only_on_fuzzed_invalid_rules_exits_2_with_error_lines_only(tmp_path_factory, data):
    assume(isinstance(parse_outcome(data), rules.RulesError))

    assert_refused_cleanly(check_rules_only(tmp_path_factory.mktemp("check"), data))
