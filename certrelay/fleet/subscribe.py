"""A fleet host's side: take this host's lineages from etcd, install them, acknowledge.

`certrelay subscribe` reads the whole prefix /certrelay/v1/hosts/HOST/lineages/, then
watches it from that revision; after any error, cancel or compaction, and every
`resync-interval`, it reads it all again (etcd 3.4 can lose watch events around a
compaction: FLEET.md). Each value is opened and checked (seal.py; and not older than
what this host has); a good one becomes the lineage in certbot's layout under the
config dir, switched in one rename:

    live/NAME/cert.pem -> ../../archive/NAME/current/cert.pem  (and chain, fullchain, privkey)
    archive/NAME/current -> SEQUENCE                        (the one rename)
    archive/NAME/SEQUENCE/{cert,chain,fullchain,privkey}.pem

so no reader finds a new certificate beside an old key. It then drops an ordinary
notification into the spool: the host's own certrelay (path unit or daemon) installs,
restarts and verifies as for a local renewal. This process restarts nothing; it reads
that certrelay's outcome from STATE_DIR (ledger.json, status.json) and puts it back as
the acknowledgement /certrelay/v1/acks/HOST/NAME.

STATE_DIR/fleet-subscriber.json: {"lineages": {name: {sequence, fingerprint,
not_before, revision}}, "refused": {name: {revision, reason}}, "acked": {name: ack}}.
"""

import datetime
import fcntl
import json
import logging
import os
import queue
import threading
import time

from certrelay import certinfo, files, spool, state
from certrelay.fleet import config as fleet_config

logger = logging.getLogger(__name__)

FILES = ("cert.pem", "chain.pem", "fullchain.pem", "privkey.pem")
KEEP_GENERATIONS = 2  # the current one and the one before (a daemon may still hold it open)
PENDING_TICK = 0.1  # seconds between looks at the host's outcome while an ack waits for it (briefly)
IDLE_TICK = 30.0  # seconds between wake-ups otherwise (the watchdog wants less: see run)
RETRY = (1.0, 60.0)  # first and longest wait before reaching etcd again
STORE_TIMEOUT = 15.0  # seconds per etcd request: well under the unit's WatchdogSec=60s


class Subscriber:
    """One fleet host's subscription (fleet.config.Subscription) into `config_dir`."""

    def __init__(self, subscription, config_dir, state_dir, timeout=STORE_TIMEOUT):
        self.subscription, self.config_dir, self.state_dir = subscription, config_dir, state_dir
        self.prefix = fleet_config.lineages_prefix(subscription.host)
        self.ack_prefix = fleet_config.acks_prefix(subscription.host)
        self.timeout = timeout
        self.memory = state.Store(state_dir, "fleet-subscriber.json")
        for key in ("lineages", "refused", "acked"):
            if not isinstance(self.memory.data.get(key), dict):
                self.memory.data[key] = {}
        self.store = None
        self.keys = None  # (identity, publisher key), read once
        self.refusals = 0  # in this process, for `--once`'s exit status
        self.stopping = threading.Event()
        self.events = queue.Queue()  # from the watch's thread: lists of events, an error, or None (ended)

    # --- one value ----------------------------------------------------------------

    def load_keys(self):
        """Read the identity and the publisher key; raise seal.KeyFileError or ValueError."""
        from certrelay.fleet import seal

        if self.keys is None:
            self.keys = (seal.load_identity(self.subscription.identity),
                         seal.parse_publisher(self.subscription.publisher))
        return self.keys

    def apply(self, kv):
        """Install the lineage in the etcd KeyValue `kv` if it is good and new; refuse
        (log, remember, acknowledge) it otherwise. Return True if installed."""
        from certrelay.fleet import seal

        name = kv.key[len(self.prefix):]
        lineages = self.memory.data["lineages"]
        have = lineages.get(name)
        if have and have.get("revision") == kv.mod_revision:
            return False  # a resync reads what this host already has
        if self.memory.data["refused"].get(name, {}).get("revision") == kv.mod_revision:
            return False  # refused already, and said so
        if not spool.NAME.fullmatch(name):
            return self.refuse(name[:80], kv, "its name is not a lineage name certrelay accepts ([A-Za-z0-9._-])")
        identity, publisher = self.load_keys()
        try:
            opened = seal.open_value(identity, publisher, self.subscription.host, name, kv.value)
            info = certinfo.from_pem(opened.files["cert.pem"])
        except seal.Refused as refused:
            return self.refuse(name, kv, refused.reason)
        except certinfo.CertificateParseError as error:
            return self.refuse(name, kv, f"its certificate cannot be read: {error}")
        if have:
            if opened.sequence <= have.get("sequence", 0) and not (
                    opened.sequence == have.get("sequence") and opened.fingerprint == have.get("fingerprint")):
                return self.refuse(name, kv, f"replayed: its sequence {opened.sequence} is not newer than"
                                             f" {have.get('sequence')}, which this host has")
            if info.not_before < have.get("not_before", 0):
                return self.refuse(name, kv, "its certificate is older than the one this host has"
                                             f" (issued {utc(info.not_before)}, this host's {utc(have['not_before'])})")
        if have and opened.fingerprint == have.get("fingerprint"):
            # Published again (a catch-up after a crash, a store restored): nothing to do.
            have.update(sequence=opened.sequence, revision=kv.mod_revision)
            self.memory.data["refused"].pop(name, None)  # a refusal before it no longer stands
            self.save()
            return False
        self.install(name, opened.sequence, opened.files)
        lineages[name] = {"sequence": opened.sequence, "fingerprint": opened.fingerprint,
                          "not_before": info.not_before, "revision": kv.mod_revision}
        self.memory.data["refused"].pop(name, None)
        self.save()
        notify(self.config_dir, name, info.domains)
        logger.info("fleet: installed %s (%s...) from etcd revision %d; notified this host's certrelay",
                    name, opened.fingerprint[:16], kv.mod_revision)
        self.acknowledge(name)
        return True

    def refuse(self, name, kv, reason):
        """Refuse the value of `kv` for lineage `name` because of `reason`: say it once,
        remember it, acknowledge what this host keeps serving. Return False."""
        have = self.memory.data["lineages"].get(name, {})
        logger.error("fleet: refused %s at etcd revision %d: %s; this host keeps serving %s", name,
                     kv.mod_revision, reason, (have.get("fingerprint") or "nothing")[:16])
        self.refusals += 1
        self.memory.data["refused"][name] = {"revision": kv.mod_revision, "reason": reason, "time": time.time()}
        self.save()
        if spool.NAME.fullmatch(name):
            self.acknowledge(name)
        return False

    def install(self, name, sequence, contents):
        """Write `contents` ({file: bytes}) as generation `sequence` of lineage `name` and
        switch live/NAME to it in one rename."""
        archive = os.path.join(self.config_dir, "archive", name)
        live = os.path.join(self.config_dir, "live", name)
        for directory in (os.path.dirname(archive), os.path.dirname(live)):
            os.makedirs(directory, mode=0o700, exist_ok=True)
        os.makedirs(archive, mode=0o755, exist_ok=True)
        os.makedirs(live, mode=0o755, exist_ok=True)
        generation = os.path.join(archive, str(sequence))
        os.makedirs(generation, mode=0o755, exist_ok=True)
        for file in FILES:
            files.write_atomically(os.path.join(generation, file), contents[file],
                                   0o600 if file == "privkey.pem" else 0o644)
        replace_link(str(sequence), os.path.join(archive, "current"))  # the one rename
        for file in FILES:
            link = os.path.join(live, file)
            target = f"../../archive/{name}/current/{file}"
            if not (os.path.islink(link) and os.readlink(link) == target):
                replace_link(target, link)
        fsync_directory(archive)
        self.prune(archive, sequence)

    @staticmethod
    def prune(archive, current):
        """Remove the generations of `archive` older than the KEEP_GENERATIONS newest."""
        import shutil

        generations = sorted(int(entry) for entry in os.listdir(archive) if entry.isdigit())
        for old in generations[:-KEEP_GENERATIONS]:
            if old != current:
                shutil.rmtree(os.path.join(archive, str(old)), ignore_errors=True)

    # --- acknowledgements ---------------------------------------------------------

    def outcome(self, name):
        """Return the ack dict of lineage `name`: what this host serves and its state,
        from this host's certrelay (ledger.json, status.json) and the subscriber's memory."""
        have = self.memory.data["lineages"].get(name, {})
        fingerprint = have.get("fingerprint")
        ack = {"host": self.subscription.host, "name": name, "fingerprint": fingerprint,
               "sequence": have.get("sequence"), "state": "pending", "reason": None, "endpoints": {}}
        refused = self.memory.data["refused"].get(name)
        # A batch deletes the notification before it saves the ledger, all under its lock:
        # only with the notification gone and no batch under way is the outcome final.
        held = name in self.held() or self.batch_running()
        ledger = state.Store(self.state_dir, "ledger.json").data
        status = state.Store(self.state_dir, "status.json").data
        endpoints = (status.get("endpoints") or {}).get(name) or {}
        ack["endpoints"] = {value.get("endpoint"): value.get("outcome") for value in endpoints.values()
                            if isinstance(value, dict)}
        kept = [value for value in (status.get("kept") or {}).values() if isinstance(value, dict)
                and value.get("name") == name]
        if fingerprint and ledger.get(name) == fingerprint:
            ack["state"] = "current"
        elif kept:
            ack["state"] = "failed"
            ack["reason"] = "; ".join(f"{failure.get('action')}: {failure.get('error')}"
                                      for entry in kept for failure in entry.get("failed", []))[:2000]
        elif fingerprint and not held:
            ack["state"] = "failed"  # the notification is gone, and nothing was done
            dropped = (status.get("dropped") or {}).get(name)
            ack["reason"] = (f"this host's certrelay dropped it: {dropped.get('reason')}" if isinstance(dropped, dict)
                             else "this host's certrelay did not act on it: does a [[rule]] select it?"
                                  f" (certrelay explain {name})")
        if refused:
            ack["reason"] = f"refused revision {refused.get('revision')}: {refused.get('reason')}"
            if not fingerprint:
                ack["state"] = "refused"
        return ack

    def acknowledge(self, name):
        """Put lineage `name`'s ack if it changed since the last one put. Raise
        store.StoreError (the next look tries again)."""
        ack = self.outcome(name)
        if self.memory.data["acked"].get(name) == ack:
            return
        stamped = dict(ack, time=time.time())
        self.store.put(self.ack_prefix + name, json.dumps(stamped, sort_keys=True).encode("utf-8"))
        self.memory.data["acked"][name] = ack
        self.save()

    def pending(self):
        """Return the names whose last ack waits for this host's certrelay."""
        return [name for name, ack in self.memory.data["acked"].items() if ack.get("state") == "pending"]

    def unsettled(self):
        """Return the names whose ack may still change without a new value: waiting,
        failed (a retry may work), or with a notification still in the spool."""
        return sorted(self.held() | {name for name, ack in self.memory.data["acked"].items()
                                     if ack.get("state") in ("pending", "failed")})

    def batch_running(self):
        """Return True if this host's certrelay holds its state lock now (state.locked):
        a batch is under way."""
        try:
            descriptor = os.open(os.path.join(self.state_dir, "lock"), os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)  # let go at once, by the close
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(descriptor)

    def held(self):
        """Return the names that have a notification in this host's spool (queue/ or
        claimed/): its certrelay has not finished with them."""
        root = os.path.join(self.config_dir, "certrelay")
        names = set()
        for directory in ("queue", "claimed"):
            try:
                names |= {entry.partition("@")[0] for entry in os.listdir(os.path.join(root, directory))}
            except OSError:
                pass
        return names & set(self.memory.data["lineages"])

    def acknowledge_all(self, names=None):
        for name in names if names is not None else sorted(set(self.memory.data["lineages"]) |
                                                           set(self.memory.data["refused"])):
            if spool.NAME.fullmatch(name):
                self.acknowledge(name)

    # --- the loop -----------------------------------------------------------------

    def resync(self):
        """Read the whole prefix and apply every value; acknowledge all; return the
        revision to watch from. Raise store.StoreError."""
        revision, found = self.store.range(self.prefix)
        for kv in found:
            self.apply(kv)
        gone = set(self.memory.data["lineages"]) - {kv.key[len(self.prefix):] for kv in found}
        for name in sorted(gone):
            logger.warning("fleet: %s is no longer published for this host; it keeps serving what it has", name)
        self.acknowledge_all()
        return revision

    def connect(self):
        if self.store is None:
            self.store = self.subscription.connection.store(self.timeout)

    def once(self):
        """Read everything once and acknowledge; return the number of refusals."""
        self.connect()
        self.resync()
        return self.refusals

    def run(self, systemd):
        """Subscribe until `stop()`: `systemd` is a watch.SystemdNotify (READY, STATUS,
        WATCHDOG). Errors reaching etcd are said, waited out and retried."""
        from certrelay.fleet import store

        ready, delay, said = False, RETRY[0], None
        idle_tick = min(IDLE_TICK, systemd.watchdog_interval or IDLE_TICK)
        while not self.stopping.is_set():
            try:
                self.connect()
                revision = self.resync()
                if not ready:
                    systemd.send("READY=1")
                    ready = True
                if said:
                    logger.info("fleet: etcd answers again")
                said, delay = None, RETRY[0]
                systemd.send(f"STATUS=subscribed to {self.prefix} at revision {revision}")
                self.follow(revision, idle_tick, systemd)
            except store.Compacted as error:
                logger.info("fleet: the watch fell behind a compaction (revision %s): reading everything again",
                            error.revision)
            except (store.StoreError, OSError) as error:
                if str(error) != said:
                    logger.error("fleet: %s; trying again (every %g s at most)", error, RETRY[1])
                    said = str(error)
                systemd.send(f"STATUS=cannot reach etcd: {error}"[:400])
                if not ready:  # started without etcd: still a running daemon
                    systemd.send("READY=1")
                    ready = True
                self.wait(delay, systemd)
                delay = min(delay * 2, RETRY[1])

    def follow(self, revision, idle_tick, systemd):
        """Watch from `revision` + 1 until the resync interval passes, `stop()`, or an
        error (raised). Events arrive through a thread so that the loop also wakes
        to look at pending acks and to feed the watchdog."""
        events = self.events = queue.Queue()
        # The main loop wakes on its own (ticks, watchdog): the watch's thread need not.
        watch = self.store.watch(self.prefix, revision + 1, idle=self.subscription.resync_interval)

        def pump():
            try:
                for batch in watch:
                    events.put(batch)
            except Exception as error:  # handed to the loop, which says it
                events.put(error)
            else:
                events.put(None)

        thread = threading.Thread(target=pump, name="etcd-watch", daemon=True)
        thread.start()
        resync_at = time.monotonic() + self.subscription.resync_interval
        try:
            while not self.stopping.is_set() and time.monotonic() < resync_at:
                tick = PENDING_TICK if self.pending() else idle_tick
                try:
                    batch = events.get(timeout=tick)
                except queue.Empty:
                    batch = []
                if isinstance(batch, Exception):
                    raise batch
                if batch is None:
                    return
                for event in batch:
                    if event.type == "PUT":
                        self.apply(event.kv)
                    else:
                        logger.warning("fleet: %s was deleted from etcd; this host keeps serving what it has",
                                       event.kv.key[len(self.prefix):])
                self.acknowledge_all(self.unsettled())
                systemd.send("WATCHDOG=1")
        finally:
            watch.close()
            thread.join(timeout=self.timeout)

    def wait(self, seconds, systemd):
        """Wait `seconds` (or until stop), feeding the watchdog."""
        end = time.monotonic() + seconds
        while not self.stopping.is_set() and time.monotonic() < end:
            self.stopping.wait(min(end - time.monotonic(), systemd.watchdog_interval or seconds))
            systemd.send("WATCHDOG=1")

    def stop(self):
        """End `run` (from a signal handler): the loop wakes at once."""
        self.stopping.set()
        self.events.put(None)

    def save(self):
        try:
            self.memory.save()
        except OSError as error:
            logger.warning("cannot save %s: %s", self.memory.path, error.strerror)


def notify(config_dir, name, domains):
    """Drop a notification for lineage `name` covering `domains` into the spool of
    `config_dir`, as the deploy hook does (tmp/, then a rename into queue/)."""
    root = os.path.join(config_dir, "certrelay")
    for directory in ("tmp", "queue"):
        os.makedirs(os.path.join(root, directory), mode=0o755, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    text = (f"version=1\nname={name}\nlineage={os.path.join(config_dir, 'live', name)}\n"
            f"domains={' '.join(domains)}\ntime={now}\n")
    temporary = os.path.join(root, "tmp", f"{name}.fleet.{os.getpid()}")
    files.write_atomically(temporary, text.encode("utf-8"), 0o644)
    os.replace(temporary, os.path.join(root, "queue", name))


def replace_link(target, path):
    """Make `path` a symbolic link to `target` in one rename (a temp link beside it first)."""
    temporary = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    if os.path.lexists(temporary):  # left by a crashed subscriber with our PID
        os.unlink(temporary)
    os.symlink(target, temporary)
    os.replace(temporary, path)


def fsync_directory(path):
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def utc(epoch):
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(epoch))

