"""The watch daemon: inotify on the queue, a settle window, retries, systemd notify.

Inotify events are only wake-ups: every batch claims the whole queue, so an event
that was lost (queue overflow, a name pyinotify cannot decode) costs nothing but a
rescan. One thread, one poll() over the inotify fd and a signal wake-up pipe; the
timeout is the nearest deadline (batch, retry, watchdog, --poll), so an idle daemon
sleeps until a timer needs it.
"""

import contextlib
import logging
import os
import select
import signal
import socket
import threading
import time
import warnings

import sdnotify

from certrelay import attempts, batch, lineages, rules as rules_module, spool as spool_module, state

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # pyinotify imports asyncore
    import pyinotify

logger = logging.getLogger(__name__)

WATCH_MASK = pyinotify.IN_CLOSE_WRITE | pyinotify.IN_MOVED_TO
LOST_MASK = pyinotify.IN_IGNORED | pyinotify.IN_DELETE_SELF | pyinotify.IN_MOVE_SELF
REWATCH_DELAY = 5.0  # seconds between attempts to watch a vanished queue again


class SystemdNotify:
    """sd_notify messages, sent as UTF-8 (sdnotify itself encodes latin-1).

    Does nothing without NOTIFY_SOCKET. Takes NOTIFY_SOCKET and the WATCHDOG_ variables
    out of the environment, so that no child process can speak in the daemon's name.
    """

    def __init__(self):
        self.socket = sdnotify.SystemdNotifier().socket if os.environ.get("NOTIFY_SOCKET") else None
        os.environ.pop("NOTIFY_SOCKET", None)
        usec = os.environ.pop("WATCHDOG_USEC", "")
        pid = os.environ.pop("WATCHDOG_PID", str(os.getpid()))
        enabled = usec.isdigit() and int(usec) > 0 and pid == str(os.getpid())
        #: seconds between watchdog pings (half the timeout), or None
        self.watchdog_interval = int(usec) / 2e6 if enabled else None

    def send(self, *lines):
        if self.socket is not None:
            try:
                # Never block the daemon on a notify socket nobody reads.
                self.socket.send("\n".join(lines).encode("utf-8"), socket.MSG_DONTWAIT)
            except OSError as error:
                logger.warning("cannot notify systemd: %s", error)


class Watcher:
    """The daemon's state: rules, timers, the inotify watch. `run` is its main loop."""

    def __init__(self, config_dir, rules_path, state_dir, rules, poll=None):
        self.config_dir, self.rules_path, self.state_dir = config_dir, rules_path, state_dir
        self.rules = rules
        self.poll_interval = poll
        self.queue = os.path.join(config_dir, "certrelay", "queue")
        self.spool_root = os.path.dirname(self.queue)  # where the post hook renames `attempt`
        self.systemd = SystemdNotify()
        # Kept across batches: its cache (lineages.json, an entry per lineage) is read
        # once, not per batch. A stale entry is harmless: each is keyed by a stat.
        self.scanner = lineages.Scanner(config_dir, state_dir)
        self.stores = state.Stores(state_dir)  # reread per batch only if another run wrote them
        self.batch_due = None  # monotonic time the next batch runs, or None
        self.batch_latest = None  # the settle window never pushes a batch past this
        self.retry_delay = None  # seconds; doubles while kept notifications stay
        self.retry_at = None
        self.next_poll = None
        self.next_ping = None
        self.rewatch_due = None
        self.next_reconcile = None  # a batch also finds renewals that sent no notification
        self.stop_requested = self.reload_requested = False
        self.last_status = "starting"

    # --- events --------------------------------------------------------------------

    def something_arrived(self, reason):
        """Schedule a batch after the settle window, bounded by max-wait."""
        now = time.monotonic()
        settle, max_wait = self.rules.settings["settle"], self.rules.settings["max-wait"]
        opening = self.batch_latest is None
        if opening:
            self.batch_latest = now + max_wait
        self.batch_due = min(now + settle, self.batch_latest)
        logger.debug("%s; batch in %.1f s", reason, self.batch_due - now)
        # Once per window, not per event: a burst of thousands would list the queue each
        # time; and not when the batch runs at once (settle = 0).
        if opening and self.batch_due > now:
            self.systemd.send(f"STATUS={self.pending()} pending, batch in {self.batch_due - now:.0f} s; {self.last_status}")

    def pending(self):
        """Return how many notifications wait in the queue ("?" if it cannot be read)."""
        try:
            return len(spool_module.Spool(self.config_dir).pending_names())
        except OSError as error:
            logger.error("cannot read the queue: %s: %s", error.filename, error.strerror)
            return "?"

    def handle_event(self, event):
        """pyinotify's default handler: every event of the watch manager comes here."""
        if event.mask & pyinotify.IN_Q_OVERFLOW:
            self.something_arrived("inotify queue overflowed: rescanning")
        elif event.path == self.spool_root:  # a failed renewal: said now, not at the next reconcile
            if event.name == os.path.basename(attempts.RELATIVE) and event.mask & pyinotify.IN_MOVED_TO:
                self.something_arrived("certbot recorded a renewal attempt")
        elif event.mask & LOST_MASK:
            logger.warning("the queue directory %s went away; watching it again", self.queue)
            self.rewatch_due = time.monotonic()
        elif event.name and not event.name.startswith("."):
            self.something_arrived(f"{event.name} arrived")

    def request(self, signal_number, frame):
        if signal_number == signal.SIGHUP:
            self.reload_requested = True
        else:
            self.stop_requested = True

    # --- actions -------------------------------------------------------------------

    def watch_queue(self, manager):
        """(Re)create the queue directory and watch it, or schedule another try."""
        for descriptor in list(manager.watches):
            manager.del_watch(descriptor)
        try:
            with spool_module.Spool(self.config_dir).opened(create=True) as spool:
                for repair in spool.repairs:  # creates the spool, setting aside symbolic links
                    logger.error("%s", repair)
            mask = WATCH_MASK | pyinotify.IN_DELETE_SELF | pyinotify.IN_MOVE_SELF | pyinotify.IN_DONT_FOLLOW
            manager.add_watch(self.queue, mask, quiet=False)
            manager.add_watch(self.spool_root, pyinotify.IN_MOVED_TO | pyinotify.IN_DONT_FOLLOW, quiet=False)
        except (OSError, pyinotify.WatchManagerError) as error:
            logger.error("cannot watch %s (%s); trying again in %g s", self.queue, error, REWATCH_DELAY)
            self.rewatch_due = time.monotonic() + REWATCH_DELAY
            return
        self.rewatch_due = None
        self.something_arrived(f"watching {self.queue}")  # whatever came while unwatched

    def reload_rules(self):
        self.systemd.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        try:
            self.rules = rules_module.load(self.rules_path, config_dir=self.config_dir)
            logger.info("reloaded the rules from %s", self.rules_path)
        except rules_module.RulesError as error:
            for problem in error.problems:
                logger.error("%s", problem)
            logger.error("keeping the rules in use: the new rules file is invalid")
        self.systemd.send("READY=1", f"STATUS={self.last_status}")

    def run_batch(self):
        """Process the queue and kept notifications once; schedule a retry if needed."""
        self.batch_due = self.batch_latest = None
        with self.feeding_watchdog():
            try:
                outcome = batch.process(self.config_dir, self.rules, self.state_dir,
                                        scanner=self.scanner, stores=self.stores)
                summary = outcome.summary()
            except OSError as error:
                summary = f"batch failed: {error}"
                logger.error("%s", summary)
                outcome = None
        if outcome is None or outcome.kept:  # a failed batch is retried like a failed action
            settings = self.rules.settings
            delay = settings["retry-min"] if self.retry_delay is None else self.retry_delay * 2
            self.retry_delay = min(delay, settings["retry-max"])
            self.retry_at = time.monotonic() + self.retry_delay
            logger.info("retrying in %g s", self.retry_delay)
        else:
            self.retry_delay = self.retry_at = None
        if outcome is not None and outcome.deferred_until is not None:
            self.batch_due = time.monotonic() + max(0.0, outcome.deferred_until - time.time())
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.last_status = f"last batch {stamp}: {summary}" + (
            f"; retry in {self.retry_delay:g} s" if self.retry_delay else ""
        )
        self.systemd.send(f"STATUS={self.last_status}")

    @contextlib.contextmanager
    def feeding_watchdog(self):
        """Keep pinging the watchdog while a batch runs (each action has a timeout)."""
        if self.systemd.watchdog_interval is None:
            yield
            return
        finished = threading.Event()

        def feed():
            while not finished.wait(self.systemd.watchdog_interval):
                self.systemd.send("WATCHDOG=1")

        feeder = threading.Thread(target=feed, name="watchdog", daemon=True)
        feeder.start()
        try:
            yield
        finally:
            finished.set()
            feeder.join()

    # --- main loop -----------------------------------------------------------------

    def next_deadline(self):
        deadlines = [
            moment for moment in (
                self.batch_due, self.retry_at, self.next_ping, self.next_poll, self.rewatch_due,
                self.next_reconcile,
            ) if moment is not None
        ]
        return min(deadlines) if deadlines else None

    def run(self):
        """Run until SIGTERM or SIGINT; return the exit status."""
        quiet_pyinotify()
        manager = pyinotify.WatchManager()
        notifier = pyinotify.Notifier(manager, default_proc_fun=self.handle_event)
        wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_write)
        for signal_number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signal_number, self.request)
        poller = select.poll()
        poller.register(manager.get_fd(), select.POLLIN)
        poller.register(wake_read, select.POLLIN)
        self.watch_queue(manager)
        self.run_batch()  # whatever is pending or kept from before
        self.systemd.send("READY=1", f"STATUS={self.last_status}")
        logger.info("watching %s", self.queue)
        now = time.monotonic()
        if self.systemd.watchdog_interval:
            self.systemd.send("WATCHDOG=1")
            self.next_ping = now + self.systemd.watchdog_interval
        if self.poll_interval:
            self.next_poll = now + self.poll_interval
        self.next_reconcile = now + self.rules.settings["reconcile-interval"]
        try:
            while not self.stop_requested:
                deadline = self.next_deadline()
                timeout = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000) + 1)
                for descriptor, _ in poller.poll(timeout):
                    if descriptor == wake_read:
                        drain(wake_read)
                    else:
                        read_inotify(notifier, self)
                self.tick(manager)
        finally:
            self.systemd.send("STOPPING=1")
            signal.set_wakeup_fd(-1)
            notifier.stop()
            os.close(wake_read)
            os.close(wake_write)
        logger.info("stopped")
        return 0

    def tick(self, manager):
        """Do whatever is due now."""
        if self.stop_requested:
            return
        if self.reload_requested:
            self.reload_requested = False
            self.reload_rules()
        now = time.monotonic()
        if self.next_ping is not None and now >= self.next_ping:
            self.systemd.send("WATCHDOG=1")
            self.next_ping = now + self.systemd.watchdog_interval
        if self.rewatch_due is not None and now >= self.rewatch_due:
            self.watch_queue(manager)
        if self.next_poll is not None and now >= self.next_poll:
            self.next_poll = now + self.poll_interval
            if self.pending():
                self.something_arrived("--poll found pending notifications")
        if now >= self.next_reconcile:
            self.batch_due = self.batch_due or now  # reconcile and expiry alarms run in every batch
        due = [moment for moment in (self.batch_due, self.retry_at) if moment is not None]
        if due and now >= min(due):
            self.next_reconcile = now + self.rules.settings["reconcile-interval"]
            self.run_batch()


def read_inotify(notifier, watcher):
    """Read and dispatch inotify events; a name pyinotify cannot decode means rescan."""
    try:
        notifier.read_events()
    except UnicodeDecodeError:
        watcher.something_arrived("an entry with a name that is not UTF-8 arrived: rescanning")
        return
    notifier.process_events()


def drain(descriptor):
    with contextlib.suppress(BlockingIOError):
        while os.read(descriptor, 512):
            pass


def quiet_pyinotify():
    """Route pyinotify's log through ours: its own handler would print every line twice."""
    pyinotify_logger = logging.getLogger("pyinotify")
    pyinotify_logger.handlers[:] = logging.getLogger("certrelay").handlers
    pyinotify_logger.propagate = False
    pyinotify_logger.setLevel(logging.WARNING)
