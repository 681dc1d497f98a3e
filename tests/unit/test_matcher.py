"""certrelay.matcher gives exactly what the simple matcher gives: the rules, in file
order, whose Rule.selects is true (fnmatch per pattern, rules.domain_matches for domains).

The reference is Rule.selects, not Rules.matching, which is to use the Matcher itself.
"""

import pytest
from hypothesis import example, given, settings, strategies as st

from certrelay import matcher, rules

ACTION = (("restart", "a.service"),)


def make_rules(*selectors):
    """Return Rules from (match, domains) pairs, one rule each, in that order."""
    return rules.Rules("rules.toml", tuple(
        rules.Rule(line=number, match=tuple(match), domains=tuple(domains), units=ACTION)
        for number, (match, domains) in enumerate(selectors, start=1)
    ), {})


def simple(rule_set, name, domains):
    return [rule for rule in rule_set.rules if rule.selects(name, domains)]


def lines(selected):
    return [rule.line for rule in selected]


# Few letters in both cases, the glob characters, dots and brackets' companions: small
# alphabets make patterns and names collide often enough to exercise every path.
LETTERS = "abAB.-!*?[]"
pattern = st.text(LETTERS, min_size=1, max_size=8)
word = st.text("abAB-", min_size=1, max_size=3)
# Names and domains built from the same pieces as the patterns, plus wildcard domains.
plain = st.lists(word, min_size=1, max_size=3).map(".".join)
wildcard = plain.map(lambda parent: "*." + parent)
string = st.one_of(st.text(LETTERS, min_size=0, max_size=8), plain, wildcard)
rule_selectors = st.tuples(
    st.lists(st.one_of(pattern, plain), max_size=3),
    st.lists(st.one_of(pattern, plain, wildcard), max_size=3),
).filter(lambda selectors: selectors[0] or selectors[1])


@settings(max_examples=300, deadline=None)
@given(st.lists(rule_selectors, min_size=1, max_size=8), st.lists(st.tuples(string, st.lists(string, max_size=4)),
                                                               min_size=1, max_size=6))
@example([(["*"], [])], [("", [])])
@example([([], ["mail.example.ch"])], [("x", ["*.EXAMPLE.ch"])])
@example([([], ["a"])], [("x", ["*."])])  # domain_matches: host "a", parent "" == "*."[2:]
@example([(["[!a]*"], ["*[]"]), (["a]"], ["]x"])], [("b", ["*.a"]), ("a]", ["]X"])])
@example([(["*ab"], ["ab*"])], [("ab", ["AB"])])  # a literal end as long as the string
@example([([], ["*a.b*.a"]), ([], ["*a.a*.a"])], [("x", ["ba.b.a", "a.b.a", "a.a"])])  # bucketed by an infix
@example([(["**"], ["*"])], [("", [""]), ("a", ["*.b"])])  # only stars: every string
def test_matcher_equals_the_simple_matcher(selectors, certificates):
    rule_set = make_rules(*selectors)
    fast = matcher.Matcher(rule_set.rules)
    for name, domains in certificates:
        assert lines(fast.matching(name, domains)) == lines(simple(rule_set, name, domains)), (name, domains)


EXAMPLES = make_rules(
    (["herzbube.ch"], []),  # 1: exact name
    (["*.org", "n?.example"], []),  # 2: name globs
    ([], ["mail.herzbube.ch"]),  # 3: plain domain, also under *.herzbube.ch
    ([], ["*.Example.CH"]),  # 4: domain glob, any case
    (["Herzbube.ch"], ["[a-c]*.net"]),  # 5: names are case-sensitive; a bracket glob
    (["*"], []),  # 6: everything
)


@pytest.mark.parametrize(("name", "domains", "expected"), [
    ("herzbube.ch", [], [1, 6]),
    ("herzbube.ch-0001", ["MAIL.herzbube.ch"], [3, 6]),
    ("x", ["*.herzbube.ch"], [3, 6]),  # the wildcard certificate covers mail.herzbube.ch
    ("x", ["*.mail.herzbube.ch"], [6]),  # one level only
    ("x", ["www.example.ch", "b.net"], [4, 5, 6]),
    ("Herzbube.ch", ["d.net"], [5, 6]),
    ("a.org", [], [2, 6]),
    ("n1.example", [], [2, 6]),
    ("n12.example", [], [6]),
])
def test_examples(name, domains, expected):
    assert lines(matcher.Matcher(EXAMPLES.rules).matching(name, domains)) == expected
    assert lines(simple(EXAMPLES, name, domains)) == expected


def test_glob_characters_are_those_of_rules():
    assert matcher.GLOB_CHARACTERS == rules.GLOB_CHARACTERS


@pytest.mark.parametrize(("pattern", "head", "tail"), [
    ("*.example.ch", "", ".example.ch"),
    ("n*.g01.example", "n", ".g01.example"),
    ("mail.*", "mail.", ""),
    ("a[bc]d", "a", "d"),
    ("a[b", "a", "b"),  # an unclosed bracket is literal: a shorter tail is still a tail
    ("x]y*", "x]y", ""),
])
def test_literal_ends(pattern, head, tail):
    assert matcher.literal_ends(pattern) == (head, tail)


@pytest.mark.parametrize(("pattern", "pieces"), [
    ("*.example.ch", [("tail", ".example.ch")]),
    ("n*.g01.example", [("head", "n"), ("tail", ".g01.example")]),
    ("*04.g*.example", [("tail", ".example"), ("infix", "04.g")]),
    ("a?b*c?d", [("head", "a"), ("tail", "d"), ("infix", "b"), ("infix", "c")]),
    ("a*[*b*]*c", [("head", "a"), ("tail", "c")]),  # inside brackets nothing is literal
    ("*", []),
])
def test_literal_pieces(pattern, pieces):
    assert matcher.literal_pieces(pattern) == pieces


def test_a_glob_is_bucketed_by_its_least_shared_piece():
    index = matcher.GlobIndex({0: ["*04.g*.example"], 1: ["*08.g*.example"], 2: ["*.example"]})

    assert sorted(index.infixes) == ["04.g", "08.g"]
    assert sorted(index.tails) == [".example"]
    assert index.indices("n00004.g04.example") == {0, 2}


def test_for_rules_builds_once_per_rules_object():
    first, second = make_rules((["a"], [])), make_rules((["a"], []))
    built = matcher.for_rules(first)
    assert matcher.for_rules(first) is built
    assert matcher.for_rules(second) is not built
    assert lines(matcher.for_rules(second).matching("a", [])) == [1]
