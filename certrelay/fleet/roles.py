"""`certrelay fleet roles`: the etcdctl lines an admin runs once as etcd's root, so
that certrelay itself never holds it. One role and user for the publisher (write
every host's lineages, read the acks), one per host (read its own lineages, write its
own acks). Prefixes end in "/": `mail/` must not grant `mail2/`.

etcdctl 3.4 exits when a flag repeats an ETCDCTL_* variable, so the lines use the
variables only: exported here, with the admin's own ETCDCTL_USER kept if set.
"""

import shlex

from certrelay.fleet import config as fleet_config

PUBLISHER = "certrelay-publisher"


def host_user(host):
    """The etcd user and role of fleet host `host` (its [subscribe] user)."""
    return f"certrelay-host-{host}"


def script(fleet):
    """Return the shell lines for the [fleet] `fleet` (a fleet.config.Fleet)."""
    quote = shlex.quote
    publisher = fleet.connection.user or PUBLISHER
    lines = [
        "# Run as etcd's root user where etcdctl reaches etcd. Once per cluster, if auth is not on yet:",
        "#   etcdctl user add root && etcdctl user grant-role root root && etcdctl auth enable",
        f"export ETCDCTL_ENDPOINTS={quote(','.join(fleet.connection.endpoints))}",
    ]
    if fleet.connection.ca_file:
        lines.append(f"export ETCDCTL_CACERT={quote(fleet.connection.ca_file)}")
    lines += ['export ETCDCTL_USER="${ETCDCTL_USER:-root}"', "",
              f"# The publisher: this host. Its password is in {fleet.connection.password_file or 'its password-file'}."]
    lines += grants(publisher, [("readwrite", fleet_config.PREFIX + "hosts/"), ("read", fleet_config.PREFIX + "acks/")],
                    fleet.connection.password_file or f"{publisher}.password")
    for host in fleet.hosts:
        user = host_user(host.name)
        password = f"{user}.password"
        lines += ["", f"# Host {host.name}: its [subscribe] has user = \"{user}\" and password-file = the file"
                      f" {password} made here: (umask 077; openssl rand -base64 24 > {password}),"
                      " then copied to that host (e.g. /etc/certrelay/fleet/etcd.password, mode 0600)."]
        lines += grants(user, [("read", fleet_config.lineages_prefix(host.name).rpartition("lineages/")[0]),
                               ("readwrite", fleet_config.acks_prefix(host.name))], password)
    return "\n".join(lines)


def grants(user, permissions, password_file):
    """Return the lines making role and user `user` with `permissions` [(kind, prefix)]."""
    quote = shlex.quote
    lines = [f"etcdctl role add {quote(user)}"]
    lines += [f"etcdctl role grant-permission {quote(user)} --prefix=true {kind} {quote(prefix)}"
              for kind, prefix in permissions]
    lines += [f"etcdctl user add {quote(user)} --interactive=false < {quote(password_file)}",
              f"etcdctl user grant-role {quote(user)} {quote(user)}"]
    return lines
