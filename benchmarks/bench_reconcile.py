"""Reconcile: `certrelay run` with nothing queued on a host with many lineages.

Each run (a cron job's, a path unit's) looks at every lineage under live/ as well, to
catch a renewal whose notification was lost and a certificate about to expire. On an
empty queue with nothing changed, the idle memo should make that a stat per lineage,
and the full batch (`--force`: lineage scan, reconcile, expiry) should stay cheap
too. Measured with 10,000 unchanged lineages (sandbox.py's scale_certificates, all in
the ledger after one run acted on each) under the scale benchmark's 100 rules, against
the same runs on a config dir without lineages: the ratio is what the lineages cost.
The two take turns, the order reversed every round; no systemctl call is allowed.
"""

import statistics
import time

from harness import NOTES, ROWS, progress, seconds_row
from sandbox import Sandbox, certificates, install_certrelay, scale_certificates, scale_rules

RECONCILE_LINEAGES = 10_000
RECONCILE_REPEATS = 7


def run(work):
    wrapper = install_certrelay("", work / "install")
    pool = certificates(work.parent / "certificates")
    certificates_ = scale_certificates(RECONCILE_LINEAGES)
    full = Sandbox(work / "full", scale_rules())
    empty = Sandbox(work / "empty", scale_rules())
    progress(f"reconcile: {RECONCILE_LINEAGES:,} lineages, acted on once so that the ledger holds them all")
    for name, domains in certificates_:
        full.renew(name, version=1, pem=pool.pem(name, domains))
        (full.queue / name).write_bytes(full.notification(name, domains))
    for sandbox in (full, empty):
        done = sandbox.certrelay(wrapper, "run", timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"certrelay run exited {done.returncode}:\n{done.stderr[-2000:]}")
        (sandbox.bin / "calls").unlink(missing_ok=True)
    # Plain runs find the idle memo that the first one left; --force runs the full batch
    # (lineage scan, reconcile, expiry) every time.
    walls = {"full": [], "empty": [], "full --force": [], "empty --force": []}
    for round_number in range(RECONCILE_REPEATS):
        runs = [(key + flag, sandbox, flag) for flag in ("", " --force")
                for key, sandbox in (("full", full), ("empty", empty))]
        for key, sandbox, flag in runs[:: 1 if round_number % 2 else -1]:
            started = time.monotonic()
            done = sandbox.certrelay(wrapper, "run", *flag.split(), timeout=300)
            walls[key].append(time.monotonic() - started)
            if done.returncode != 0 or sandbox.calls():
                raise RuntimeError(f"certrelay run ({key}) exited {done.returncode} after {len(sandbox.calls())}"
                                   f" systemctl calls:\n{done.stderr[-2000:]}")
    ours, theirs = statistics.median(walls["full"]), statistics.median(walls["empty"])
    ROWS.append(seconds_row("reconcile", f"`certrelay run`, empty queue, {RECONCILE_LINEAGES:,} unchanged lineages:"
                            " wall time (the idle memo: a stat per lineage)", ours, "the same run with no lineages",
                            theirs))
    ours, theirs = statistics.median(walls["full --force"]), statistics.median(walls["empty --force"])
    ROWS.append(seconds_row("reconcile", "`certrelay run --force`, the same: the full batch (scan, reconcile, expiry)",
                            ours, "the same run with no lineages", theirs))
    NOTES.append(
        f"reconcile: {RECONCILE_LINEAGES:,} lineages under live/ ({pool.how}), all acted on once before (so the"
        f" ledger holds each), 100 rules; then `certrelay run` with nothing queued, {RECONCILE_REPEATS} times"
        " each, alternating with the same run on a config dir without lineages; medians; no systemctl call"
        " allowed. Where certrelay has no reconcile yet, both runs do the same work (ratio about 1)."
    )
