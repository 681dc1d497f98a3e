"""Work out what to do for a batch of notifications: pure, no side effects.

Every rule that selects a certificate applies. Each unit gets one action per batch,
the strongest asked for (restart > reload-or-restart > reload); identical `run` and
`precheck` commands run once; each fleet host (fleet/publish.py) gets one "publish" of
the certificates it is given. Order: installs (files a service will read), then `run`
commands, then prechecks, then publishing, then unit actions, each in the order the
rules file first names them. A unit's action requires that every install and precheck of the rules
asking for it succeeded; a rule's commands require its installs. Endpoints to verify
afterwards are listed per notification.
"""

import dataclasses
import json

from certrelay import endpoint as endpoint_module, placeholders, rules as rules_module

NAMES_SHOWN = 10
#: The order actions run in; unit actions (any verb) come last, in rules-file order.
STAGE = {"install": 0, "run": 1, "precheck": 2, "publish": 3}
#: Unit verbs by strength: per unit the strongest one asked for wins.
STRENGTH = {verb: index for index, verb in enumerate(rules_module.UNIT_VERBS)}


@dataclasses.dataclass(frozen=True)
class Action:
    """One thing to do: `verb` is a unit verb, "run", "precheck", "install" or
    "publish"; `target` a unit, an argv tuple, a destination path or a fleet host.

    `certificates` names the certificates it is done for, for the log; `requires`
    holds the keys of actions that must have succeeded first; `payload` is what an
    install needs: (install.Install, lineage name, placeholder values).
    """

    verb: str
    target: object
    certificates: tuple
    requires: frozenset = frozenset()
    payload: tuple = dataclasses.field(default=None, compare=False)

    @property
    def key(self):
        """Return the action's identity: one per unit, per distinct argv, per destination."""
        return action_key(self.verb, self.target)

    def describe(self):
        """Return e.g. "restart dovecot.service (herzbube.ch)", naming at most
        NAMES_SHOWN certificates (a batch of thousands would make a huge log line)."""
        if self.verb == "install":
            install, _, values = self.payload
            return f"{install.describe(values)} ({self.certificates[0]})"
        target = " ".join(self.target) if self.verb in ("run", "precheck") else self.target
        names = ", ".join(self.certificates[:NAMES_SHOWN])
        if len(self.certificates) > NAMES_SHOWN:
            names += f" and {len(self.certificates) - NAMES_SHOWN} more"
        return f"{self.verb} {target} ({names})"


@dataclasses.dataclass(frozen=True)
class Check:
    """One endpoint to verify for one certificate: it must serve the live certificate
    of `name`. `units` are the (verb, unit) pairs of the rule that lists it, for the
    log and for escalation; `actions` the keys of that rule's actions, rerun when the
    check fails."""

    name: str
    endpoint: object  # endpoint.Endpoint
    server_name: str
    units: tuple
    escalate: bool
    actions: frozenset

    @property
    def key(self):
        return "verify:" + self.endpoint.url + "#" + (self.server_name or "")


@dataclasses.dataclass
class Plan:
    """The actions of a batch, and what each notification waits for.

    `needs` maps a notification's entry to the keys of the actions and checks it
    needs; a notification is done when all of them succeeded. `checks` maps an entry
    to its `Check`s. `unmatched` lists notifications that no rule selects.
    """

    actions: list
    needs: dict
    unmatched: list
    checks: dict = dataclasses.field(default_factory=dict)


def action_key(verb, target):
    """Return the key of an action (a string, so that it can be stored as JSON)."""
    if verb in ("run", "precheck"):
        return verb + ":" + json.dumps(list(target))
    if verb in ("install", "publish"):
        return verb + ":" + target
    return "unit:" + target


def make_plan(notifications, rules, config_dir, done=None):
    """Return the `Plan` for `notifications` under `rules`.

    `done` maps an entry to the keys that already succeeded for it in an earlier run;
    those are not needed again. `config_dir` fills the {lineage} placeholder with the
    host's path of the live directory.
    """
    done = done or {}
    builder = Builder()
    needs, checks, unmatched = {}, {}, []
    for notification in notifications:
        matching = rules.matching(notification.name, notification.domains)
        hosts = rules.fleet.selecting(notification.name, notification.domains) if rules.fleet else ()
        if not matching and not hosts:
            unmatched.append(notification)
            continue
        already = set(done.get(notification.entry, ()))
        values = placeholders.values(notification, config_dir)
        needed = {builder.add_publish(host, notification.name, already) for host in hosts}
        found = []
        for rule in matching:
            keys = builder.add_rule(rule, notification.name, values, already)
            needed |= keys
            for endpoint in rule.verify:
                check = Check(
                    notification.name, endpoint, endpoint_module.server_name(endpoint, notification.domains),
                    rule.units, rule.escalate, frozenset(keys),
                )
                found.append(check)
                needed.add(check.key)
        needs[notification.entry] = needed - already
        checks[notification.entry] = [check for check in found if check.key not in already]
    actions = builder.actions(rules, needs)
    return Plan(actions=actions, needs=needs, unmatched=unmatched, checks=checks)


class Builder:
    """Collects the actions of a batch, merged across notifications and rules."""

    def __init__(self):
        self.units = {}  # unit -> [verb, {certificate}, {required key}, {needed by entry}]
        self.others = {}  # key -> [verb, target, {certificate}, {required key}, payload]

    def add_rule(self, rule, name, values, already=()):
        """Add what `rule` asks for certificate `name`, except the keys in `already`
        (done in an earlier run); return the keys of all the rule's actions."""
        keys = set()
        installs, prechecks = set(), set()
        # Most rules only name units: skip what they do not have.
        if rule.install:
            installs = {
                self._other("install", install.destination(values), name, (), already, (install, name, values))
                for install in rule.install
            }
            keys |= installs
        if rule.run:
            keys |= {self._other("run", placeholders.fill(argv, values), name, installs, already) for argv in rule.run}
        if rule.precheck:
            prechecks = {self._other("precheck", placeholders.fill(argv, values), name, installs, already) for argv in rule.precheck}
            keys |= prechecks
        requires = installs | prechecks
        for verb, unit in rule.units:
            key = action_key(verb, unit)
            keys.add(key)
            if key in already:
                continue
            entry = self.units.get(unit)
            if entry is None:
                entry = self.units[unit] = [verb, set(), set()]
            elif STRENGTH[verb] > STRENGTH[entry[0]]:
                entry[0] = verb
            entry[1].add(name)
            entry[2] |= requires
        return keys

    def add_publish(self, host, name, already=()):
        """Add publishing certificate `name` to the fleet `host`; return the key."""
        return self._other("publish", host, name, (), already)

    def _other(self, verb, target, name, requires, already, payload=None):
        """Add a non-unit action for certificate `name` (unless in `already`); return its key."""
        key = action_key(verb, target)
        if key not in already:
            entry = self.others.setdefault(key, [verb, target, set(), set(), payload])
            entry[2].add(name)
            entry[3] |= set(requires)
        return key

    def actions(self, rules, needs):
        """Return the actions that some notification still needs, in STAGE order."""
        wanted = set().union(*needs.values()) if needs else set()
        first_named = {}  # unit -> index of its first mention in the rules file
        for rule in rules.rules:
            for _, unit in rule.units:
                first_named.setdefault(unit, len(first_named))
        found = [
            Action(verb, target, tuple(sorted(names)), frozenset(requires), payload)
            for key, (verb, target, names, requires, payload) in self.others.items() if key in wanted
        ]
        found += [
            Action(verb, unit, tuple(sorted(names)), frozenset(requires))
            for unit, (verb, names, requires) in sorted(self.units.items(), key=lambda item: first_named[item[0]])
            if action_key(verb, unit) in wanted
        ]
        # Stable: units keep the order of the rules file.
        return sorted(found, key=lambda action: STAGE.get(action.verb, len(STAGE)))
