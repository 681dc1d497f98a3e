"""Work out what to do for a batch of notifications: pure, no side effects.

Every rule that selects a certificate applies. Each unit gets one action per batch,
the strongest asked for (restart > reload-or-restart > reload); identical `run`
commands run once. Commands run first (they may prepare files a service reads), then
unit actions, each in the order the rules file first names them.
"""

import dataclasses
import json
import os

from certrelay import rules as rules_module

NAMES_SHOWN = 10


@dataclasses.dataclass(frozen=True)
class Action:
    """One thing to do: `verb` is a unit verb or "run"; `target` a unit or an argv tuple.

    `certificates` names the certificates it is done for, for the log.
    """

    verb: str
    target: object
    certificates: tuple

    @property
    def key(self):
        """Return the action's identity: one per unit, one per distinct argv."""
        return action_key(self.verb, self.target)

    def describe(self):
        """Return e.g. "restart dovecot.service (herzbube.ch)", naming at most
        NAMES_SHOWN certificates (a batch of thousands would make a huge log line)."""
        target = " ".join(self.target) if self.verb == "run" else self.target
        names = ", ".join(self.certificates[:NAMES_SHOWN])
        if len(self.certificates) > NAMES_SHOWN:
            names += f" and {len(self.certificates) - NAMES_SHOWN} more"
        return f"{self.verb} {target} ({names})"


@dataclasses.dataclass
class Plan:
    """The actions of a batch, and what each notification waits for.

    `needs` maps a notification's entry to the keys of the actions it needs; a
    notification is done when all of them succeeded. `unmatched` lists notifications
    that no rule selects.
    """

    actions: list
    needs: dict
    unmatched: list


def action_key(verb, target):
    """Return the key of an action (a string, so that it can be stored as JSON)."""
    return "run:" + json.dumps(list(target)) if verb == "run" else "unit:" + target


def make_plan(notifications, rules, config_dir, done=None):
    """Return the `Plan` for `notifications` under `rules`.

    `done` maps an entry to the action keys that already succeeded for it in an
    earlier run; those are not needed again. `config_dir` fills the {lineage}
    placeholder with the host's path of the live directory.
    """
    done = done or {}
    strength = {verb: index for index, verb in enumerate(rules_module.UNIT_VERBS)}
    units = {}  # unit -> [verb, {certificate name}]
    commands = {}  # argv -> {certificate name}
    needs = {}
    unmatched = []
    for notification in notifications:
        matching = rules.matching(notification.name, notification.domains)
        if not matching:
            unmatched.append(notification)
            continue
        needed = set()
        values = placeholder_values(notification, config_dir)
        for rule in matching:
            for verb, unit in rule.units:
                key = action_key(verb, unit)
                if key in done.get(notification.entry, ()):
                    continue
                needed.add(key)
                entry = units.setdefault(unit, [verb, set()])
                if strength[verb] > strength[entry[0]]:
                    entry[0] = verb
                entry[1].add(notification.name)
            for template in rule.run:
                argv = tuple(item.format_map(values) for item in template)
                key = action_key("run", argv)
                if key in done.get(notification.entry, ()):
                    continue
                needed.add(key)
                commands.setdefault(argv, set()).add(notification.name)
        needs[notification.entry] = needed
    first_named = {}  # unit -> index of its first mention in the rules file
    for rule in rules.rules:
        for _, unit in rule.units:
            first_named.setdefault(unit, len(first_named))
    actions = [Action("run", argv, tuple(sorted(names))) for argv, names in commands.items()]
    actions += [
        Action(verb, unit, tuple(sorted(names)))
        for unit, (verb, names) in sorted(units.items(), key=lambda item: first_named[item[0]])
    ]
    return Plan(actions=actions, needs=needs, unmatched=unmatched)


def placeholder_values(notification, config_dir):
    """Return the values of {name}, {lineage} and {domains} for a notification."""
    return {
        "name": notification.name,
        "lineage": os.path.join(config_dir, "live", notification.name),
        "domains": " ".join(notification.domains),
    }
