"""Several `certrelay run` at once, the watch daemon, and the real hook firing in a loop.

Until each has done its share of the work (an amount, not a time: the same on any
machine), publishers renew certificates and run the hook, three loops run `certrelay
run`, and one `certrelay watch` reacts to the same queue. Then one final run.
Nothing may be lost (the last certificate of every lineage was acted on), nothing acted
on more often than it was published, and no two processes act at the same time.
"""

import collections
import hashlib
import json
import os
import re
import signal
import subprocess
import threading

from certrelay import certificate
from tests import wait

LINEAGES = [f"site{index}.example" for index in range(10)]
PUBLISHERS = 2
ROUNDS = 20  # times each publisher publishes each of its lineages, at least
RUN_LOOPS = 3
RUNS = 3  # `certrelay run`s each run loop completes, at least
WORK_DEADLINE = 600  # seconds for all that work: a deadline that turns a hang into a failure
JOIN_TIMEOUT = 150  # a thread may be inside a `certrelay run`, itself bounded at 120 s

#: Run by certrelay for each certificate: records NAME, the SHA-256 of the live
#: certificate it sees, its parent (the certrelay process acting) and when it ran.
RECORDER = """\
#!/bin/sh
start=$(date +%s%N)
sum=""
attempt=0
# cert.pem is missing between the publisher's unlink and symlink: wait for it (10 s at most).
until sum=$(sha256sum 2>/dev/null < "$2/cert.pem"); do
    attempt=$((attempt + 1))
    [ "$attempt" -lt 1000 ] || break
    sleep 0.01
done
sleep 0.02  # an action that takes a while, so that two processes acting at once overlap
end=$(date +%s%N)
digest=${sum%% *}
printf '%s %s %s %s %s\\n' "$1" "${digest:-unreadable}" "$PPID" "$start" "$end" >> "RECORD"
"""

#: The only errors a run may report here: certbot's renewal (and the test's, which does
#: the same) replaces live/NAME/cert.pem by unlink + symlink, and a run that reads it in
#: between drops that notification; the hook's next one follows.
EXPECTED_ERRORS = re.compile(
    r"error: dropped the notification for \S+: its live certificate cannot be read: .*"
    r"|error: \d+ notification\(s\), .* without a readable certificate.*"
)


def fingerprint(relay, name):
    with open(os.path.join(relay.config_dir, "live", name, "cert.pem"), "rb") as file:
        return hashlib.sha256(file.read()).hexdigest()


def unexpected_errors(output):
    """Return the lines of `output` that are errors other than EXPECTED_ERRORS."""
    return [
        line for line in output.splitlines()
        if "Traceback" in line or (line.startswith("error: ") and not EXPECTED_ERRORS.fullmatch(line))
    ]


def in_loop(stop, failures, step, done, index):
    """Return a thread body that calls `step()` until `stop` is set, counting the calls
    in done[index] and keeping exceptions."""

    def body():
        try:
            while not stop.is_set():
                step()
                done[index] += 1
        except Exception as error:  # reported by the test, not lost in the thread
            failures.append(repr(error))

    return body


def test_runs_daemon_and_hook_at_once_lose_nothing_repeat_nothing_and_never_overlap(relay, tmp_path):
    record = tmp_path / "record"
    recorder = tmp_path / "recorder"
    recorder.write_text(RECORDER.replace("RECORD", str(record)))
    recorder.chmod(0o755)
    relay.write_rules(
        "[settings]\nsettle = 0.1\nmax-wait = 1\nmin-interval = 0\n\n"
        f'[[rule]]\nmatch = ["*"]\nreload = ["apache2"]\nrun = [["{recorder}", "{{name}}", "{{lineage}}"]]\n'
    )
    log = tmp_path / "watch.log"
    with open(log, "wb") as output:
        daemon = subprocess.Popen(relay.command("watch"), env=relay.environment(), stdout=output, stderr=subprocess.STDOUT)
    relay.processes.append(daemon)

    def watching():
        assert daemon.poll() is None, log.read_text(errors="replace")
        return "watching " in log.read_text(errors="replace")

    wait.until(watching, what="the daemon to watch", explain=lambda: log.read_text(errors="replace"))

    stop = threading.Event()
    failures, published, runs = [], [], []
    done, shares = [0] * (PUBLISHERS + RUN_LOOPS), [ROUNDS] * PUBLISHERS + [RUNS] * RUN_LOOPS

    def publish_all(names):
        def step():
            for name in names:  # every name at least once, whenever stop comes
                relay.publish(name)
                published.append((name, fingerprint(relay, name)))

        return step

    threads = [
        threading.Thread(target=in_loop(stop, failures, publish_all(LINEAGES[index::PUBLISHERS]), done, index))
        for index in range(PUBLISHERS)
    ] + [
        threading.Thread(target=in_loop(stop, failures, lambda: runs.append(relay.run()), done, PUBLISHERS + index))
        for index in range(RUN_LOOPS)
    ]
    for thread in threads:
        thread.start()
    # All keep going until the slowest has done its share (or one failed).
    wait.until(lambda: failures or all(count >= share for count, share in zip(done, shares)), WORK_DEADLINE,
               what=f"every loop to do its share {shares}", explain=lambda: f"done: {done}")
    stop.set()
    for thread in threads:
        thread.join(JOIN_TIMEOUT)
    assert not any(thread.is_alive() for thread in threads)
    final = relay.run()
    daemon.send_signal(signal.SIGTERM)

    assert daemon.wait(timeout=30) == 0
    assert failures == []
    for result in runs + [final]:
        assert result.returncode in (0, 1) and unexpected_errors(result.stderr) == [], result.stderr
        assert result.returncode == 0 or "without a readable certificate" in result.stderr
    assert unexpected_errors(log.read_text(errors="replace")) == []
    assert final.returncode == 0, final.stderr
    assert relay.entries("queue") == [] and relay.entries("claimed") == []

    # Nothing lost: the last certificate of every lineage was acted on, and is the one
    # the ledger holds.
    last = dict(published)
    assert sorted(last) == sorted(LINEAGES)
    acted = [line.split() for line in record.read_text().splitlines()]
    seen = collections.defaultdict(set)
    for name, digest, *_ in acted:
        seen[name].add(digest)
    for name in LINEAGES:
        assert last[name] in seen[name], f"the last certificate of {name} was never acted on"
    with open(os.path.join(relay.state_dir, "ledger.json"), encoding="utf-8") as file:  # DER fingerprints
        assert json.load(file) == {name: certificate.fingerprint(relay.config_dir, name) for name in LINEAGES}
    assert {name: fingerprint(relay, name) for name in LINEAGES} == last

    # Nothing repeated: never more actions than notifications.
    publications = collections.Counter(name for name, _ in published)
    reloads = relay.calls().count("reload apache2.service")
    assert 1 <= reloads <= len(published) and len(relay.calls()) == reloads
    for name, count in collections.Counter(name for name, *_ in acted).items():
        assert count <= publications[name], name

    # Never two processes acting at once: the state lock makes batches sequential.
    intervals = sorted((int(start), int(end), parent) for _, _, parent, start, end in acted)
    for index, (start, end, parent) in enumerate(intervals):
        for other_start, other_end, other_parent in intervals[index + 1:]:
            if other_start >= end:
                break
            assert other_parent == parent, f"processes {parent} and {other_parent} acted at the same time"
