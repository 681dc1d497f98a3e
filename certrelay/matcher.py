"""Which rules select a certificate, fast: built once per rules file, then dict look-ups
for exact patterns and a few regular-expression calls per name or domain.

Equivalent to `[rule for rule in rules if rule.selects(name, domains)]` (see
rules.Rule.selects and rules.domain_matches): a rule applies when one of its `match`
globs matches the lineage name (case-sensitive, fnmatch.fnmatchcase), or one of its
`domains` globs matches one of the certificate's domains (both lowercased), or one of
its plain `domains` patterns names a host just below a wildcard certificate domain
(`mail.example.ch` under `*.example.ch`). tests/unit/test_matcher.py checks the
equivalence on generated rules.

The simple matcher calls fnmatch per rule per pattern per domain, which dominated a
batch of thousands of notifications. Here:

- patterns without glob characters are equality tests: dicts from the (lowercased,
  for domains) pattern to the rules naming it, and from the parent of a plain domain
  pattern (`example.ch` for `mail.example.ch`) to its rules, for wildcard domains;
- glob patterns are bucketed by one literal piece a match must contain: the text it
  must end with (`.example.ch` for `*.example.ch`), start with (`mail.` for `mail.*`)
  or, for a pattern without brackets, have between wildcards (`04.g` for
  `*04.g*.example`), whichever fewest patterns share; a string is tried only against
  the buckets of its own ends and of the pieces it contains, plus the patterns with
  no literal piece (`*?`, `[ab]*`); a pattern of only `*` selects every string;
- the patterns of one bucket become one regular expression that always matches at
  position 0 and holds, per rule, an optional lookahead over that rule's
  fnmatch.translate()d patterns followed by an empty group: after one `match()`
  call, the groups that are set are exactly the rules whose globs match.
"""

import collections
import fnmatch
import re

#: Characters that make a pattern a glob; the same set as rules.GLOB_CHARACTERS,
#: which decides whether a domain pattern may cover a wildcard certificate.
GLOB_CHARACTERS = frozenset("*?[")
WILDCARDS = re.compile(r"[*?]")


def is_glob(pattern):
    """Return True if `pattern` has a glob character (else fnmatch is an equality test)."""
    return not GLOB_CHARACTERS.isdisjoint(pattern)


class GlobSet:
    """The glob patterns of some rules, matched against a string in one regex call.

    `patterns` maps a rule's index to its glob patterns (non-empty lists).
    `indices(text)` returns the indices of the rules with a pattern matching `text`
    in full, as fnmatch.fnmatchcase does, in the order of `patterns`. The regex is
    compiled on first use.
    """

    def __init__(self, patterns):
        self.patterns = patterns
        self.owners = list(patterns)
        self.regex = None

    def compile(self):
        parts = []
        for index in self.owners:
            alternatives = "|".join(fnmatch.translate(pattern) for pattern in self.patterns[index])
            # Zero-width either way: the lookahead sets the empty group only if one
            # of the rule's patterns matches the whole string (translate ends in \Z).
            parts.append(f"(?:(?=(?:{alternatives}))()|)")
        regex = re.compile("".join(parts))
        # translate() (Python 3.11+) uses atomic groups, not capturing ones; a capturing
        # group would shift the numbering that maps groups back to rules.
        if regex.groups != len(self.owners):
            raise AssertionError("fnmatch.translate() produced capturing groups")
        return regex

    def indices(self, text):
        if self.regex is None:
            self.regex = self.compile()
        groups = self.regex.match(text).groups()
        return [owner for owner, group in zip(self.owners, groups) if group is not None]


def literal_ends(pattern):
    """Return (head, tail): the text every match of the glob `pattern` starts with and
    ends with. The head ends at the first glob character; the tail starts after the
    last of `*?[]` (characters after a bracket's `]` are literal; an unclosed `[` or a
    lone `]` is literal too, so cutting there only shortens the tail)."""
    first = min((pattern.find(c) for c in "*?[" if c in pattern), default=len(pattern))
    last = max(pattern.rfind(c) for c in "*?[]")
    return pattern[:first], pattern[last + 1:]


def literal_pieces(pattern):
    """Return the literal texts every match of the glob `pattern` contains, as (kind,
    text) pairs, none empty: ("head", what it starts with), ("tail", what it ends
    with) and, if `pattern` has no bracket, ("infix", text) for each piece between
    two of its `*` and `?` (without brackets, those are its only glob characters)."""
    head, tail = literal_ends(pattern)
    pieces = [("head", head), ("tail", tail)]
    if "[" not in pattern:
        pieces += [("infix", piece) for piece in WILDCARDS.split(pattern)[1:-1]]
    return [(kind, text) for kind, text in pieces if text]


class GlobIndex:
    """Glob patterns of many rules, bucketed by one literal piece their matches must
    contain (`literal_pieces`), so that a string is tried only against the buckets
    whose piece it has: `*.example.ch` and `*.example.org` never cost each other time.

    `patterns` maps a rule's index to its glob patterns; `indices(text)` returns the
    set of the indices of the rules with a pattern matching `text`.
    """

    def __init__(self, patterns):
        pieces = {pattern: literal_pieces(pattern) for globs in patterns.values() for pattern in globs}
        shared = collections.Counter(piece for found in pieces.values() for piece in set(found))
        buckets = {"head": {}, "tail": {}, "infix": {}, "rest": {}}
        self.always = set()  # the rules with a pattern of only `*`: it matches any string
        for index, globs in patterns.items():
            for pattern in globs:
                if not pattern.strip("*"):
                    self.always.add(index)
                    continue
                # The piece fewest patterns share makes the smallest bucket (`*04.g*.example`:
                # `04.g`, not the `.example` of all its kind); on a tie the longer.
                kind, key = min(pieces[pattern], key=lambda piece: (shared[piece], -len(piece[1])),
                                default=("rest", ""))
                buckets[kind].setdefault(key, {}).setdefault(index, []).append(pattern)
        self.heads, self.tails, self.infixes = (
            {key: GlobSet(owners) for key, owners in buckets[kind].items()} for kind in ("head", "tail", "infix")
        )
        self.head_lengths = sorted({len(key) for key in self.heads})
        self.tail_lengths = sorted({len(key) for key in self.tails})
        self.rest = GlobSet(buckets["rest"][""]) if buckets["rest"] else None

    def indices(self, text):
        found = set(self.always)
        if self.rest:
            found.update(self.rest.indices(text))
        size = len(text)
        for length in self.head_lengths:
            if length > size:
                break
            globs = self.heads.get(text[:length])
            if globs:
                found.update(globs.indices(text))
        for length in self.tail_lengths:
            if length > size:
                break
            globs = self.tails.get(text[size - length:])
            if globs:
                found.update(globs.indices(text))
        for key, globs in self.infixes.items():
            if key in text:
                found.update(globs.indices(text))
        return found


class Matcher:
    """Select the rules that apply to a certificate; built once from the rules.

    `rules` is a sequence of rules.Rule (or anything with `match` and `domains` tuples
    of strings). `matching(name, domains)` returns the selecting rules in the order of
    `rules`, the same list as `[r for r in rules if r.selects(name, domains)]`.
    """

    def __init__(self, rules):
        self.rules = tuple(rules)
        self.exact_names = {}  # name -> {rule index}
        self.exact_domains = {}  # lowercased domain -> {rule index}
        self.below = {}  # lowercased parent domain -> {rule index}, for wildcard domains
        name_globs, domain_globs = {}, {}
        for index, rule in enumerate(self.rules):
            for pattern in rule.match:
                if is_glob(pattern):
                    name_globs.setdefault(index, []).append(pattern)
                else:
                    self.exact_names.setdefault(pattern, set()).add(index)
            for pattern in rule.domains:
                pattern = pattern.lower()
                if is_glob(pattern):
                    domain_globs.setdefault(index, []).append(pattern)
                    continue
                self.exact_domains.setdefault(pattern, set()).add(index)
                host, _, parent = pattern.partition(".")
                if host:  # `*.PARENT` covers HOST.PARENT (rules.domain_matches)
                    self.below.setdefault(parent, set()).add(index)
        self.name_globs = GlobIndex(name_globs)
        self.domain_globs = GlobIndex(domain_globs)

    def matching(self, name, domains):
        """Return the rules that select the certificate `name` covering `domains`
        (an iterable of strings), in the order the rules were given."""
        selected = set(self.exact_names.get(name, ()))
        selected.update(self.name_globs.indices(name))
        for domain in domains:
            domain = domain.lower()
            selected.update(self.exact_domains.get(domain, ()))
            if domain.startswith("*."):
                selected.update(self.below.get(domain[2:], ()))
            selected.update(self.domain_globs.indices(domain))
        return [self.rules[index] for index in sorted(selected)]


_cached = (None, None)  # (the Rules object, its Matcher): the one in use


def for_rules(rules):
    """Return the Matcher of the rules.Rules `rules`, built on first use and kept until
    another Rules object is asked for (a process uses one rules file at a time; the
    daemon's reload makes a new one). Each bucket's regex is compiled on its first use,
    so a run with nothing to match pays for none."""
    global _cached
    owner, matcher = _cached
    if owner is not rules:
        matcher = Matcher(rules.rules)
        _cached = (rules, matcher)
    return matcher
