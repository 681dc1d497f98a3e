"""Host-side state in the state dir (default /var/lib/certrelay), never in the spool.

- `lock`: one run at a time (cron, path unit and daemon share it). flock() is released
  by the kernel when its holder dies, so a killed run never leaves a deadlock.
- `progress.json`: for each kept notification, the actions that already succeeded, so
  a retry repeats only what failed.
"""

import contextlib
import fcntl
import json
import logging
import os

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def locked(state_dir):
    """Hold the state dir's lock for the `with` block, waiting for another holder."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    descriptor = os.open(os.path.join(state_dir, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("another certrelay run holds %s/lock; waiting for it", state_dir)
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def read_json(path, default):
    """Return the JSON value stored at `path`, or `default` if it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as error:
        logger.warning("ignoring unreadable state file %s: %s", path, error)
        return default


def write_json(path, value):
    """Store `value` as JSON at `path` atomically (temp file, fsync, rename)."""
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump(value, file, indent=1, sort_keys=True)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


class Progress:
    """Which actions of each kept notification already succeeded: {entry: [action key]}."""

    def __init__(self, state_dir):
        self.path = os.path.join(state_dir, "progress.json")
        self.done = {entry: set(keys) for entry, keys in read_json(self.path, {}).items()}

    def save(self, entries):
        """Store the progress of `entries` (the notifications still kept), dropping the rest."""
        kept = {entry: sorted(self.done.get(entry, ())) for entry in entries if self.done.get(entry)}
        if kept or os.path.exists(self.path):
            write_json(self.path, kept)
