"""The notification spool under the certbot config dir, written by a container.

Layout, all on one file system so that every move is an atomic rename(2):

    DIR/certrelay/queue/NAME         the hook publishes here (renamed in from tmp/)
    DIR/certrelay/tmp/               the hook's partial files
    DIR/certrelay/claimed/NAME@ID    taken by a run; kept here while an action fails
    DIR/certrelay/quarantine/...     entries that were not valid notifications

Everything here may be hostile: names are checked before use, files are opened without
following links or blocking, sizes are bounded, and contents are parsed strictly.
"""

import contextlib
import dataclasses
import errno
import functools
import os
import re
import stat
import time

from certrelay import files

# Names and domains end up as arguments of `run` commands: none may start with '-'.
# At most 235 characters: claimed/NAME@ID (a 19-digit ID) must fit in 255 bytes.
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,234}")
CLAIMED_NAME = re.compile(r"(?P<name>[A-Za-z0-9_][A-Za-z0-9._-]{0,234})@(?P<id>[0-9]{1,19})")
LABEL = r"[A-Za-z0-9_][A-Za-z0-9_-]{0,62}"
DOMAIN = re.compile(rf"(?=.{{1,253}}$)(\*\.)?{LABEL}(\.{LABEL})*")
MAX_SIZE = 64 * 1024
BAD_NAME = "the name is not [A-Za-z0-9._-]{1,235}, or starts with '.' or '-'"
REQUIRED_KEYS = ("version", "name", "lineage", "domains", "time")
STALE_AFTER = 86400  # seconds: a hook takes milliseconds, so a day-old temp file is a killed hook's


class NotADirectory(OSError):
    """A spool directory is a symbolic link or not a directory."""


class InvalidNotification(Exception):
    """A spool entry that is not a valid notification; the message says why."""


@dataclasses.dataclass(frozen=True)
class Notification:
    """One renewed certificate, as the hook announced it.

    `entry` is the file name in claimed/ (`NAME@ID`), unique per claim.
    """

    entry: str
    name: str
    lineage: str
    domains: tuple
    time: str


def parse(data, name, entry=None):
    """Parse the bytes of a notification file published under `name`.

    Return a `Notification`; raise InvalidNotification saying what is wrong. Keys this
    version does not know are ignored; the `name` inside must equal the file's name.
    """
    if len(data) > MAX_SIZE:
        raise InvalidNotification(f"larger than {MAX_SIZE} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidNotification("not UTF-8 text") from None
    values = {}
    for number, line in enumerate(text.split("\n"), start=1):
        if not line:
            continue
        key, separator, value = line.partition("=")
        if not separator or not key:
            raise InvalidNotification(f"line {number}: not a key=value line")
        if key in values:
            raise InvalidNotification(f"line {number}: key {key!r} given twice")
        values[key] = value
    missing = [key for key in REQUIRED_KEYS if key not in values]
    if missing:
        raise InvalidNotification(f"missing {', '.join(missing)}")
    if values["version"] != "1":
        raise InvalidNotification(f"unsupported version {values['version'][:20]!r}")
    if values["name"] != name:
        raise InvalidNotification(f"name {values['name'][:80]!r} does not match the file name")
    domains = tuple(values["domains"].split())
    for domain in domains:
        if not DOMAIN.fullmatch(domain):
            raise InvalidNotification(f"bad domain {domain[:80]!r}")
    import datetime  # only a batch with notifications pays for it

    try:
        datetime.datetime.fromisoformat(values["time"])
    except ValueError:
        raise InvalidNotification(f"time {values['time'][:40]!r} is not ISO 8601") from None
    if any(character in values["lineage"] for character in "\r\0"):
        raise InvalidNotification("lineage has a control character")
    return Notification(
        entry=entry or name, name=name, lineage=values["lineage"], domains=domains, time=values["time"]
    )


class Spool:
    """The spool directories of one certbot config dir.

    Use inside `opened()`: the directories are opened once, without following links
    (the container could replace one with a symlink to a host directory), and every
    operation is relative to those descriptors. Claiming and cleanup are meant to run
    under the state lock (one run at a time).
    """

    def __init__(self, config_dir):
        self.config_dir = config_dir
        self.root = os.path.join(config_dir, "certrelay")
        self.queue = os.path.join(self.root, "queue")
        self.claimed = os.path.join(self.root, "claimed")
        self.quarantine = os.path.join(self.root, "quarantine")
        self.descriptors = None  # {path: descriptor or None if missing} while opened
        self.repairs = []  # messages about spool directories that were not directories
        self.last_id = 0

    @contextlib.contextmanager
    def opened(self, create=False):
        """Open the spool directories for the `with` block (creating them if `create`).

        A spool directory that is a symbolic link or not a directory (the container
        replaced it) is never followed. With `create`, the entry itself is moved into
        quarantine/ and an empty directory made in its place, so that the path unit
        goes quiet; `repairs` then holds a message for each. Without `create`, it
        counts as missing and `repairs` says what would be done.
        """
        self.repairs, aside = [], []
        try:
            opened = [os.open(self.config_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)]
        except FileNotFoundError:
            if create:
                raise
            opened = [None]
        try:
            root = self._open_or_set_aside(opened[0], self.root, create, aside)
            opened.append(root)
            self.descriptors = {}
            # quarantine/ first: whatever is set aside is moved into it.
            for path in (self.quarantine, self.queue, self.claimed):
                self.descriptors[path] = self._open_or_set_aside(root, path, create, aside)
                opened.append(self.descriptors[path])
            for parent, aside_name, path, what in aside:
                self.repairs.append(self._quarantine_replaced(parent, aside_name, path, what))
            yield self
        finally:
            self.descriptors = None
            for descriptor in opened:
                if descriptor is not None:
                    os.close(descriptor)

    def _open_or_set_aside(self, parent, path, create, aside):
        """Return the descriptor of the spool directory `path` below `parent` (None if
        missing). If it is a link or not a directory: with `create`, rename it to a
        hidden name in `parent`, note that in `aside` and make a new directory; without,
        note what would be done in `repairs` and return None."""
        try:
            return open_directory(parent, path, create)
        except NotADirectory:
            pass
        name = os.path.basename(path)
        what = describe_entry(parent, name)
        if not create:
            self.repairs.append(f"would quarantine the spool directory {path}: it is {what}, not a directory")
            return None
        aside_name = f".{name}.replaced@{self._new_id()}"
        os.rename(name, aside_name, src_dir_fd=parent, dst_dir_fd=parent)
        aside.append((parent, aside_name, path, what))
        return open_directory(parent, path, create)

    def _quarantine_replaced(self, parent, aside_name, path, what):
        """Move a replaced spool directory set aside as `aside_name` into quarantine/;
        return the error message."""
        target = f"{os.path.basename(path)}@{self._new_id()}"
        quarantine = self.descriptors[self.quarantine]
        os.rename(aside_name, target, src_dir_fd=parent, dst_dir_fd=quarantine)
        os.fsync(quarantine)
        return (
            f"quarantined the spool directory {path}: it was {what}, not a directory (nothing was"
            f" followed or moved through it); kept as {os.path.join(self.quarantine, target)},"
            " and an empty directory made in its place"
        )

    def remove_stale_temporary(self, max_age=STALE_AFTER):
        """Delete what a killed hook left in tmp/: entries other than directories last
        modified more than `max_age` seconds ago. Never follows a link; a tmp/
        that is not a plain directory is left alone. Return the names removed."""
        try:
            root = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return []
        removed = []
        try:
            tmp = open_directory(root, os.path.join(self.root, "tmp"), False)
            if tmp is None:
                return []
            try:
                limit = time.time() - max_age
                for name in os.listdir(tmp):
                    try:  # a hook may rename its file into the queue at any moment
                        info = os.stat(name, dir_fd=tmp, follow_symlinks=False)
                        if not stat.S_ISDIR(info.st_mode) and info.st_mtime < limit:
                            os.unlink(name, dir_fd=tmp)
                            removed.append(name)
                    except FileNotFoundError:
                        continue
            finally:
                os.close(tmp)
        except NotADirectory:
            return []
        finally:
            os.close(root)
        return removed

    def pending_names(self):
        """Return the visible names waiting in the queue (for status and wake-ups)."""
        names = (os.fsdecode(name) for name in self._names(self.queue))
        return sorted(name for name in names if not name.startswith("."))

    def claimed_entries(self):
        """Return the entries in claimed/ (kept failures, or a crashed run's)."""
        return sorted(os.fsdecode(name) for name in self._names(self.claimed))

    def _names(self, path):
        """Return the raw names in the spool directory `path`, opening the spool for
        it unless it is open already."""
        if self.descriptors is not None:
            return list_names(self.descriptors[path])
        with self.opened():
            return list_names(self.descriptors[path])

    def claim(self):
        """Move every queue entry into claimed/, and read everything claimed.

        Return (notifications, problems): the valid notifications in claimed/ (this
        run's and those kept from earlier runs), and an error message for each entry
        that was quarantined instead.
        """
        queue, claimed = self.descriptors[self.queue], self.descriptors[self.claimed]
        problems = list(self.repairs)
        for raw_name in list_names(queue):
            if not NAME.fullmatch(raw_name.decode("latin-1")):
                problems.append(self._quarantine(self.queue, raw_name, BAD_NAME))
                continue
            # Not synced: a rename is atomic, so a power cut at worst leaves the entry in
            # the queue, and it is acted on again (at least once); syncing would delay
            # every action by two disk flushes.
            os.rename(raw_name, f"{raw_name.decode()}@{self._new_id()}", src_dir_fd=queue, dst_dir_fd=claimed)
        notifications = []
        for raw_name, result in self._read_all(self.claimed, CLAIMED_NAME):
            if isinstance(result, Notification):
                notifications.append(result)
            else:
                problems.append(self._quarantine(self.claimed, raw_name, result))
        return notifications, problems

    def peek(self):
        """Read what `claim` would take, moving nothing (for --dry-run and `explain`).

        Return (notifications, problems), problems saying what would be quarantined.
        """
        notifications, problems = [], list(self.repairs)
        for directory, pattern in ((self.claimed, CLAIMED_NAME), (self.queue, NAME)):
            for raw_name, result in self._read_all(directory, pattern):
                if isinstance(result, Notification):
                    notifications.append(result)
                else:
                    shown = repr(os.fsdecode(raw_name))[:120]
                    problems.append(f"would quarantine spool entry {shown} in {directory}: {result}")
        return notifications, problems

    def _read_all(self, directory, pattern):
        """Yield (raw name, Notification or the reason it is invalid) for `directory`,
        the files read ahead of their parsing (files.read_ahead)."""
        descriptor = self.descriptors[directory]
        names = sorted(list_names(descriptor))
        read = functools.partial(self._read_entry, descriptor, pattern)
        for raw_name, (entry, name, data) in files.read_ahead(names, read):
            if isinstance(data, str):
                yield raw_name, data
                continue
            try:
                yield raw_name, parse(data, name, entry)
            except InvalidNotification as error:
                yield raw_name, str(error)

    @staticmethod
    def _read_entry(descriptor, pattern, raw_name):
        """Return (entry, name, its bytes or the reason it is invalid) for `raw_name`."""
        found = pattern.fullmatch(raw_name.decode("latin-1"))
        if not found:
            return None, None, BAD_NAME if pattern is NAME else "not a name certrelay gives claimed entries"
        entry = raw_name.decode()
        try:
            data = files.read_regular(entry, descriptor, MAX_SIZE)
        except files.UnsafeFile as error:
            data = str(error)
        return entry, found.groupdict().get("name", entry), data

    def done(self, notification):
        """Delete a notification whose every action succeeded (or that nothing needs)."""
        try:
            os.unlink(notification.entry, dir_fd=self.descriptors[self.claimed])
        except FileNotFoundError:
            pass

    def _new_id(self):
        # Strictly increasing within the process: two claims of one name never collide.
        self.last_id = max(time.time_ns(), self.last_id + 1)
        return self.last_id

    def _quarantine(self, directory, raw_name, reason):
        """Move `raw_name` out of `directory` into quarantine/; return the error message."""
        source = raw_name
        if directory == self.claimed:
            raw_name = raw_name.partition(b"@")[0]  # name it as the queue entry it was
        safe = re.sub(rb"[^A-Za-z0-9._-]", b"_", raw_name)[:100].lstrip(b".").decode() or "entry"
        target = f"{safe}@{self._new_id()}"
        shown = repr(os.fsdecode(raw_name))[:120]
        quarantine = self.descriptors[self.quarantine]
        try:
            os.rename(source, target, src_dir_fd=self.descriptors[directory], dst_dir_fd=quarantine)
        except OSError as error:
            return f"invalid spool entry {shown} ({reason}) could not be quarantined: {error.strerror}"
        os.fsync(quarantine)
        return f"quarantined spool entry {shown}: {reason}; kept as {os.path.join(self.quarantine, target)}"


def open_directory(parent, path, create):
    """Open the directory named by the last component of `path` below the descriptor
    `parent`, never through a symbolic link; create it if it is missing and `create`.

    Return the descriptor, or None if it is missing and not `create`. Raise OSError if
    it is a symbolic link or not a directory.
    """
    if parent is None:
        return None
    name = os.path.basename(path)
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        try:
            return os.open(name, flags, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                return None
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o755, dir_fd=parent)
        return os.open(name, flags, dir_fd=parent)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            raise NotADirectory(error.errno, "is a symbolic link or not a directory; the spool must be"
                                " plain directories (remove it, certrelay recreates it)", path) from None
        raise


def describe_entry(parent, name):
    """Return what the entry `name` below the descriptor `parent` is, for a message,
    e.g. "a symbolic link to '/etc'"."""
    try:
        info = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except OSError as error:
        return f"unreadable ({error.strerror})"
    if stat.S_ISLNK(info.st_mode):
        return f"a symbolic link to {os.readlink(name, dir_fd=parent)[:200]!r}"
    return "a " + files.kind(info.st_mode)


def list_names(descriptor):
    """Return the entry names (bytes: they need not be UTF-8) of an open directory, or []."""
    return [] if descriptor is None else [os.fsencode(name) for name in os.listdir(descriptor)]
