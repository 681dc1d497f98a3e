"""Host-side state in the state dir (default /var/lib/certrelay), never in the spool.

- `lock`: one run at a time (cron, path unit and daemon share it). flock() is released
  by the kernel when its holder dies, so a killed run never leaves a deadlock.
- `progress.json`: {claimed entry: [action key]}, the actions of a kept notification
  that already succeeded, so that a retry repeats only what failed.
- `ledger.json`: {lineage name: SHA-256 of the DER of the live certificate last acted on},
  written only after every action for it succeeded; an unchanged certificate is not
  acted on again.
- `units.json`: {unit: time of its last action}, for the per-unit minimum interval.

A deleted state dir is rebuilt empty: the worst case is one extra action per unit.
"""

import contextlib
import fcntl
import json
import logging
import os

from certrelay import files

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def locked(state_dir):
    """Hold the state dir's lock for the `with` block, waiting for another holder."""
    path = os.path.join(state_dir, "lock")
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:  # the first run, or a deleted state dir
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("another certrelay run holds %s/lock; waiting for it", state_dir)
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


class Store:
    """One JSON object in the state dir: `data` (a dict), `save()` writes it atomically.

    With `tracked`, the owner sets `changed` when it changes `data` (a large cache
    then costs no comparison); otherwise `save()` compares with what was read.
    """

    def __init__(self, state_dir, name, tracked=False):
        self.path = os.path.join(state_dir, name)
        self.tracked, self.changed = tracked, False
        self.key = None  # stat_key() of the file `data` was read from or last saved to
        self.data, self.saved = {}, None
        self.refresh()

    def refresh(self, force=False):
        """Read the file again, unless it is the one last read or saved here (the same
        stat_key) and not `force`: another run may have replaced it meanwhile."""
        if self.key is not None and not force:
            try:
                if stat_key(os.stat(self.path)) == self.key:
                    return
            except OSError:
                pass  # gone or unreadable: reading says which
        self.changed, self.key = False, None
        try:
            with open(self.path, "rb") as file:  # bytes: json detects UTF-8, no text layer
                key = stat_key(os.fstat(file.fileno()))
                self.data = json.loads(file.read())
            if not isinstance(self.data, dict):
                raise ValueError("not a JSON object")
            self.key = key
        except FileNotFoundError:
            self.data = {}
        except (OSError, ValueError) as error:
            logger.warning("ignoring unreadable state file %s: %s", self.path, error)
            self.data = {}
        self.saved = None if self.tracked else json.dumps(self.data, sort_keys=True)

    def save(self):
        """Write `data`, if it changed, to a temp file, fsync it, rename it over the old one."""
        if not self.changed if self.tracked else json.dumps(self.data, sort_keys=True) == self.saved:
            return
        # Through dumps(), not indented: only that uses json's C encoder, ten times
        # faster than its Python one (a store holds an entry per lineage).
        content = json.dumps(self.data, sort_keys=True)
        self.key = stat_key(files.write_atomically(self.path, content.encode("utf-8"), 0o600))
        self.changed = False
        if not self.tracked:
            self.saved = content


class Stores:
    """The state files a batch reads and writes: `progress`, `unit_times`, `ledger`
    (a Store each). The daemon keeps one across batches and calls `refresh()` under
    the lock at the start of each: that rereads a file only if another run replaced
    it, or all three if the last batch did not reach `save()` (what it changed in
    memory is not on disk)."""

    def __init__(self, state_dir):
        self.progress, self.unit_times = (Store(state_dir, name) for name in ("progress.json", "units.json"))
        self.ledger = Store(state_dir, "ledger.json", tracked=True)  # one entry per lineage: large
        self.saved = True  # False from refresh() until save(): a batch is using them

    def refresh(self):
        for store in (self.progress, self.unit_times, self.ledger):
            store.refresh(force=not self.saved)
        self.saved = False

    def save(self):
        for store in (self.progress, self.ledger, self.unit_times):
            store.save()
        self.saved = True


def stat_key(info):
    """Return what tells one version of a state file from another: every save is a
    new file (a rename), so a new inode."""
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
