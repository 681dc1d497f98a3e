"""Fleet: one certbot host, many hosts, through a real etcd (issue 20, "Performance").

Each measurement runs against a real etcd 3.4 (Debian's /usr/bin/etcd) on loopback,
with TLS and auth on, started by the tests' own harness (tests/etcd.py, reused as is),
and a certrelay installed as `make install` lays it out (the fleet subpackage too).

1. **One renewal for 1,000 hosts.** The certbot host's rules name 1,000 [[fleet.host]]s,
   each with its own X25519 key, all selecting one lineage. This process holds the
   1,000 hosts' watches: one `store.Store.watch` per host prefix, each on its own
   connection and thread, as 1,000 subscribers would (one etcd user for all of them:
   1,000 users would cost 1,000 bcrypt logins and 4,000 etcdctl runs to set up, and etcd
   checks a watch's permission once, when it is made). A turn renews the lineage, then
   publishes; the clock starts when publishing starts, and stops when all 1,000 watches
   have the new value. Three contenders take turns:
   - `certrelay run` on the certbot host (the deploy hook's notification queued): what
     an admin runs, process start and 1,000 host tables parsed included;
   - `Publisher.publish(host, [name])` for every host, in a process of its own, timed
     from just before the first call, with the time in reading, sealing, putting and
     saving fleet.json summed;
   - the floor: read the lineage and check its files once (certificate parsed, key
     loaded and matched: the same for every host), seal it for each host, and
     `put_many` all 1,000 values (transactions of 128, etcd's default limit), nothing
     else.
   Also: when each host could open its value (its receipt plus its own `open_value`,
   each host on its own CPU, as 1,000 machines are); all 1,000 opened in this one
   process; etcd's RSS with no watch and with the 1,000; the hotspots of `certrelay run`
   (cProfile).
2. **20 real hosts.** 20 `certrelay subscribe` processes, each with its own config dir,
   state dir, key, etcd user (made by running the lines `certrelay fleet roles` prints)
   and rules: a [[rule]] restarting dovecot through the recording fake systemctl
   (tests/fake_systemctl), and beside it the host's own `certrelay watch` (settle = 0).
   A turn renews on the certbot host and runs `certrelay run` there; the clock stops when
   the acknowledgements in etcd say "current" with the new fingerprint for all 20 (what
   `fleet status` reads). The stages: the new values seen by a watch on hosts/, then
   each host's own stamps: its "pending" ack (installed, notified), its systemctl's
   calls file (restarted), its "current" ack; and the states each host acknowledged,
   in order (a "failed" before "current" shows in the figures).
3. **An idle subscriber.** One of the 20, alone, with the watchdog on (WATCHDOG_USEC = 60 s)
   after READY=1: wake-ups, CPU time and RSS over 60 s, counted as the idle benchmark
   counts them (bench_idle.process_sample), side by side with that host's `certrelay
   watch` and `sleep`.

Benchmarks measure; they assert nothing about time.
"""

import collections
import contextlib
import json
import os
import pstats
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench_idle import side_by_side
from harness import NOTES, PROCESSES, PYTHON, REPO, ROWS, Row, progress, ratio, rotated, seconds, wait_for
from sandbox import NotifySocket, Sandbox, install_certrelay

NAME = "example.ch"
DOMAINS = [NAME, f"*.{NAME}"]
HOSTS = 1000
SUBSCRIBERS = 20
TURNS = 3
IDLE_SECONDS = 60
WATCH_STORES = 20  # Store objects (etcd logins) the 1,000 watches are opened through
ARRIVAL_TIMEOUT = 120.0  # seconds: far beyond any figure; a turn that takes longer is reported
PREFIX = "/certrelay/v1/"
PUBLISHER_USER = "certrelay-publisher"
WATCHERS_USER = "bench-watchers"
GOAL_1000 = 1.0  # s: 1,000 hosts hold the new certificate
GOAL_20 = 2.0  # s, plus their own restarts: 20 hosts acknowledged

# Run in a process of its own: publish with certrelay's Publisher (mode "publisher") or
# the floor (mode "floor"); print {"start", "end", ...} with time.monotonic() values,
# which are the machine's CLOCK_MONOTONIC, comparable across processes.
CHILD = r"""
import json, sys, time
lib, rules_path, config_dir, state_dir, mode, name = sys.argv[1:7]
sys.path.insert(0, lib)
from certrelay import rules as rules_module
from certrelay.fleet import publish, seal, store as store_module

rules = rules_module.load(rules_path, config_dir=config_dir)
fleet = rules.fleet
spent = {"read": 0.0, "check": 0.0, "seal": 0.0, "put": 0.0, "save": 0.0}

def timed(owner, attribute, key):
    original = getattr(owner, attribute)
    def wrapper(*arguments, **keywords):
        began = time.monotonic()
        try:
            return original(*arguments, **keywords)
        finally:
            spent[key] += time.monotonic() - began
    setattr(owner, attribute, wrapper)

if mode == "publisher":
    timed(publish, "read_lineage", "read")
    timed(seal, "seal", "seal")
    timed(store_module.Store, "put_many", "put")
    timed(publish.Publisher, "save", "save")
    start = time.monotonic()
    publisher = publish.Publisher(fleet, config_dir, state_dir, rules.settings["timeout"])
    for host in fleet.hosts:
        result = publisher.publish(host.name, [name])
        if not result.ok:
            sys.exit(result.detail)
    end = time.monotonic()
else:
    start = time.monotonic()
    signing_key = seal.load_signing_key(fleet.signing_key)
    store = fleet.connection.store(rules.settings["timeout"])
    began = time.monotonic()
    files = publish.read_lineage(config_dir, name)
    spent["read"] = time.monotonic() - began
    began = time.monotonic()
    info = seal.check_files(files)  # once: the same files for every host
    seal.check_files = lambda _files: info
    spent["check"] = time.monotonic() - began
    began = time.monotonic()
    sequence = time.time_ns() // 1000
    items = {publish.lineage_key(host.name, name):
             seal.seal(signing_key, seal.parse_recipient(host.recipient), host.name, name, files, sequence)
             for host in fleet.hosts}
    spent["seal"] = time.monotonic() - began
    began = time.monotonic()
    store.put_many(items)
    spent["put"] = time.monotonic() - began
    end = time.monotonic()
print(json.dumps(dict(spent, start=start, end=end)))
"""


def unavailable_reason():
    """Why the fleet cannot be measured here, or None."""
    try:
        import nacl.public  # noqa: F401
    except ImportError:
        return "the fleet needs PyNaCl: apt-get install python3-nacl"
    try:
        from tests import etcd as etcd_module
    except ImportError as error:
        return f"tests/etcd.py cannot be imported ({error}): apt-get install python3-pytest"
    missing = [path for path in (etcd_module.ETCD, etcd_module.ETCDCTL) if not os.access(path, os.X_OK)]
    if missing:
        return f"missing {', '.join(missing)}: apt-get install etcd-server etcd-client"
    return None


@contextlib.contextmanager
def running_etcd(directory):
    """A started tests.etcd.Etcd, ended (by its PID) and removed when the block ends."""
    from tests.etcd import Etcd

    etcd = Etcd(directory)
    try:
        etcd.start()
        PROCESSES.started.append((etcd.process, False))  # run.py ends it too, on Ctrl-C
        yield etcd
    finally:
        etcd.close()


def memory(pid):
    """Return (VmRSS, VmHWM) of process `pid` in MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def open_files_limit(needed):
    """Raise this process's soft RLIMIT_NOFILE towards `needed` (etcd, started later,
    inherits it); return the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    return soft


def fleet_rules(etcd, keys, hosts):
    """The certbot host's rules: [fleet] and a [[fleet.host]] per (name, recipient)."""
    lines = ["[fleet]", f'endpoints = ["{etcd.endpoint}"]', f'ca-file = "{etcd.ca_file}"',
             f'user = "{PUBLISHER_USER}"', f'password-file = "{keys / "publisher.password"}"',
             f'signing-key = "{keys / "publisher.key"}"', ""]
    for host, recipient in hosts:
        lines += ["[[fleet.host]]", f'name = "{host}"', f'recipient = "{recipient}"', f'match = ["{NAME}"]', ""]
    return "\n".join(lines)


def write_secret(path, text):
    Path(path).write_text(text + "\n")
    os.chmod(path, 0o600)


def renew(site):
    """Renew NAME on the certbot host as certbot does (a new certificate and key), and
    queue the deploy hook's notification. Return the new certificate's fingerprint."""
    from certrelay import certificate
    from tests import certs

    certs.renew(str(site.config_dir), NAME)
    site.publish(NAME, DOMAINS)
    return certificate.fingerprint(str(site.config_dir), NAME)


def run_certrelay(site, wrapper, *flags, command="run", timeout=600):
    done = subprocess.run([str(wrapper), command, *flags, *site.arguments()], env=site.environment(),
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode not in (0, 1) or (command == "run" and done.returncode != 0):
        raise RuntimeError(f"certrelay {command} exited {done.returncode}: {done.stderr[-1500:]}")
    return done


def spread(values):
    """'median a, slowest b' of seconds."""
    return f"median {seconds(statistics.median(values))}, slowest {seconds(max(values))}"


# --- 1. one renewal for 1,000 hosts -----------------------------------------------------


class Watchers:
    """One watch per host prefix, each read by its own thread in this process. A turn
    (`reset`, then `wait`) records when each host's first event arrives, and its value;
    with `open_with` = (identities, publisher key), each thread opens the value too."""

    def __init__(self, stores, hosts, start_revision):
        self.hosts, self.expected = hosts, len(hosts)
        self.lock = threading.Lock()
        self.complete, self.ready = threading.Event(), threading.Event()
        self.arrived, self.errors, self.watches = {}, [], []
        self.open_with = None
        began = time.monotonic()
        previous = threading.stack_size(512 * 1024)
        try:
            self.threads = [threading.Thread(target=self.follow, name=f"watch-{host}", daemon=True,
                                             args=(stores[index % len(stores)], host, start_revision))
                            for index, host in enumerate(hosts)]
            for thread in self.threads:
                thread.start()
        finally:
            threading.stack_size(previous)
        if not self.ready.wait(ARRIVAL_TIMEOUT) or self.errors:
            self.close()
            raise RuntimeError(f"{len(self.watches)} of {len(hosts)} watches opened; errors: {self.errors[:3]}")
        self.opening = time.monotonic() - began

    def follow(self, store, host, start_revision):
        from certrelay.fleet import config as fleet_config, seal

        try:
            watch = store.watch(fleet_config.lineages_prefix(host), start_revision, idle=3600)
            with self.lock:
                self.watches.append(watch)
                if len(self.watches) == self.expected:
                    self.ready.set()
            for events in watch:
                moment = time.monotonic()
                if not events:
                    continue
                value, opened = events[-1].kv.value, None
                if self.open_with:
                    identities, publisher = self.open_with
                    seal.open_value(identities[host], publisher, host, NAME, value)
                    opened = time.monotonic()
                with self.lock:
                    if host not in self.arrived:
                        self.arrived[host] = (moment, value, opened)
                        if len(self.arrived) == self.expected:
                            self.complete.set()
        except Exception as error:  # noqa: BLE001 - reported with the turn
            with self.lock:
                self.errors.append(f"{host}: {error}")
                self.ready.set()

    def reset(self, open_with=None):
        with self.lock:
            self.arrived, self.open_with = {}, open_with
            self.complete.clear()

    def wait(self, timeout=ARRIVAL_TIMEOUT):
        """Wait until every host has its value; raise RuntimeError saying how many did not."""
        if not self.complete.wait(timeout):
            with self.lock:
                raise RuntimeError(f"only {len(self.arrived)} of {self.expected} watches saw the new value within"
                                   f" {timeout:g} s; errors: {self.errors[:3]}")

    def close(self):
        with self.lock:
            watches = list(self.watches)
        for watch in watches:
            watch.close()
        for thread in self.threads:
            thread.join(timeout=5)


def publish_to_many(work, wrapper, lib):
    import nacl.public

    from certrelay.fleet import seal, store as store_module

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    limit = open_files_limit(HOSTS + 1024)
    load_before = os.getloadavg()[0]
    hosts = [f"h{index:04d}" for index in range(min(HOSTS, max(limit - 256, 1)))]
    if len(hosts) < HOSTS:
        NOTES.append(f"fleet: RLIMIT_NOFILE allows {limit} files only, so {len(hosts)} hosts instead of {HOSTS}")
    keys = work / "keys"
    keys.mkdir(mode=0o700)
    signing_text, publisher_text = seal.new_signing_key()
    seal.write_key(str(keys / "publisher.key"), signing_text)
    publisher_key = seal.parse_publisher(publisher_text)
    identities, recipients = {}, []
    for host in hosts:
        private, recipient = seal.new_identity()
        identities[host] = nacl.public.PrivateKey(seal.decode_key(private, seal.IDENTITY))
        recipients.append((host, recipient))
    write_secret(keys / "publisher.password", "publisher-secret")
    site = Sandbox(work / "certbot", "", systemctl=None)
    with running_etcd(work / "etcd") as etcd:
        etcd_empty = memory(etcd.pid)[0]
        etcd.add_user(PUBLISHER_USER, "publisher-secret", read_prefixes=[PREFIX + "hosts/", PREFIX + "acks/"],
                      write_prefixes=[PREFIX + "hosts/"])
        etcd.add_user(WATCHERS_USER, "watchers-secret", read_prefixes=[PREFIX + "hosts/"])
        site.rules.write_text(fleet_rules(etcd, keys, recipients))
        renew(site)
        progress(f"fleet: first publication to {len(hosts)} hosts (no watch yet)")
        began = time.monotonic()
        run_certrelay(site, wrapper)
        first_run = time.monotonic() - began
        time.sleep(1.0)
        etcd_keys = memory(etcd.pid)[0]
        # Store.watch waits for etcd's answer head (about 45 ms: etcd's gateway) holding its Store's lock:
        # WATCH_STORES Stores open the watches in parallel.
        stores = [store_module.Store([etcd.endpoint], etcd.ca_file, WATCHERS_USER, "watchers-secret", timeout=30)
                  for _ in range(WATCH_STORES)]
        revision, found = stores[0].range(PREFIX + "hosts/", keys_only=True)
        if len(found) != len(hosts):
            raise RuntimeError(f"the first `certrelay run` published {len(found)} values, not {len(hosts)}")
        own_before = memory(os.getpid())[0]
        progress(f"fleet: opening {len(hosts)} watches in this process")
        watchers = None
        try:
            watchers = Watchers(stores, hosts, revision + 1)
            time.sleep(1.0)
            etcd_watched = memory(etcd.pid)[0]
            own_watched = memory(os.getpid())[0]
            turns = many_turns(work, site, wrapper, lib, watchers, identities, publisher_key)
            etcd_after, etcd_peak = memory(etcd.pid)
            turns["sizes"] = [len(value) for _, value, _ in watchers.arrived.values()]
            turns["micro"] = seal_costs(site, keys, identities, publisher_key)
        finally:
            if watchers is not None:
                watchers.close()
            for store in stores:
                store.close()
    turns["nofile"] = f"{soft}, raised to {limit}" if limit != soft else f"{soft}"
    turns["load"] = f"{load_before:.2f} at the start of this part, {os.getloadavg()[0]:.2f} at its end"
    report_many(len(hosts), first_run, watchers.opening, turns,
                {"empty": etcd_empty, "keys": etcd_keys, "watched": etcd_watched, "after": etcd_after,
                 "peak": etcd_peak, "own": own_watched - own_before})


def many_turns(work, site, wrapper, lib, watchers, identities, publisher_key):
    """The contenders in turns; return {contender: [turn dict]} and the extras."""
    from certrelay.fleet import seal

    contenders = ["certrelay run", "Publisher.publish per host", "floor"]
    results = {contender: [] for contender in contenders}
    for turn in range(TURNS):
        for contender in rotated(contenders, turn):
            progress(f"fleet: {len(identities):,} hosts, turn {turn + 1}/{TURNS}: {contender}")
            renew(site)
            watchers.reset()
            if contender == "certrelay run":
                start = time.monotonic()
                run_certrelay(site, wrapper)
                measured = {"start": start, "end": time.monotonic()}
            else:
                measured = publish_child(site, lib, "publisher" if contender.startswith("Publisher") else "floor")
            watchers.wait()
            arrivals = {host: moment - measured["start"] for host, (moment, _, _) in watchers.arrived.items()}
            measured["arrivals"] = sorted(arrivals.values())
            if contender == "certrelay run":  # each host opens its own value: on its own CPU
                costs = []
                for host, (moment, value, _) in watchers.arrived.items():
                    began = time.perf_counter()
                    seal.open_value(identities[host], publisher_key, host, NAME, value)
                    costs.append(time.perf_counter() - began)
                    arrivals[host] += costs[-1]
                measured["open_costs"] = costs
                measured["could_open"] = max(arrivals.values())
            results[contender].append(measured)
            time.sleep(0.5)
    progress("fleet: certrelay run once more, each watcher thread opening its value at once")
    renew(site)
    watchers.reset(open_with=(identities, publisher_key))
    start = time.monotonic()
    run_certrelay(site, wrapper)
    published = time.monotonic() - start
    watchers.wait()
    inline = {"published": published,
              "received": max(moment for moment, _, _ in watchers.arrived.values()) - start,
              "opened": max(opened for _, _, opened in watchers.arrived.values()) - start}
    progress("fleet: certrelay run once more under cProfile, for the hotspots")
    renew(site)
    watchers.reset()
    profile = work / "run.prof"
    done = subprocess.run([PYTHON, "-m", "cProfile", "-o", str(profile), str(wrapper), "run", *site.arguments()],
                          env=site.environment(), capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"certrelay run under cProfile exited {done.returncode}: {done.stderr[-1500:]}")
    watchers.wait()
    return {"turns": results, "inline": inline, "profile": profile_shares(profile)}


def seal_costs(site, keys, identities, publisher_key, count=200, rounds=3):
    """Time, in this process, what sealing and opening cost per host, and how much of
    it is the check of the lineage's files (the same for every host of a lineage):
    `rounds` rounds of `count` hosts each, the least disturbed (fastest) round counts."""
    from certrelay.fleet import publish, seal

    files = publish.read_lineage(str(site.config_dir), NAME)
    signing_key = seal.load_signing_key(str(keys / "publisher.key"))
    hosts = list(identities)[:count]
    costs = {"seal": [], "check": [], "open": []}
    for _round in range(rounds):
        began = time.perf_counter()
        values = [seal.seal(signing_key, identities[host].public_key, host, NAME, files, 1) for host in hosts]
        costs["seal"].append((time.perf_counter() - began) / len(hosts))
        began = time.perf_counter()
        for _host in hosts:
            seal.check_files(files)
        costs["check"].append((time.perf_counter() - began) / len(hosts))
        began = time.perf_counter()
        for host, value in zip(hosts, values):
            seal.open_value(identities[host], publisher_key, host, NAME, value)
        costs["open"].append((time.perf_counter() - began) / len(hosts))
    return {key: min(values) for key, values in costs.items()}


def publish_child(site, lib, mode):
    done = subprocess.run([PYTHON, "-c", CHILD, str(lib), str(site.rules), str(site.config_dir), str(site.state_dir),
                           mode, NAME], env=site.environment(), capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"publishing ({mode}) exited {done.returncode}: {done.stderr[-1500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def profile_shares(profile):
    """Return {what: (cumulative s, calls)} of the functions that tell where a `certrelay
    run` for many hosts spends its time, and the run's total."""
    stats = pstats.Stats(str(profile))
    wanted = {("publish.py", "publish"): "Publisher.publish", ("publish.py", "publish_all"): "Publisher.publish_all",
              ("seal.py", "seal"): "seal.seal", ("seal.py", "check_files"): "seal.check_files",
              ("store.py", "put_many"): "Store.put_many", ("publish.py", "save"): "Publisher.save (fleet.json)",
              ("publish.py", "read_lineage"): "read_lineage", ("rules.py", "load"): "rules.load",
              ("publish.py", "stale"): "Publisher.stale", ("publish.py", "problems"): "Publisher.problems",
              ("~", "<built-in method posix.fsync>"): "fsync", ("store.py", "_authenticate"): "etcd login"}
    found = {"total": (max(entry[3] for entry in stats.stats.values()), 1)}
    for (file, _, function), (primitive, _, _, cumulative, _) in stats.stats.items():
        key = (os.path.basename(file), function)
        if key in wanted:
            label = wanted[key]
            before = found.get(label, (0.0, 0))
            found[label] = (before[0] + cumulative, before[1] + primitive)
    return found


def report_many(count, first_run, opening, extras, memory_figures):
    turns = extras["turns"]
    run_turns, per_host, floor = turns["certrelay run"], turns["Publisher.publish per host"], turns["floor"]

    def last(measured):
        return statistics.median(turn["arrivals"][-1] for turn in measured)

    def took(measured):
        return statistics.median(turn["end"] - turn["start"] for turn in measured)

    def turns_text(measured, key=lambda turn: turn["arrivals"][-1]):
        return ", ".join(seconds(key(turn)) for turn in measured)

    floor_last = last(floor)
    hosts = f"{count:,}"
    goal = "met" if last(run_turns) <= GOAL_1000 else f"not met by {seconds(last(run_turns) - GOAL_1000)}"
    ROWS.append(Row("fleet", f"one renewal for {hosts} hosts: publishing starts → all {hosts} watches have the new"
                             f" value (target ≤ 1 s: {goal})",
                    f"`certrelay run`: median {seconds(last(run_turns))} ({turns_text(run_turns)})",
                    "floor: read and check the lineage once, seal per host, put in transactions of 128",
                    f"{seconds(floor_last)}",
                    ratio(last(run_turns), floor_last)))
    ROWS.append(Row("fleet", f"the same, `Publisher.publish(host, [name])` per host in one process",
                    f"median {seconds(last(per_host))} ({turns_text(per_host)})",
                    "floor", seconds(floor_last), ratio(last(per_host), floor_last)))
    ROWS.append(Row("fleet", f"the same: the first watch has it",
                    f"`certrelay run` {seconds(statistics.median(t['arrivals'][0] for t in run_turns))};"
                    f" per host {seconds(statistics.median(t['arrivals'][0] for t in per_host))}",
                    "floor", seconds(statistics.median(t["arrivals"][0] for t in floor))))
    ROWS.append(Row("fleet", f"the same: publishing itself (its wall time)",
                    f"`certrelay run` {seconds(took(run_turns))}; per host {seconds(took(per_host))}",
                    "floor", seconds(took(floor)), ratio(took(run_turns), took(floor))))
    spent = {key: statistics.median(turn[key] for turn in per_host) for key in ("read", "seal", "put", "save")}
    floor_spent = {key: statistics.median(turn[key] for turn in floor) for key in ("read", "check", "seal", "put")}
    ROWS.append(Row("fleet", f"where publishing per host goes, {hosts} hosts",
                    f"read live/ {seconds(spent['read'])}, seal {seconds(spent['seal'])}, put (one transaction per"
                    f" host) {seconds(spent['put'])}, save fleet.json {seconds(spent['save'])}",
                    "floor", f"read {seconds(floor_spent['read'])}, check the files once"
                    f" {seconds(floor_spent['check'])}, seal {seconds(floor_spent['seal'])}, put"
                    f" {-(-count // 128)} transactions {seconds(floor_spent['put'])}"))
    micro = extras["micro"]
    ROWS.append(Row("fleet", "sealing one host's value (`seal.seal`), in process (the fastest of 3 rounds of 200)",
                    f"{seconds(micro['seal'])}, of which checking the lineage's files (`check_files`: the same for"
                    f" every host) {seconds(micro['check'])}", "`seal.open_value` on the host",
                    f"{seconds(micro['open'])}", ratio(micro["seal"], micro["open"])))
    costs = sorted(cost for turn in run_turns for cost in turn["open_costs"])
    could = statistics.median(turn["could_open"] for turn in run_turns)
    ROWS.append(Row("fleet", "the same: until each host could open its value (its receipt + its own"
                             " `open_value`, each host on its own CPU)",
                    f"`certrelay run`: median {seconds(could)}", "`open_value` per host",
                    f"median {seconds(statistics.median(costs))}, p95 {seconds(costs[int(len(costs) * 0.95)])}"))
    inline = extras["inline"]
    ROWS.append(Row("fleet", f"the same, all {hosts} opened in this one process (2 cores, one GIL), one turn",
                    f"received {seconds(inline['received'])}, opened {seconds(inline['opened'])}",
                    "publishing (`certrelay run`) in that turn", seconds(inline["published"])))
    ROWS.append(Row("fleet", f"etcd RSS with {hosts} watches open (1 value each)",
                    f"{memory_figures['watched']:.0f} MiB (after the turns {memory_figures['after']:.0f} MiB, peak"
                    f" {memory_figures['peak']:.0f} MiB)", f"etcd with the {hosts} values, no watch",
                    f"{memory_figures['keys']:.0f} MiB (empty: {memory_figures['empty']:.0f} MiB)",
                    ratio(memory_figures["watched"], memory_figures["keys"])))
    profile = extras["profile"]
    total = profile["total"][0]
    shares = ", ".join(f"{label} {value / total:.0%} ({calls:,} calls)" for label, (value, calls)
                       in sorted(profile.items(), key=lambda item: -item[1][0]) if label != "total")
    NOTES.append(
        f"fleet, {hosts} hosts: a real etcd 3.4 (tests/etcd.py: one member on 127.0.0.1, TLS, auth on); the certbot"
        f" host's rules have {hosts} [[fleet.host]]s, each with its own X25519 key, all selecting {NAME} (a real"
        " certificate and key, tests/certs.py). The watches: one `Store.watch` per host prefix, in this process, each"
        f" with its own connection and thread ({hosts} TLS connections, opened by their threads through"
        f" {WATCH_STORES} Stores, i.e. etcd logins, in {seconds(opening)}: a watch waits about 45 ms for etcd's answer"
        f" head, holding its Store's lock; this process grew by {memory_figures['own']:.0f} MiB), all as one etcd user"
        f" with read on hosts/ ({hosts} users would cost {hosts} bcrypt logins and 4 etcdctl runs each to set up; etcd"
        " checks a watch's permission when it is made). The publisher's user has the permissions `fleet roles` gives"
        " it. A turn renews the lineage (and, for `certrelay run`, queues the hook's notification), starts the clock,"
        f" publishes, and stops it when the last watch thread has its event; contenders rotate each turn; {TURNS}"
        " turns, medians."
        " `Publisher.publish` per host and the floor run in a process of their own, their clock started after"
        " imports and the rules' parse, before the Publisher or Store is made (so etcd's login is in); the floor"
        " does nothing else than read the lineage and check its files once (seal.check_files: certificate parsed, key"
        " loaded and matched; `seal.seal` does it again for every host), seal per host and put_many all values"
        " (transactions of 128"
        f" operations, etcd's default --max-txn-ops). The first publication, before any watch: {seconds(first_run)}."
        " Could open: each host's receipt time plus the time `seal.open_value` takes for its value, measured one"
        " after the other in this process after the turn (as each host opens on its own CPU); the one turn with"
        " every watch thread opening at once shows the same 2 cores doing all of it. etcd RSS: VmRSS of its PID."
        f" One host's value: {statistics.mean(extras['sizes']) / 1024:.1f} KiB (a renewal for {hosts} hosts writes"
        f" {sum(extras['sizes']) / 2**20:.1f} MiB, base64 again in the gateway's JSON). RLIMIT_NOFILE:"
        f" {extras['nofile']}. Load average: {extras['load']}."
    )
    NOTES.append(f"fleet, {hosts} hosts: cProfile of one `certrelay run` (a full publication), cumulative share"
                 f" of its {seconds(total)}: {shares}")


# --- 2. 20 real subscribers ---------------------------------------------------------------


class AckWatch:
    """Reads a prefix in a thread (acks/, as the publisher's user, as `fleet status`
    does; or hosts/, the values published): each value as it lands, parsed with
    `parse`, with the time it was seen."""

    def __init__(self, store, start_revision, prefix=PREFIX + "acks/", parse=json.loads):
        self.lock = threading.Lock()
        self.seen = []  # (monotonic, host, ack)
        self.prefix, self.parse = prefix, parse
        self.watch = store.watch(prefix, start_revision, idle=3600)
        self.errors = []
        self.thread = threading.Thread(target=self.follow, name="acks", daemon=True)
        self.thread.start()

    def follow(self):
        try:
            for events in self.watch:
                moment = time.monotonic()
                for event in events:
                    if event.type != "PUT":
                        continue
                    host = event.kv.key[len(self.prefix):].partition("/")[0]
                    with self.lock:
                        self.seen.append((moment, host, self.parse(event.kv.value)))
        except Exception as error:  # noqa: BLE001 - reported by the wait
            self.errors.append(str(error))

    def current(self, fingerprint):
        """Return {host: (seen, ack)} of the first "current" ack of `fingerprint` per host."""
        found = {}
        with self.lock:
            for moment, host, ack in self.seen:
                if ack.get("fingerprint") == fingerprint and ack.get("state") == "current":
                    found.setdefault(host, (moment, ack))
        return found

    def landed(self, fingerprint):
        """Return {host: monotonic time} its first value of `fingerprint` was seen."""
        found = {}
        with self.lock:
            for moment, host, value in self.seen:
                if value.get("fingerprint") == fingerprint:
                    found.setdefault(host, moment)
        return found

    def first(self, fingerprint, state):
        found = {}
        with self.lock:
            for _moment, host, ack in self.seen:
                if ack.get("fingerprint") == fingerprint and ack.get("state") == state:
                    found.setdefault(host, ack)
        return found

    def sequences(self, fingerprint):
        """Return {host: [(state, reason)]}: the acks of `fingerprint` each host put, in
        order, up to its first "current"."""
        found = {}
        with self.lock:
            for _moment, host, ack in self.seen:
                if ack.get("fingerprint") != fingerprint:
                    continue
                states = found.setdefault(host, [])
                if not states or states[-1][0] != "current":
                    states.append((ack.get("state"), ack.get("reason")))
        return found

    def close(self):
        self.watch.close()
        self.thread.join(timeout=5)


def real_subscribers(work, wrapper):
    from certrelay.fleet import seal, store as store_module

    load_before = os.getloadavg()[0]
    keys = work / "keys"
    roles_dir = work / "roles"
    roles_dir.mkdir(mode=0o700)
    certbot = Sandbox(work / "certbot", "", systemctl=None)
    certbot.rules.unlink()  # `fleet init` writes the key where its --key says, rules or not
    made = run_certrelay(certbot, wrapper, "init", "--key", str(keys / "publisher.key"), command="fleet")
    publisher = quoted(made.stdout, "publisher")
    write_secret(keys / "publisher.password", "publisher-secret")
    names = [f"s{index:02d}" for index in range(1, SUBSCRIBERS + 1)]
    hosts, recipients = {}, []
    for name in names:
        host = Sandbox(work / name, "")
        host.rules.unlink()
        made = run_certrelay(host, wrapper, "keygen", "--key", str(keys / f"{name}.key"), command="fleet")
        recipients.append((name, quoted(made.stdout, "recipient")))
        write_secret(roles_dir / f"certrelay-host-{name}.password", f"{name}-secret")
        hosts[name] = host
    with running_etcd(work / "etcd") as etcd:
        for name, host in hosts.items():
            host.rules.write_text("\n".join([
                "[settings]", "min-interval = 0", "settle = 0", "",
                "[[rule]]", f'match = ["{NAME}"]', 'restart = ["dovecot"]', "",
                "[subscribe]", f'endpoints = ["{etcd.endpoint}"]', f'ca-file = "{etcd.ca_file}"', f'host = "{name}"',
                f'user = "certrelay-host-{name}"', f'password-file = "{roles_dir / f"certrelay-host-{name}.password"}"',
                f'identity = "{keys / f"{name}.key"}"', f'publisher = "{publisher}"', ""]))
        certbot.rules.write_text(fleet_rules(etcd, keys, recipients))
        certbot.rules.chmod(0o644)
        for host in hosts.values():
            host.rules.chmod(0o644)
        # The admin's part: the lines `fleet roles` prints, run as etcd's root.
        etcd.enable_auth()
        roles = run_certrelay(certbot, wrapper, "roles", command="fleet")
        environment = {key: value for key, value in os.environ.items() if not key.startswith(("ETCDCTL_", "ETCD_"))}
        environment["ETCDCTL_USER"] = f"root:{etcd.root_password}"
        done = subprocess.run(["sh", "-e"], input=roles.stdout, text=True, cwd=roles_dir, env=environment,
                              capture_output=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"the lines of `fleet roles` failed: {done.stderr[-1500:]}")
        fingerprint = renew(certbot)
        run_certrelay(certbot, wrapper)
        store = store_module.Store([etcd.endpoint], etcd.ca_file, PUBLISHER_USER, "publisher-secret", timeout=30)
        revision, _ = store.range(PREFIX + "acks/", keys_only=True)
        acks = AckWatch(store, revision + 1)
        values = AckWatch(store, revision + 1, PREFIX + "hosts/", seal.peek)
        daemons = {}
        try:
            progress(f"fleet: starting {SUBSCRIBERS} `certrelay subscribe` and {SUBSCRIBERS} `certrelay watch`")
            for name, host in hosts.items():
                daemons[name] = [start_daemon(wrapper, host, command, work / f"{name}-{command}.log")
                                 for command in ("subscribe", "watch")]
            wait_for(lambda: len(acks.current(fingerprint)) == len(hosts), 60,
                     f"all {SUBSCRIBERS} hosts to acknowledge the first certificate as current", 0.05)
            turns = []
            for turn in range(TURNS):
                time.sleep(2.0)  # every daemon idle again, as a renewal finds them
                progress(f"fleet: {SUBSCRIBERS} subscribers, turn {turn + 1}/{TURNS}")
                turns.append(subscriber_turn(certbot, wrapper, hosts, acks, values, turn))
            began = time.monotonic()
            status = run_certrelay(certbot, wrapper, "status", "--json", command="fleet")
            status_took = time.monotonic() - began
            load = f"{load_before:.2f} at the start of this part, {os.getloadavg()[0]:.2f} after the turns"
            rows = json.loads(status.stdout)
            all_current = sum(row["state"] == "current" for row in rows)
            for processes in daemons.values():
                for process in processes:
                    PROCESSES.stop(process)
            idle = idle_subscriber(work, wrapper, hosts[names[0]])
        finally:
            for processes in daemons.values():
                for process in processes:
                    PROCESSES.stop(process)
            acks.close()
            values.close()
            store.close()
    report_subscribers(turns, all_current, len(rows), status_took, load)
    report_idle(*idle)


def quoted(output, key):
    for line in output.splitlines():
        if line.startswith(key + " = "):
            return line.split('"')[1]
    raise RuntimeError(f"no {key} line in {output!r}")


def start_daemon(wrapper, host, command, log, notify=None, **environment):
    if notify is not None:
        environment["NOTIFY_SOCKET"] = notify.path
    with open(log, "ab") as output:
        return PROCESSES.start([str(wrapper), command, *host.arguments()], env=host.environment(**environment),
                               stdout=subprocess.DEVNULL, stderr=output)


def subscriber_turn(certbot, wrapper, hosts, acks, values, turn):
    fingerprint = renew(certbot)
    wall = time.time()
    start = time.monotonic()
    run_certrelay(certbot, wrapper)
    published = time.monotonic() - start
    wait_for(lambda: len(acks.current(fingerprint)) == len(hosts), 60,
             f"all {len(hosts)} hosts to acknowledge turn {turn + 1}'s certificate as current", 0.005)
    current = acks.current(fingerprint)
    pending = acks.first(fingerprint, "pending")
    sequences = acks.sequences(fingerprint)
    landed = values.landed(fingerprint)
    stages = {"landed": [landed[name] - start for name in hosts], "installed": [], "restarted": [], "acknowledged": [],
              "seen": [], "sequences": [], "reasons": []}
    for name, host in hosts.items():
        seen, ack = current[name]
        calls = host.calls()
        if len(calls) != turn + 2 or set(calls) != {"restart dovecot.service"}:
            raise RuntimeError(f"{name}'s systemctl calls after turn {turn + 1}: {calls}")
        restarted = os.stat(host.bin / "calls").st_mtime - wall
        if name in pending:
            stages["installed"].append(pending[name]["time"] - wall)
        stages["restarted"].append(restarted)
        stages["acknowledged"].append(ack["time"] - wall)
        stages["seen"].append(seen - start)
        stages["sequences"].append(" → ".join(state for state, _ in sequences[name]))
        stages["reasons"] += [f"{state}: {reason}" for state, reason in sequences[name]
                              if state != "current" and reason]
    return {"published": published, "all": max(stages["seen"]), **stages}


def report_subscribers(turns, all_current, rows, status_took, load):
    everyone = statistics.median(turn["all"] for turn in turns)
    goal = "met" if everyone <= GOAL_20 else f"not met by {seconds(everyone - GOAL_20)}"
    ROWS.append(Row("fleet", f"{SUBSCRIBERS} real subscribers (`certrelay subscribe` + the host's `certrelay watch`,"
                             f" settle = 0): publishing starts → all {SUBSCRIBERS} acknowledged current in etcd"
                             f" (target ≤ 2 s plus their restarts: {goal})",
                    f"median {seconds(everyone)} ({', '.join(seconds(turn['all']) for turn in turns)})",
                    "the goal", seconds(GOAL_20), ratio(everyone, GOAL_20)))

    def pooled(key):
        return [value for turn in turns for value in turn[key]]

    installed = pooled("installed")
    ROWS.append(Row("fleet", f"the same, where the time goes (from the start of publishing, per host and turn)",
                    f"publishing (`certrelay run`, {SUBSCRIBERS} hosts) "
                    f"{seconds(statistics.median(turn['published'] for turn in turns))}; the new values seen in etcd"
                    f" (a watch on hosts/): {spread(pooled('landed'))}; installed and notified"
                    f" (its pending ack's stamp): {spread(installed) if installed else 'no pending ack'}; systemctl"
                    f" restart called (the fake's calls file): {spread(pooled('restarted'))}; current ack stamped:"
                    f" {spread(pooled('acknowledged'))}; seen in etcd: {spread(pooled('seen'))}"))
    counted = collections.Counter(sequence for turn in turns for sequence in turn["sequences"])
    reasons = collections.Counter(reason for turn in turns for reason in turn["reasons"])
    slow = [turn["acknowledged"][index] for turn in turns for index, sequence in enumerate(turn["sequences"])
            if sequence != "pending → current"]
    ROWS.append(Row("fleet", f"the same: the acks each host put, in order ({SUBSCRIBERS} hosts × {len(turns)} turns)",
                    "; ".join(f"{sequence}: {count}" for sequence, count in counted.most_common())
                    + (f" (those not \"pending → current\" were current after {spread(slow)})" if slow else "")
                    + "".join(f"; reason given {count}×: \"{reason[:200]}\""
                              for reason, count in reasons.most_common(2))))
    ROWS.append(Row("fleet", "`certrelay fleet status --json` after the turns", f"{all_current} of {rows} current,"
                             f" in {seconds(status_took)}"))
    NOTES.append(
        f"fleet, {SUBSCRIBERS} subscribers: each host has its own config dir, state dir, X25519 key (`certrelay fleet"
        " keygen`), etcd user (the lines `certrelay fleet roles` prints, run as etcd's root) and rules: settle = 0,"
        " min-interval = 0, one [[rule]] restarting dovecot through the recording fake systemctl (tests/fake_systemctl,"
        " a shell script: about 3 ms a call), and [subscribe]. Its `certrelay subscribe` and its own `certrelay watch`"
        f" run side by side ({2 * SUBSCRIBERS} processes on 2 cores, with etcd and the certbot host's run). A turn"
        " renews on the certbot host, queues the hook's notification and runs `certrelay run` there; the clock stops"
        " when this process, watching acks/ as the publisher's user, has seen a \"current\" ack with the new"
        f" fingerprint from every host; {TURNS} turns, 2 s apart; medians. The stages come from each host's own"
        " stamps: the time field of its \"pending\" ack (put right after the install and the notification), the"
        " mtime of its fake systemctl's calls file, the time field of its \"current\" ack. The watch daemon's"
        " default settle (5 s) would add 5 s; a path unit would start one `certrelay run` (about 70 ms of cold"
        f" start) per host instead. Load average: {load}."
    )


# --- 3. an idle subscriber ----------------------------------------------------------------


def idle_subscriber(work, wrapper, host):
    """Run one host's subscriber (watchdog on, after READY=1) beside its `certrelay watch`
    and `sleep` for IDLE_SECONDS; return (deltas, RSS, pings, elapsed, the subscriber's threads)."""
    sockets = {label: NotifySocket(work / f"idle-{label}.sock") for label in ("subscribe", "watch")}
    try:
        processes = {}
        for label, command in (("certrelay subscribe", "subscribe"), ("certrelay watch", "watch")):
            processes[label] = start_daemon(wrapper, host, command, work / f"idle-{command}.log",
                                            notify=sockets[command], WATCHDOG_USEC="60000000")
            sockets[command].wait_for("READY=1", 30)
        processes["sleep"] = PROCESSES.start(["sleep", str(IDLE_SECONDS + 30)])
        before, after, started, elapsed = side_by_side(processes, "fleet: idle subscriber", IDLE_SECONDS)
        pings = {label: sockets[command].count("WATCHDOG=1", since=started)
                 for label, command in (("certrelay subscribe", "subscribe"), ("certrelay watch", "watch"))}
        threads = len(os.listdir(f"/proc/{processes['certrelay subscribe'].pid}/task"))
        for process in processes.values():
            PROCESSES.stop(process)
    finally:
        for notify in sockets.values():
            notify.close()
    delta = {label: {key: after[label][key] - before[label][key] for key in ("switches", "ticks", "runtime")}
             for label in processes}
    rss = {label: after[label]["rss"] for label in processes}
    return delta, rss, pings, elapsed, threads


def report_idle(delta, rss, pings, elapsed, threads):
    ours = delta["certrelay subscribe"]
    tick = 1 / os.sysconf("SC_CLK_TCK")
    for base in ("certrelay watch", "sleep"):
        theirs = delta[base]
        ROWS.append(Row("fleet", f"idle subscriber: wake-ups in {IDLE_SECONDS} s (context switches)",
                        f"{ours['switches']}", base, f"{theirs['switches']}",
                        ratio(ours["switches"], theirs["switches"])))
    for base in ("certrelay watch", "sleep"):
        theirs = delta[base]
        ROWS.append(Row("fleet", f"idle subscriber: CPU time in {IDLE_SECONDS} s: utime+stime (schedstat run time;"
                                 " the ratio is of run time)",
                        f"{ours['ticks'] * tick * 1e3:.0f} ms ({ours['runtime'] / 1e6:.2f} ms)", base,
                        f"{theirs['ticks'] * tick * 1e3:.0f} ms ({theirs['runtime'] / 1e6:.2f} ms)",
                        ratio(ours["runtime"], theirs["runtime"])))
    for base in ("certrelay watch", "sleep"):
        ROWS.append(Row("fleet", "idle subscriber: RSS (VmRSS)", f"{rss['certrelay subscribe'] / 1024:.1f} MiB", base,
                        f"{rss[base] / 1024:.1f} MiB", ratio(rss["certrelay subscribe"], rss[base])))
    ROWS.append(Row("fleet", f"idle subscriber: WATCHDOG=1 pings received in {IDLE_SECONDS} s (WATCHDOG_USEC = 60 s)",
                    f"{pings['certrelay subscribe']}", "certrelay watch", f"{pings['certrelay watch']}"))
    NOTES.append(
        f"fleet, idle subscriber: one of the {SUBSCRIBERS} hosts' `certrelay subscribe` ({threads} threads: the"
        " main loop and the etcd watch's reader), started again alone with WATCHDOG_USEC=60000000 and a"
        " NOTIFY_SOCKET bound by the script, measured after READY=1, side by side with that host's `certrelay"
        f" watch` (the same watchdog) and `sleep` over the same {elapsed:.1f} s, counted as the idle part counts"
        " (voluntary + involuntary context switches of all threads, utime+stime, schedstat run time, VmRSS);"
        " etcd idle too, nothing published."
    )


# --- the part ------------------------------------------------------------------------------


def run(work):
    reason = unavailable_reason()
    if reason:
        ROWS.append(Row("fleet", "one renewal for 1,000 hosts; 20 subscribers; an idle subscriber",
                        f"not measured: {reason}"))
        return
    sys.path.insert(0, str(REPO))
    wrapper = install_certrelay("", work / "install")
    lib = work / "install" / "lib"  # where the wrapper finds the certrelay package
    many = work / "many"
    many.mkdir()
    publish_to_many(many, wrapper, lib)
    few = work / "few"
    few.mkdir()
    real_subscribers(few, wrapper)
