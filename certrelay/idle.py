"""Whether `certrelay run` has anything to do, decided before the rest of certrelay loads.

Cron may start a run every minute, and nearly always nothing has changed; loading the
rules parser, logging and the batch would cost more than click itself. So a batch that
leaves nothing to do writes a memo, STATE_DIR/idle: what its outcome depended on
outside the state dir (the rules file's bytes, and the stat of live/ENTRY/cert.pem for
each entry of live/) and when the first expiry threshold falls due. A run that finds
the same inputs, an empty spool and no threshold due exits at once (`unchanged`), and
touches the memo: its mtime is the time of the last run. Anything else takes the full
batch, which writes the memo again, or removes it if something is left to do.

The memo is a cache in the host's state dir: deleting it costs one full batch. It is
marshal data, read only by the Python and certrelay versions that wrote it.
"""

import marshal
import os
import sys
import time

from certrelay import __version__, files

MEMO = "idle"
#: Spool directories that must be plain directories (what the batch repairs otherwise),
#: and those of them that must be empty (what the batch would claim or clean).
SPOOL_DIRECTORIES = ("quarantine", "queue", "claimed", "tmp")
EMPTY = ("queue", "claimed", "tmp")
MEMO_HELP = "see STATE_DIR/idle; --force or --dry-run looks anyway"
AT_LEAST_DAILY = 86400.0  # seconds: a memo is trusted this long at most
ATTEMPT = "*attempt"  # the inputs' key of certbot's last attempt record (no lineage name has a "*")


def attempt_key(spool):
    """Return what tells one SPOOL/attempt (the post hook's record) from another, or
    None if there is none; `spool` is a descriptor of the spool directory."""
    try:
        info = os.stat("attempt", dir_fd=spool, follow_symlinks=False)
    except FileNotFoundError:
        return None
    return [info.st_ino, info.st_size, info.st_mtime_ns]


def stat_key(live, name):
    """Return what changes when certbot renews NAME/cert.pem below the live/ descriptor
    `live`: the identity, size and times of the file its link leads to (a renewal
    links a new file). stat() opens nothing, so following the link here is safe;
    reading it is done by certificate.read_beneath."""
    info = os.stat(f"{name}/cert.pem", dir_fd=live)
    return [info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns]


def live_keys(live):
    """Return {entry: stat_key, or the errno of why it has none} for every entry of the
    live/ descriptor `live` (ENOTDIR: not a lineage, like certbot's README)."""
    keys = {}
    for name in os.listdir(live):
        try:
            keys[name] = stat_key(live, name)
        except OSError as error:
            keys[name] = error.errno
    return keys


def inputs(config_dir):
    """Return {entry: key} of `live_keys` for CONFIG_DIR/live ({} if it is missing or
    not a plain directory), or None if the spool is not idle: a spool directory is
    not a plain directory, or queue/, claimed/ or tmp/ has an entry."""
    directories = []
    try:
        directories.append(os.open(config_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        directories.append(open_plain(directories[0], "certrelay"))
        spool = directories[-1]
        for name in SPOOL_DIRECTORIES:
            try:
                directories.append(open_plain(spool, name))
            except FileNotFoundError:
                if name != "tmp":  # the hook makes tmp/; the batch makes the others
                    return None
                continue
            if name in EMPTY and os.listdir(directories[-1]):
                return None
        attempt = attempt_key(spool)
        try:
            directories.append(open_plain(directories[0], "live"))
        except OSError:
            return {ATTEMPT: attempt}
        return {**live_keys(directories[-1]), ATTEMPT: attempt}
    except OSError:
        return None
    finally:
        for descriptor in directories:
            os.close(descriptor)


def spool_attempt_key(config_dir):
    """attempt_key of CONFIG_DIR/certrelay, or None if the spool cannot be opened."""
    try:
        spool = os.open(os.path.join(config_dir, "certrelay"), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return attempt_key(spool)
    finally:
        os.close(spool)


def open_plain(parent, name):
    """Open the directory `name` below the descriptor `parent`, never through a link."""
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)


def unchanged(config_dir, rules_path, state_dir):
    """Return True if a batch would do nothing: the memo's rules bytes, config dir and
    lineages are still those, the spool is idle, no expiry threshold is due, and the rules
    file is still trusted (files.trust_problems, as root). Then touch the memo."""
    path = os.path.join(state_dir, MEMO)
    try:
        with open(path, "rb") as file:
            memo = marshal.load(file)
        if memo["version"] != [__version__, sys.hexversion] or memo["until"] <= time.time():
            return False
        if memo["config_dir"] != config_dir or memo["rules_path"] != rules_path:
            return False
        if files.is_inside(rules_path, config_dir):
            return False
        with open(rules_path, "rb") as file:
            if os.geteuid() == 0 and files.trust_problems(rules_path, os.fstat(file.fileno())):
                return False
            if file.read() != memo["rules"]:
                return False
        if inputs(config_dir) != memo["live"]:
            return False
        os.utime(path)
    except (OSError, EOFError, ValueError, TypeError, KeyError):
        return False  # no memo, or one this version cannot read: the full batch decides
    return True


def remember(state_dir, config_dir, rules, live, until):
    """Write the memo after a batch that left nothing to do: it validated `rules`
    (rules.Rules, with the bytes it was parsed from), saw `live` (`live_keys` of
    live/ before it began) and no expiry threshold falls due before `until`."""
    memo = {
        "version": [__version__, sys.hexversion], "config_dir": config_dir, "rules_path": rules.path,
        "rules": rules.data, "live": {**live, ATTEMPT: spool_attempt_key(config_dir)}, "until": until,
    }
    content = marshal.dumps(memo)
    path = os.path.join(state_dir, MEMO)
    try:
        with open(path, "rb") as file:
            if file.read() == content:
                os.utime(path)
                return
    except OSError:
        pass
    files.write_atomically(path, content, 0o600)


def forget(state_dir):
    """Remove the memo: the last batch left something to do."""
    try:
        os.unlink(os.path.join(state_dir, MEMO))
    except FileNotFoundError:
        pass


def last_checked(state_dir):
    """Return when a run last found nothing changed (the memo's mtime), or None."""
    try:
        return os.stat(os.path.join(state_dir, MEMO)).st_mtime
    except OSError:
        return None

