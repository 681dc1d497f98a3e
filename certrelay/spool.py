"""The notification spool under the certbot config dir, written by a container.

Layout, all on one file system so that every move is an atomic rename(2):

    DIR/certrelay/queue/NAME         the hook publishes here (renamed in from tmp/)
    DIR/certrelay/tmp/               the hook's partial files
    DIR/certrelay/claimed/NAME@ID    taken by a run; kept here while an action fails
    DIR/certrelay/quarantine/...     entries that were not valid notifications

Everything here may be hostile: names are checked before use, files are opened without
following links or blocking, sizes are bounded, and contents are parsed strictly.
"""

import dataclasses
import datetime
import logging
import os
import re
import stat
import time

logger = logging.getLogger(__name__)

# Names and domains end up as arguments of `run` commands: none may start with '-'.
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")
CLAIMED_NAME = re.compile(r"(?P<name>[A-Za-z0-9_][A-Za-z0-9._-]{0,254})@(?P<id>[0-9]{1,30})")
LABEL = r"[A-Za-z0-9_][A-Za-z0-9_-]{0,62}"
DOMAIN = re.compile(rf"(?=.{{1,253}}$)(\*\.)?{LABEL}(\.{LABEL})*")
MAX_SIZE = 64 * 1024
BAD_NAME = "the name is not [A-Za-z0-9._-]{1,255}, or starts with '.' or '-'"
REQUIRED_KEYS = ("version", "name", "lineage", "domains", "time")


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

    Claiming and cleanup are meant to run under the state lock (one run at a time).
    """

    def __init__(self, config_dir):
        self.config_dir = config_dir
        self.root = os.path.join(config_dir, "certrelay")
        self.queue = os.path.join(self.root, "queue")
        self.claimed = os.path.join(self.root, "claimed")
        self.quarantine = os.path.join(self.root, "quarantine")
        self.last_id = 0

    def pending_names(self):
        """Return the visible names waiting in the queue (for status and wake-ups)."""
        try:
            return sorted(name for name in os.listdir(self.queue) if not name.startswith("."))
        except FileNotFoundError:
            return []

    def claimed_count(self):
        """Return how many entries sit in claimed/ (kept failures, or a crashed run's)."""
        try:
            return len(os.listdir(self.claimed))
        except FileNotFoundError:
            return 0

    def claim(self):
        """Move every queue entry into claimed/, and read everything claimed.

        Return (notifications, problems): the valid notifications in claimed/ (this
        run's and those kept from earlier runs), and an error message for each entry
        that was quarantined instead.
        """
        for directory in (self.queue, self.claimed, self.quarantine):
            os.makedirs(directory, mode=0o755, exist_ok=True)
        problems = []
        for raw_name in list_names(self.queue):
            if not NAME.fullmatch(raw_name.decode("latin-1")):
                problems.append(self._quarantine(self.queue, raw_name, BAD_NAME))
                continue
            name = raw_name.decode()
            os.rename(os.path.join(self.queue, name), os.path.join(self.claimed, f"{name}@{self._new_id()}"))
        sync_directory(self.claimed)
        sync_directory(self.queue)
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
        notifications, problems = [], []
        for directory, pattern in ((self.claimed, CLAIMED_NAME), (self.queue, NAME)):
            for raw_name, result in self._read_all(directory, pattern):
                if isinstance(result, Notification):
                    notifications.append(result)
                else:
                    shown = repr(os.fsdecode(raw_name))[:120]
                    problems.append(f"would quarantine spool entry {shown} in {directory}: {result}")
        return notifications, problems

    def _read_all(self, directory, pattern):
        """Yield (raw name, Notification or the reason it is invalid) for `directory`."""
        for raw_name in sorted(list_names(directory)):
            found = pattern.fullmatch(raw_name.decode("latin-1"))
            if not found:
                yield raw_name, BAD_NAME if pattern is NAME else "not a name certrelay gives claimed entries"
                continue
            entry = raw_name.decode()
            name = found.groupdict().get("name", entry)
            try:
                yield raw_name, parse(read_regular_file(os.path.join(directory, entry)), name, entry)
            except InvalidNotification as error:
                yield raw_name, str(error)

    def done(self, notification):
        """Delete a notification whose every action succeeded (or that nothing needs)."""
        try:
            os.unlink(os.path.join(self.claimed, notification.entry))
        except FileNotFoundError:
            pass

    def _new_id(self):
        # Strictly increasing within the process: two claims of one name never collide.
        self.last_id = max(time.time_ns(), self.last_id + 1)
        return self.last_id

    def _quarantine(self, directory, raw_name, reason):
        """Move `raw_name` out of `directory` into quarantine/; return the error message."""
        source = os.path.join(os.fsencode(directory), raw_name)
        if directory == self.claimed:
            raw_name = raw_name.partition(b"@")[0]  # name it as the queue entry it was
        safe = re.sub(rb"[^A-Za-z0-9._-]", b"_", raw_name)[:100].lstrip(b".").decode() or "entry"
        target = os.path.join(self.quarantine, f"{safe}@{self._new_id()}")
        shown = repr(os.fsdecode(raw_name))[:120]
        try:
            os.rename(source, target)
        except OSError as error:
            return f"invalid spool entry {shown} ({reason}) could not be quarantined: {error.strerror}"
        sync_directory(self.quarantine)
        return f"quarantined spool entry {shown}: {reason}; kept as {target}"


def list_names(directory):
    """Return the entry names in `directory` as bytes (names need not be UTF-8)."""
    try:
        return [entry.name for entry in os.scandir(os.fsencode(directory))]
    except FileNotFoundError:
        return []


def read_regular_file(path, limit=MAX_SIZE):
    """Return the bytes of the regular file at `path`, at most `limit` of them.

    Never follow a symbolic link, never block on a FIFO, never open a device. Raise
    InvalidNotification if `path` is not a regular file or is larger than `limit`.
    """
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidNotification(f"not a regular file ({file_kind(info.st_mode)})")
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        raise InvalidNotification(f"cannot open: {error.strerror}") from None
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidNotification(f"not a regular file ({file_kind(info.st_mode)})")
        if info.st_size > limit:
            raise InvalidNotification(f"larger than {limit} bytes")
        data = os.read(descriptor, limit + 1)
        if len(data) > limit:
            raise InvalidNotification(f"larger than {limit} bytes")
        return data
    finally:
        os.close(descriptor)


def file_kind(mode):
    """Return a word for the kind of file `mode` describes."""
    for test, word in (
        (stat.S_ISLNK, "symbolic link"), (stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return word
    return "regular file"


def sync_directory(path):
    """fsync the directory `path`, so that renames in it survive a power loss."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
