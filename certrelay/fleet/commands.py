"""The fleet's commands: `certrelay fleet keygen|init|roles|status` and `certrelay
subscribe`. Registered by cli.py; everything past click is imported when run."""

import sys

import click

from certrelay import cli

DEFAULT_IDENTITY = "/etc/certrelay/fleet/host.key"
DEFAULT_SIGNING_KEY = "/etc/certrelay/fleet/publisher.key"


def rules_or_none(rules_path, config_dir, table, key):
    """Return the rules if the file exists and is valid, else None. An invalid file that
    does not name the key's path ([`table`] `key`) is no reason to refuse making a key:
    the packaged rules.toml has no rule yet, and a fleet host makes its key before it
    writes [subscribe]. One that names it exits 2 with its problems, as every command."""
    import os
    import tomllib

    from certrelay import rules as rules_module

    if not os.path.exists(rules_path):
        return None
    try:
        return rules_module.load(rules_path, config_dir=config_dir)
    except rules_module.RulesError:
        try:
            with open(rules_path, "rb") as file:
                section = tomllib.load(file).get(table)
            if not (isinstance(section, dict) and key in section):
                return None
        except (OSError, tomllib.TOMLDecodeError):
            pass
    return cli.load_rules(rules_path, config_dir)


@click.group()
def fleet():
    """One certbot host, many hosts: keys, etcd roles and the fleet's state."""


@fleet.command()
@cli.common_options
@click.option("--key", "key_path", type=cli.FILE, default=None,
              help=f"Where to write the key (default: [subscribe] identity, else {DEFAULT_IDENTITY}).")
def keygen(config_dir, rules_path, state_dir, key_path):
    """Make this fleet host's key (X25519); print the recipient for its [[fleet.host]]."""
    make_key(key_path, rules_path, config_dir, ("subscribe", "identity", DEFAULT_IDENTITY), "new_identity",
             "recipient", "on the certbot host, give this host in its rules file:")


@fleet.command()
@cli.common_options
@click.option("--key", "key_path", type=cli.FILE, default=None,
              help=f"Where to write the key (default: [fleet] signing-key, else {DEFAULT_SIGNING_KEY}).")
def init(config_dir, rules_path, state_dir, key_path):
    """Make the certbot host's signing key (Ed25519); print the publisher key for
    every fleet host's [subscribe]."""
    make_key(key_path, rules_path, config_dir, ("fleet", "signing-key", DEFAULT_SIGNING_KEY), "new_signing_key",
             "publisher", "on every fleet host, give in [subscribe]:")


def make_key(key_path, rules_path, config_dir, where, maker, printed, then):
    """Write a new key made by seal.`maker` to `key_path`, else to the path the rules'
    table and key in `where` name, else to its default; print `printed = "..."`."""
    from certrelay.fleet import seal

    table, key, default = where
    rules = rules_or_none(rules_path, config_dir, table, key)
    section = getattr(rules, table) if rules else None
    path = key_path or (getattr(section, key.replace("-", "_")) if section else default)
    private, public = getattr(seal, maker)()
    write_key(path, private)
    cli.logger.info("wrote %s; %s", path, then)
    click.echo(f'{printed} = "{public}"')


def write_key(path, text):
    from certrelay.fleet import seal

    try:
        seal.write_key(path, text)
    except seal.KeyFileError as error:
        cli.logger.error("%s", error)
        sys.exit(cli.EXIT_CONFIG)


@fleet.command()
@cli.common_options
def roles(config_dir, rules_path, state_dir):
    """Print the etcdctl lines that make the publisher's and each host's user and role."""
    from certrelay.fleet import roles as roles_module

    rules = cli.load_rules(rules_path, config_dir)
    if not rules.fleet:
        cli.logger.error("%s has no [fleet] table: add it on the certbot host (certrelay-rules(5), FLEET)", rules_path)
        sys.exit(cli.EXIT_CONFIG)
    click.echo(roles_module.script(rules.fleet))


@fleet.command("status")
@cli.common_options
@click.option("--json", "as_json", is_flag=True, help="Print the state as JSON.")
@click.option("--nagios", is_flag=True, help="Print as a Nagios/Icinga plugin; exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.")
def fleet_status(config_dir, rules_path, state_dir, as_json, nagios):
    """Show per host and lineage what was published and what the host acknowledges
    serving. Exit 0 when every host serves what was published, 1 when not, 2 on a
    configuration error or when etcd cannot be read."""
    from certrelay.fleet import report

    rules = cli.load_rules(rules_path, config_dir)
    if not rules.fleet:
        cli.logger.error("%s has no [fleet] table: `fleet status` runs on the certbot host", rules_path)
        sys.exit(cli.EXIT_CONFIG)
    rows, error = report.collect(rules.fleet, config_dir, state_dir)
    if nagios:
        code, text = report.nagios(rows, error)
        click.echo(text)
        sys.exit(code)
    if error:
        cli.logger.error("%s", error)
        sys.exit(cli.EXIT_CONFIG)
    click.echo(report.as_json(rows) if as_json else report.table(rows))
    sys.exit(cli.EXIT_OK if all(row["state"] == "current" for row in rows) else cli.EXIT_INCOMPLETE)


@click.command()
@cli.common_options
@click.option("--once", is_flag=True, help="Read everything once, install, acknowledge, and exit.")
def subscribe(config_dir, rules_path, state_dir, once):
    """Take this host's certificates from the fleet's etcd (systemd Type=notify).

    Exit 0 when done (--once: nothing refused), 1 when a value was refused or etcd
    could not be read (--once), 2 on a configuration error."""
    import os
    import signal

    from certrelay.fleet import seal, store, subscribe as subscribe_module

    rules = cli.load_rules(rules_path, config_dir)
    if not rules.subscribe:
        cli.logger.error("%s has no [subscribe] table: add it on a fleet host (certrelay-rules(5), FLEET)",
                         rules_path)
        sys.exit(cli.EXIT_CONFIG)
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    subscriber = subscribe_module.Subscriber(rules.subscribe, config_dir, state_dir)
    try:
        subscriber.load_keys()
        if once:
            refused = subscriber.once()
            sys.exit(cli.EXIT_INCOMPLETE if refused else cli.EXIT_OK)
        from certrelay.watch import SystemdNotify

        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, lambda *_: subscriber.stop())
        subscriber.run(SystemdNotify())
    except (seal.KeyFileError, ValueError) as error:
        cli.logger.error("%s", error)
        sys.exit(cli.EXIT_CONFIG)
    except (store.StoreError, OSError) as error:
        cli.logger.error("fleet: %s", error)
        sys.exit(cli.EXIT_INCOMPLETE)


def check_problems(rules):
    """Return what `certrelay check` finds wrong with the fleet tables of `rules`:
    keys that cannot be read, etcd that cannot be reached with the credentials, and
    a host that can read more than its own prefix (its role grants too much)."""
    from certrelay.fleet import config as fleet_config, publish, seal, store

    problems = []
    timeout = publish.STORE_TIMEOUT  # not the systemctl timeout: check must not hang on a firewall
    for table, connection, key_file, load, own in (
            ("[fleet]", rules.fleet and rules.fleet.connection, rules.fleet and rules.fleet.signing_key,
             seal.load_signing_key, fleet_config.PREFIX + "hosts/"),
            ("[subscribe]", rules.subscribe and rules.subscribe.connection,
             rules.subscribe and rules.subscribe.identity, seal.load_identity,
             rules.subscribe and fleet_config.lineages_prefix(rules.subscribe.host))):
        if connection is None:
            continue
        try:
            load(key_file)
        except seal.KeyFileError as error:
            problems.append(f"{table}: {error}")
        try:
            client = connection.store(timeout)
            client.range(own, keys_only=True)
            cli.logger.info("%s: etcd answers at %s; %s is readable", table, client.endpoint, own)
            if table == "[subscribe]":
                other = fleet_config.PREFIX + "hosts/"
                try:
                    client.range(other, keys_only=True)
                    problems.append(f"[subscribe]: user {connection.user!r} may read all of {other}, other hosts'"
                                    " values too: give it only its own prefix (certrelay fleet roles)")
                except store.Denied:
                    cli.logger.info("[subscribe]: other hosts' values are refused to %s, as they must be",
                                    connection.user)
        except store.StoreError as error:
            problems.append(f"{table}: {error}")
    return problems
