"""The rules file: which certificates trigger which actions on the host.

Parse and validate a TOML rules file into `Rules`. Validation collects every problem
at once and reports each as `FILE:LINE: message`, so an admin fixes them in one pass.
"""

import dataclasses
import fnmatch
import os
import re
import tomllib

from certrelay import durations, files, matcher, placeholders

#: Unit actions, weakest first: per unit the strongest requested one wins.
UNIT_VERBS = ("reload", "reload-or-restart", "restart")
ACTION_KEYS = (*UNIT_VERBS, "run", "install", "verify")
RULE_KEYS = {"match", "domains", *ACTION_KEYS, "escalate", "precheck"}

#: `[settings]` durations: name -> (default, minimum, maximum), in seconds; a number
#: of seconds or a systemd-style text ("90s", "15min", "1h", "20d").
SETTINGS = {
    "timeout": (120.0, 1.0, 3600.0),  # per systemctl call or run command
    "settle": (5.0, 0.0, 600.0),  # watch: wait this long for more notifications
    "max-wait": (60.0, 0.0, 3600.0),  # watch: never hold a batch back longer
    "retry-min": (30.0, 0.1, 86400.0),  # watch: first retry of a failed action
    "retry-max": (3600.0, 0.1, 86400.0),  # watch: retry delay doubles up to this
    "min-interval": (60.0, 0.0, 86400.0),  # per unit: least time between actions
    "verify-timeout": (30.0, 1.0, 3600.0),  # keep probing endpoints this long after acting
    "reconcile-interval": (900.0, 10.0, 7 * 86400.0),  # watch: look for unannounced renewals
    "overdue-grace": (86400.0, 0.0, 30 * 86400.0),  # not renewed this long after certbot's policy: overdue
    "stopped-after": (2 * 86400.0, 3600.0, 30 * 86400.0),  # due this long, no attempt since: certbot stopped
}
#: `[settings]` expiry thresholds: a fraction of the lifetime, or a duration text.
THRESHOLDS = {"expiry-warning": 0.2, "expiry-critical": 0.1}

UNIT_TYPES = (
    "service", "socket", "target", "device", "mount", "automount", "swap",
    "timer", "path", "slice", "scope",
)
# systemd's unit_name_is_valid(), minus glob characters (systemctl would expand them)
# and minus a leading '-' (systemctl would read it as an option).
UNIT_NAME = re.compile(r"[A-Za-z0-9:_\\][A-Za-z0-9:_.\\-]*(@[A-Za-z0-9:_.\\-]+)?")
GLOB_CHARACTERS = set("*?[")


class RulesError(Exception):
    """The rules file cannot be used; `problems` lists every `FILE:LINE: message`."""

    def __init__(self, problems):
        super().__init__("\n".join(problems))
        self.problems = list(problems)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One `[[rule]]`: selectors, then what to do for a certificate it selects."""

    line: int
    match: tuple = ()
    domains: tuple = ()
    units: tuple = ()  # ((verb, unit), ...)
    run: tuple = ()  # (argv tuple, ...) with placeholders not yet filled in
    precheck: tuple = ()  # (argv tuple, ...): must succeed before the units get an action
    install: tuple = ()  # (install.Install, ...): done before commands and units
    verify: tuple = ()  # (endpoint.Endpoint, ...): must serve the live certificate afterwards
    escalate: bool = True  # restart reloaded units whose endpoint still serves the old one

    def selects(self, name, domains):
        """Return True if this rule applies to the certificate `name` covering `domains`."""
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.match):
            return True
        return any(
            domain_matches(pattern, domain) for pattern in self.domains for domain in domains
        )


@dataclasses.dataclass(frozen=True)
class Rules:
    """A validated rules file: its rules in file order, the settings, and the bytes they
    were read from (idle.py remembers those)."""

    path: str
    rules: tuple
    settings: dict
    data: bytes = b""
    alert: object = None  # alerts.Channels, or None without an [alert] table
    fleet: object = None  # fleet.config.Fleet: the certbot host publishes to these hosts
    subscribe: object = None  # fleet.config.Subscription: this host gets its lineages from a fleet

    def matching(self, name, domains):
        """Return the rules that select the certificate `name` covering `domains`, in
        file order (the same as each Rule.selects, through an index built once)."""
        return matcher.for_rules(self).matching(name, domains)

    def selects(self, name, domains):
        """Return True if a rule, or a fleet host this host publishes to, selects the
        certificate `name` covering `domains`: certrelay looks after it."""
        return bool(self.matching(name, domains)) or bool(self.fleet and self.fleet.selecting(name, domains))


def domain_matches(pattern, domain):
    """Return True if the rule pattern selects a certificate covering `domain`.

    Both are compared case-insensitively. A pattern is a glob on the domain name; a
    wildcard certificate domain `*.example.ch` also covers a plain pattern naming one
    host below it, like `mail.example.ch`.
    """
    pattern, domain = pattern.lower(), domain.lower()
    if fnmatch.fnmatchcase(domain, pattern):
        return True
    if domain.startswith("*.") and not GLOB_CHARACTERS & set(pattern):
        host, _, parent = pattern.partition(".")
        return bool(host) and parent == domain[2:]
    return False


def normalize_unit(unit):
    """Return the unit name systemd uses: `apache2` -> `apache2.service`."""
    return unit if unit.rpartition(".")[2] in UNIT_TYPES else unit + ".service"


def unit_problem(unit):
    """Return why systemd would reject the unit name `unit`, or None if it is valid."""
    if not unit:
        return "a unit name is empty"
    full = normalize_unit(unit)
    prefix = full.rpartition(".")[0]
    if len(full) > 255:
        return f"unit name {unit!r} is longer than 255 characters"
    if GLOB_CHARACTERS & set(unit):
        return f"unit name {unit!r} has a glob character; name each unit"
    if not prefix or not UNIT_NAME.fullmatch(prefix):
        return (
            f"unit name {unit!r} is not a valid systemd unit name"
            " (letters, digits, ':', '_', '.', '-', one '@' with an instance)"
        )
    return None


def load(path, check_permissions=None, config_dir=None):
    """Read and validate the rules file at `path`; return `Rules`.

    Check ownership and modes when `check_permissions` is true (default: when running
    as root); refuse a file inside `config_dir`, which the container can write. Raise
    RulesError listing every problem found.
    """
    if check_permissions is None:
        check_permissions = os.geteuid() == 0
    if config_dir is not None and files.is_inside(path, config_dir):
        raise RulesError([
            f"{path}: refused: the rules file is inside the certbot config dir {config_dir},"
            " which the container can write; move it, e.g. to /etc/certrelay/rules.toml"
        ])
    try:
        with open(path, "rb") as file:
            if check_permissions:
                problems = files.trust_problems(path, os.fstat(file.fileno()))
                if problems:
                    raise RulesError(problems)
            data = file.read()
    except OSError as error:
        raise RulesError([f"{path}: cannot read the rules file: {error.strerror}"]) from None
    return parse(data, path, config_dir)


def parse(data, path="rules.toml", config_dir=None):
    """Validate the TOML bytes `data` read from `path`; return `Rules`.

    `config_dir` is the certbot config dir, which no install destination may be
    inside. Raise RulesError with every problem, each as `PATH:LINE: message`.
    """
    try:
        text = data.decode("utf-8")
        document = tomllib.loads(text)
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise RulesError([f"{path}:{line}: the rules file is not UTF-8"]) from None
    except RecursionError:
        raise RulesError([f"{path}:1: TOML syntax: tables or arrays nested too deeply"]) from None
    except tomllib.TOMLDecodeError as error:
        found = re.search(r"\(at line (\d+), column (\d+)\)|\(at end of document\)", str(error))
        line = int(found.group(1)) if found and found.group(1) else max(1, len(text.rstrip("\n").split("\n")))
        message = str(error)[: found.start()].strip() if found else str(error)
        raise RulesError([f"{path}:{line}: TOML syntax: {message}"]) from None
    locator = Locator(text)
    problems = []

    def problem(line, message):
        problems.append(f"{path}:{line}: {message}")

    for key in document:
        if key not in ("rule", "settings", "alert", "fleet", "subscribe"):
            problem(locator.top_level(key), f"unknown table or key {key!r};"
                    " expected [[rule]], [settings], [alert], [fleet] or [subscribe]")
    settings = parse_settings(document.get("settings", {}), locator, problem)
    alert = None
    if "alert" in document:
        alert = parse_alert(document["alert"], lambda key: locator.key_in("alert", key), problem)
    fleet = subscribe = None
    if "fleet" in document or "subscribe" in document:
        from certrelay.fleet import config as fleet_config  # only rules with a fleet pay for it

        if "fleet" in document:
            fleet = fleet_config.parse_fleet(
                document["fleet"], lambda key: locator.key_in("fleet", key),
                lambda index, key: locator.nth_key("[[fleet.host]]", index, key), problem, config_dir)
        if "subscribe" in document:
            subscribe = fleet_config.parse_subscribe(
                document["subscribe"], lambda key: locator.key_in("subscribe", key), problem, config_dir)
    rule_tables = document.get("rule", [])
    if not isinstance(rule_tables, list) or not all(isinstance(t, dict) for t in rule_tables):
        problem(locator.top_level("rule"), "'rule' must be written as [[rule]] tables")
        rule_tables = []
    elif not rule_tables and fleet is None:  # a certbot host may only publish
        problem(1, "no [[rule]] tables (none written, or all commented out, as in the packaged file): nothing"
                   " would ever be done; add at least one rule (the packaged file's comments show an example)")
    rules = [parse_rule(table, index, locator, problem, config_dir) for index, table in enumerate(rule_tables)]
    duplicate_destinations(rules, problem)
    if problems:
        raise RulesError(problems)
    return Rules(path=path, rules=tuple(rules), settings=settings, data=bytes(data), alert=alert, fleet=fleet,
                 subscribe=subscribe)


def parse_settings(table, locator, problem):
    """Return the settings with defaults filled in; report bad values through `problem`.

    Durations become seconds (float), thresholds `durations.Threshold`s, `metrics` a
    path or None.
    """
    settings = {key: default for key, (default, _, _) in SETTINGS.items()}
    settings.update({key: durations.parse_threshold(value) for key, value in THRESHOLDS.items()})
    settings["metrics"] = None
    if not isinstance(table, dict):
        problem(locator.top_level("settings"), "'settings' must be a table: [settings]")
        return settings
    known = ", ".join([*SETTINGS, *THRESHOLDS, "metrics"])
    for key, value in table.items():
        line = locator.setting(key)
        if key in SETTINGS:
            _, low, high = SETTINGS[key]
            try:
                seconds = durations.parse_duration(value)
            except ValueError as error:
                problem(line, f"setting {key!r}: {error}")
                continue
            if not low <= seconds <= high:
                problem(line, f"setting {key!r} must be between {low:g} and {high:g} seconds")
            else:
                settings[key] = seconds
        elif key in THRESHOLDS:
            try:
                settings[key] = durations.parse_threshold(value)
            except ValueError as error:
                problem(line, f"setting {key!r}: {error}")
        elif key == "metrics":
            if not isinstance(value, str) or not os.path.isabs(value) or value.endswith("/"):
                problem(line, "setting 'metrics' must be the absolute path of a file, e.g."
                        ' metrics = "/var/lib/prometheus/node-exporter/certrelay.prom"')
            else:
                settings[key] = value
        else:
            problem(line, f"unknown setting {key!r}; known: {known}")
    if settings["max-wait"] < settings["settle"]:
        problem(locator.setting("max-wait"), "setting 'max-wait' must not be less than 'settle'")
    if settings["retry-max"] < settings["retry-min"]:
        problem(locator.setting("retry-max"), "setting 'retry-max' must not be less than 'retry-min'")
    warning, critical = settings["expiry-warning"], settings["expiry-critical"]
    if (warning.fraction is None) == (critical.fraction is None) and warning.seconds(1.0) < critical.seconds(1.0):
        problem(locator.setting("expiry-critical"),
                "setting 'expiry-critical' must not be more than 'expiry-warning'")
    return settings


def parse_alert(table, line, problem):
    """Return the [alert] `table` as alerts.Channels; report problems through
    `problem(line, message)`, `line(key)` giving a key's line."""
    from certrelay import alerts  # only rules files with alerts pay for it

    if not isinstance(table, dict):
        problem(line(None), "'alert' must be a table: [alert]")
        return alerts.Channels()
    for key in table:
        if key not in alerts.KEYS:
            problem(line(key), f"unknown key {key!r} in [alert]; known: {', '.join(alerts.KEYS)}")
    if not table:
        problem(line(None), "[alert] has no channel: add mail, command, apprise or ping, or drop the table")
    mail = table.get("mail", [])
    if not isinstance(mail, list) or not all(isinstance(address, str) and address and not address.startswith("-")
                                             and address.isprintable() and " " not in address for address in mail):
        problem(line("mail"), '[alert] mail must be a list of addresses, like mail = ["root"]')
        mail = []
    command = parse_commands("command", table.get("command", []), line("command"), problem,
                             placeholders_allowed=False)
    apprise = table.get("apprise", [])
    if not isinstance(apprise, list) or not all(isinstance(url, str) and "://" in url for url in apprise):
        problem(line("apprise"), '[alert] apprise must be a list of apprise URLs, like apprise = ["ntfy://host/topic"]')
        apprise = []
    ping = table.get("ping")
    if ping is not None and not (isinstance(ping, str) and ping.startswith(("https://", "http://"))
                                 and ping.isprintable()):
        problem(line("ping"), '[alert] ping must be an http(s) URL, like ping = "https://hc-ping.com/UUID"')
        ping = None
    return alerts.Channels(tuple(mail), command, tuple(apprise), ping)


def parse_rule(table, index, locator, problem, config_dir=None):
    """Return the `Rule` for the `index`th `[[rule]]` table; report problems through `problem`."""
    start = locator.rule(index)

    def line(key):
        return locator.rule_key(index, key)

    for key in table:
        if key not in RULE_KEYS:
            problem(line(key), f"unknown key {key!r} in [[rule]]; known: {', '.join(sorted(RULE_KEYS))}")

    def strings(key):
        value = table.get(key, [])
        if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
            problem(line(key), f"{key!r} must be a list of non-empty strings, like {key} = [\"example.ch\"]")
            return ()
        return tuple(value)

    match, domains = strings("match"), strings("domains")
    units = []
    for verb in UNIT_VERBS:
        for unit in strings(verb):
            reason = unit_problem(unit)
            if reason:
                problem(line(verb), reason)
            else:
                units.append((verb, normalize_unit(unit)))
    run = parse_commands("run", table.get("run", []), line("run"), problem)
    precheck = parse_commands("precheck", table.get("precheck", []), line("precheck"), problem)
    if precheck and not units:
        problem(line("precheck"), "'precheck' guards unit actions, but this rule has none; drop it or add one")
    verify = []
    if table.get("verify"):
        from certrelay import endpoint  # only rules with endpoints pay for it

        for text in strings("verify"):
            try:
                verify.append(endpoint.parse_endpoint(text))
            except endpoint.EndpointError as error:
                problem(line("verify"), f"verify endpoint {text[:200]!r}: {error}")
    escalate = table.get("escalate", True)
    if not isinstance(escalate, bool):
        problem(line("escalate"), "'escalate' must be true or false")
        escalate = True
    installs = parse_installs(table["install"], index, locator, problem, config_dir) if "install" in table else ()
    if not table.get("match") and not table.get("domains"):
        problem(start, "rule selects nothing: add match = [...] (lineage names) or domains = [...]")
    if not any(table.get(key) for key in ACTION_KEYS):
        problem(start, "rule has no action: add restart, reload, reload-or-restart, run, install or verify")
    return Rule(
        line=start, match=match, domains=domains, units=tuple(units), run=run, precheck=precheck,
        install=installs, verify=tuple(verify), escalate=escalate,
    )


def parse_installs(tables, index, locator, problem, config_dir):
    """Return the rule's `[[rule.install]]` tables as `install.Install`s; report problems."""
    from certrelay import install as install_module  # only rules with installs pay for it

    if not isinstance(tables, list):
        problem(locator.rule_key(index, "install"), "'install' must be written as [[rule.install]] tables")
        return ()
    installs = []
    for number, table in enumerate(tables):
        header = locator.install(index, number)
        parsed = install_module.parse_install(
            table, header, lambda key, number=number: locator.install_key(index, number, key), problem,
            config_dir,
        )
        if parsed is not None:
            installs.append(parsed)
    return tuple(installs)


def duplicate_destinations(rules, problem):
    """Report every install destination that more than one install writes."""
    first = {}
    for rule in rules:
        for install in rule.install:
            if install.dest in first:
                problem(install.line, f"install dest {install.dest!r} is also written by the install on line"
                        f" {first[install.dest]}; give each its own file")
            else:
                first[install.dest] = install.line


def parse_commands(key, value, line, problem, placeholders_allowed=True):
    """Return `run`, `precheck` or an alert's `command` (`key`) as a tuple of argv
    tuples; report problems through `problem`. Without `placeholders_allowed`, the
    arguments are taken as written."""
    example = f'{key} = [["/usr/local/bin/deploy-cert", "{{name}}"]]' if placeholders_allowed else \
        f'{key} = [["/usr/local/bin/page-me", "--urgent"]]'
    if not isinstance(value, list) or not all(isinstance(argv, list) for argv in value):
        problem(line, f"'{key}' must be a list of commands, each a list of strings: {example}")
        return ()
    commands = []
    for argv in value:
        if not argv or not all(isinstance(item, str) for item in argv):
            problem(line, f"each '{key}' command must be a non-empty list of strings: {example}")
            continue
        if not os.path.isabs(argv[0]):
            problem(line, f"{key} command {argv[0]!r} must be an absolute path (no PATH lookup, no shell)")
        for item in argv if placeholders_allowed else ():
            reason = placeholders.problem(item)
            if reason:
                problem(
                    line,
                    f"{key} argument {item!r} has {reason};"
                    " use {name}, {lineage} or {domains}, and {{ }} for literal braces",
                )
        commands.append(tuple(argv))
    return tuple(commands)


class Locator:
    """Find the line of a table or key in TOML text already known to be valid.

    tomllib gives no positions, so scan the lines; fall back to the enclosing table's
    line (or 1) for forms the scan does not know (dotted keys, inline tables).
    """

    TABLE = re.compile(r"\s*\[\s*([A-Za-z0-9_-]+)\s*\]\s*(#.*)?$")
    ARRAY_TABLE = re.compile(r"\s*\[\[\s*([A-Za-z0-9_-]+(?:\s*\.\s*[A-Za-z0-9_-]+)?)\s*\]\]\s*(#.*)?$")
    KEY = re.compile(r"\s*\"?([A-Za-z0-9_-]+)\"?\s*=")

    def __init__(self, text):
        # (line number, kind, name): kind is "table", "array" or "key"
        self.entries = []
        for number, line in enumerate(text.split("\n"), start=1):
            for kind, pattern in (("array", self.ARRAY_TABLE), ("table", self.TABLE), ("key", self.KEY)):
                found = pattern.match(line)
                if found:
                    self.entries.append((number, kind, found.group(1)))
                    break
        self.sections = []  # (start line, table name, keys {name: line})
        current = (1, None, {})
        for number, kind, name in self.entries:
            if kind == "key":
                current[2].setdefault(name, number)
            else:
                self.sections.append(current)
                name = re.sub(r"\s", "", name)
                current = (number, name if kind == "table" else "[[" + name + "]]", {})
        self.sections.append(current)
        self.by_name = {}  # table name -> its sections in file order: a fleet of 1,000 hosts asks 1,000 times
        for section in self.sections:
            self.by_name.setdefault(section[1], []).append(section)

    def top_level(self, name):
        for start, section, keys in self.sections:
            if section is None and name in keys:
                return keys[name]
            if section in (name, "[[" + name + "]]"):
                return start
        return 1

    def setting(self, key):
        return self.key_in("settings", key)

    def key_in(self, table, key):
        """The line of `key` in [table], else of [table] (`key` None: always), else 1."""
        for start, section, keys in self.sections:
            if section == table:
                return keys.get(key, start)
        return 1

    def _rule_section(self, index):
        return self._nth("[[rule]]", index)

    def _nth(self, name, index):
        found = self.by_name.get(name, [])
        return found[index] if index < len(found) else (1, None, {})

    def nth_key(self, name, index, key):
        """The line of `key` (None: the header) in the `index`th table `name` ("[[fleet.host]]")."""
        start, _, keys = self._nth(name, index)
        return keys.get(key, start) if key else start

    def _install_section(self, index, number):
        """The `number`th [[rule.install]] after the `index`th [[rule]] and before the next."""
        rule_start = self.rule(index)
        installs = []
        for start, section, keys in self.sections:
            if start > rule_start and section == "[[rule]]":
                break
            if start > rule_start and section == "[[rule.install]]":
                installs.append((start, section, keys))
        return installs[number] if number < len(installs) else (rule_start, None, {})

    def install(self, index, number):
        return self._install_section(index, number)[0]

    def install_key(self, index, number, key):
        start, _, keys = self._install_section(index, number)
        return keys.get(key, start)

    def rule(self, index):
        return self._rule_section(index)[0]

    def rule_key(self, index, key):
        start, _, keys = self._rule_section(index)
        return keys.get(key, start)
