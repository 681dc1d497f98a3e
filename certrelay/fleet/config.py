"""The rules file's fleet tables: [fleet] with its [[fleet.host]]s on the certbot host,
[subscribe] on a fleet host. Parsed by rules.parse, which reports each problem as
FILE:LINE; the keys themselves are read when used (seal.py), so that a rules check
names a missing key file once, in words that say which command makes it.
"""

import dataclasses
import fnmatch
import os
import re

from certrelay import durations

PREFIX = "/certrelay/v1/"
# A host name is one etcd key component and an etcd user name's suffix: no '/', and
# nothing an RBAC prefix could confuse (FLEET.md: `mail/` must not match `mail2/`).
HOST_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
CONNECTION_KEYS = ("endpoints", "ca-file", "user", "password-file")
FLEET_KEYS = (*CONNECTION_KEYS, "signing-key", "ack-timeout", "host")
HOST_KEYS = ("name", "recipient", "match", "domains")
SUBSCRIBE_KEYS = (*CONNECTION_KEYS, "host", "identity", "publisher", "resync-interval")
ACK_TIMEOUT = (3600.0, 1.0, 30 * 86400.0)  # default, minimum, maximum, in seconds
RESYNC_INTERVAL = (3600.0, 10.0, 7 * 86400.0)


def lineages_prefix(host):
    """The etcd prefix the certbot host writes HOST's lineages under (HOST reads it)."""
    return f"{PREFIX}hosts/{host}/lineages/"


def acks_prefix(host):
    """The etcd prefix HOST writes its acknowledgements under."""
    return f"{PREFIX}acks/{host}/"


@dataclasses.dataclass(frozen=True)
class Connection:
    """How to reach etcd: endpoints, the CA of their certificates, user and password file."""

    endpoints: tuple
    ca_file: str = None
    user: str = None
    password_file: str = None

    def store(self, timeout=10.0):
        """Return a store.Store for this connection, reading the password file now.
        Raise store.StoreError saying which file cannot be read."""
        from certrelay.fleet import store

        password = None
        if self.password_file:
            try:
                with open(self.password_file, encoding="utf-8") as file:
                    password = file.read().strip("\n")
            except (OSError, UnicodeDecodeError) as error:
                raise store.StoreError(f"{self.password_file}: cannot read the etcd password: "
                                       f"{getattr(error, 'strerror', None) or error}") from None
        return store.Store(list(self.endpoints), self.ca_file, self.user, password, timeout)


@dataclasses.dataclass(frozen=True)
class Host:
    """One [[fleet.host]]: its name, its recipient key text and what it selects."""

    name: str
    recipient: str
    line: int
    match: tuple = ()
    domains: tuple = ()

    def selects(self, name, domains):
        """Return True if this host gets the certificate `name` covering `domains`
        (the same selectors as a [[rule]])."""
        from certrelay import rules

        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.match) or any(
            rules.domain_matches(pattern, domain) for pattern in self.domains for domain in domains)


@dataclasses.dataclass(frozen=True)
class Fleet:
    """The [fleet] table of the certbot host."""

    connection: Connection
    signing_key: str
    ack_timeout: float
    hosts: tuple

    def selecting(self, name, domains):
        """Return the names of the hosts that get certificate `name`, in file order."""
        return tuple(host.name for host in self.hosts if host.selects(name, domains))


@dataclasses.dataclass(frozen=True)
class Subscription:
    """The [subscribe] table of a fleet host."""

    connection: Connection
    host: str
    identity: str
    publisher: str
    resync_interval: float


class Parser:
    """Reads one fleet table; `problem(line, message)` reports, `line(key)` locates."""

    def __init__(self, table, what, known, line, problem, config_dir):
        self.table, self.what, self.line, self.problem, self.config_dir = table, what, line, problem, config_dir
        for key in table:
            if key not in known:
                problem(line(key), f"unknown key {key!r} in {what}; known: {', '.join(known)}")

    def text(self, key, required=True, pattern=None, example=None):
        value = self.table.get(key)
        if value is None:
            if required:
                self.problem(self.line(None), f"{self.what} needs {key} = {example}")
            return None
        if not isinstance(value, str) or not value or not value.isprintable() or (
                pattern is not None and not pattern.fullmatch(value)):
            self.problem(self.line(key), f"{self.what} {key} must be like {key} = {example}")
            return None
        return value

    def path(self, key, required=True):
        value = self.text(key, required, example=f'"/etc/certrelay/fleet/{key.replace("-file", "")}"')
        if value is None:
            return None
        if not os.path.isabs(value):
            self.problem(self.line(key), f"{self.what} {key} must be an absolute path")
            return None
        from certrelay import files

        if self.config_dir and files.is_inside(value, self.config_dir):
            self.problem(self.line(key), f"{self.what} {key} {value!r} is inside the certbot config dir"
                         f" {self.config_dir}, which the container can write; keep it in /etc/certrelay/fleet")
            return None
        return value

    def duration(self, key, limits):
        default, low, high = limits
        value = self.table.get(key, default)
        try:
            seconds = durations.parse_duration(value)
        except ValueError as error:
            self.problem(self.line(key), f"{self.what} {key}: {error}")
            return default
        if not low <= seconds <= high:
            self.problem(self.line(key), f"{self.what} {key} must be between {durations.format_duration(low)}"
                         f" and {durations.format_duration(high)}")
            return default
        return seconds

    def strings(self, key):
        value = self.table.get(key, [])
        if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
            self.problem(self.line(key), f"{self.what} {key} must be a list of non-empty strings")
            return ()
        return tuple(value)

    def connection(self):
        endpoints = self.strings("endpoints")
        if not endpoints:
            self.problem(self.line("endpoints"), f'{self.what} needs endpoints = ["https://etcd1.example.net:2379"]')
        from certrelay.fleet import store

        for url in endpoints:
            try:
                store.parse_endpoint(url)
            except ValueError as error:
                self.problem(self.line("endpoints"), str(error))
        ca_file = self.path("ca-file", required=any(url.startswith("https:") for url in endpoints))
        user = self.text("user", required=False, example='"certrelay-host-mail"')
        password_file = self.path("password-file", required=user is not None)
        if password_file and not user:
            self.problem(self.line("password-file"), f"{self.what} password-file needs user = \"...\" too")
        return Connection(endpoints, ca_file, user, password_file)


def nacl_missing(what, line, problem):
    """Report, and return True, if PyNaCl (seal.py) cannot be imported."""
    try:
        from certrelay.fleet import seal  # noqa: F401
    except ImportError as error:
        problem(line(None), f"{what} needs PyNaCl, which cannot be imported ({error}): apt-get install"
                " python3-nacl (or in a venv: pip install 'certrelay[fleet]')")
        return True
    return False


def parse_fleet(table, line, host_line, problem, config_dir=None):
    """Return the [fleet] `table` as a `Fleet`. `line(key)` locates a key of [fleet],
    `host_line(index, key)` one of the index-th [[fleet.host]]."""
    if nacl_missing("[fleet]", line, problem):
        return None
    if not isinstance(table, dict):
        problem(line(None), "'fleet' must be a table: [fleet]")
        return None
    parser = Parser(table, "[fleet]", FLEET_KEYS, line, problem, config_dir)
    connection = parser.connection()
    signing_key = parser.path("signing-key")
    ack_timeout = parser.duration("ack-timeout", ACK_TIMEOUT)
    tables = table.get("host", [])
    if not isinstance(tables, list) or not all(isinstance(item, dict) for item in tables):
        problem(line("host"), "'fleet.host' must be written as [[fleet.host]] tables")
        tables = []
    if not tables:
        problem(line(None), "[fleet] has no [[fleet.host]]: add one per host, with name, recipient and match")
    hosts, seen = [], {}
    for index, host_table in enumerate(tables):
        host = parse_host(host_table, lambda key, index=index: host_line(index, key), problem)
        if host is None:
            continue
        if host.name in seen:
            problem(host.line, f"[[fleet.host]] {host.name!r} is also on line {seen[host.name]}; name each host once")
        seen.setdefault(host.name, host.line)
        hosts.append(host)
    return Fleet(connection, signing_key, ack_timeout, tuple(hosts))


def parse_host(table, line, problem):
    """Return one [[fleet.host]] `table` as a `Host`, or None if it is unusable."""
    from certrelay.fleet import seal  # nacl: only rules with a fleet pay for it

    parser = Parser(table, "[[fleet.host]]", HOST_KEYS, line, problem, None)
    name = parser.text("name", pattern=HOST_NAME, example='"mail" (a-z, 0-9, "-", "_")')
    recipient = parser.text("recipient", example='"..." (printed by `certrelay fleet keygen` on that host)')
    if recipient is not None:
        try:
            seal.parse_recipient(recipient)
        except ValueError as error:
            problem(line("recipient"), f"[[fleet.host]] recipient: {error}")
            recipient = None
    match, domains = parser.strings("match"), parser.strings("domains")
    if not match and not domains:
        problem(line(None), "[[fleet.host]] selects nothing: add match = [...] (lineage names) or domains = [...]")
    if name is None or recipient is None:
        return None
    return Host(name, recipient, line(None), match, domains)


def parse_subscribe(table, line, problem, config_dir=None):
    """Return the [subscribe] `table` as a `Subscription`."""
    if nacl_missing("[subscribe]", line, problem):
        return None
    from certrelay.fleet import seal

    if not isinstance(table, dict):
        problem(line(None), "'subscribe' must be a table: [subscribe]")
        return None
    parser = Parser(table, "[subscribe]", SUBSCRIBE_KEYS, line, problem, config_dir)
    connection = parser.connection()
    host = parser.text("host", pattern=HOST_NAME, example='"mail" (this host\'s name in the fleet)')
    identity = parser.path("identity")
    publisher = parser.text("publisher", example='"..." (printed by `certrelay fleet init` on the certbot host)')
    if publisher is not None:
        try:
            seal.parse_publisher(publisher)
        except ValueError as error:
            problem(line("publisher"), f"[subscribe] publisher: {error}")
    resync = parser.duration("resync-interval", RESYNC_INTERVAL)
    return Subscription(connection, host, identity, publisher, resync)
