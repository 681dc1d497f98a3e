"""Scale: one `certrelay run` on a large backlog of renewals.

A host that comes back after downtime, or a certbot that renews many lineages at once,
leaves certrelay thousands of notifications. The batch must still end in one
systemctl call per unit, in little time and memory. Measured on 10,000 notifications
(each with its real live certificate) under 100 rules over 20 units (sandbox.py's
scale_certificates and scale_rules), against:

- a naive shell loop (naive-loop.sh) that calls systemctl per notification per unit,
  as a hand-written hook does: wall time, CPU time, systemctl calls, peak memory;
- the floor (scale-floor.py): the least any program does with that queue (claim, read
  and delete each notification; read, hash and parse each certificate), which shows how
  much of the 1 s target is left to certrelay at all;
- itself at 2,500 and 5,000 notifications, and under 25 and 50 rules: is it linear?
- in process, the rule matching alone: certrelay.matcher against the simple matcher
  (fnmatch per rule, per pattern, per domain), which must agree with it.

A note names certrelay's hotspots (cProfile) in that batch.
"""

import os
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness import (HERE, NOTES, PROCESSES, PYTHON, REPO, ROWS, Row, progress, ratio, require, rotated, seconds,
                     seconds_row)
from sandbox import Sandbox, certificates, install_certrelay, scale_certificates, scale_rules

TOOLS = ("/usr/bin/time",)  # without one, the rows that need it say "not measured"
SCALE_NOTIFICATIONS = 10_000
SCALE_SIZES = (2_500, 5_000, 10_000)  # notifications, under 100 rules: linear in notifications?
SCALE_RULE_COUNTS = (25, 50, 100)  # rules, under 10,000 notifications: linear in rules?
SCALE_REPEATS = 3  # runs per configuration, interleaved; the median counts
SCALE_BASELINE_CAP = 150.0  # seconds: a slower naive loop is stopped and extrapolated


def run_measured(argv, env, log, timeout=None, group=False):
    """Run `argv` under /usr/bin/time to completion (or `timeout`), its output in the
    file `log`. Return (wall s, {"maxrss": KiB, "cpu": s} or None if killed, exit
    status, timed out, the log's text).

    /usr/bin/time, not wait4() here: a child forked from this (large) Python process
    would report this process's RSS as its peak (the kernel records the old memory's
    high-water mark at exec); /usr/bin/time is small."""
    usage_file = Path(log).with_suffix(".time")
    started = time.monotonic()
    with open(log, "wb") as output:
        process = PROCESSES.start(["/usr/bin/time", "-f", "%M %U %S", "-o", str(usage_file), *argv],
                                  group=group, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        process.wait(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
        PROCESSES.stop(process)
    wall = time.monotonic() - started
    usage = None
    if not timed_out:
        maxrss, user, system = usage_file.read_text().split()[-3:]
        usage = {"maxrss": int(maxrss), "cpu": float(user) + float(system)}
    return wall, usage, process.returncode, timed_out, Path(log).read_text(errors="replace")


def hotspots(profile, count=6):
    """Return the certrelay functions with the largest cumulative time in the cProfile
    output `profile`, below the command's own entry points, as text."""
    stats = pstats.Stats(str(profile))
    total = max(entry[3] for entry in stats.stats.values())
    entry_points = {"run", "wrapper", "main", "process", "settle_batch", "<module>"}
    own = sorted(
        ((cumulative, f"{Path(file).stem}.{function}")
         for (file, _, function), (_, _, _, cumulative, _) in stats.stats.items()
         if f"{os.sep}certrelay{os.sep}" in file and function not in entry_points and not function.startswith("<")),
        reverse=True)
    return ", ".join(f"{name} {cumulative / total:.0%}" for cumulative, name in own[:count])


FLOOR = ("floor", 0)  # scale-floor.py's turn among the scale configurations


def run(work):
    missing = require(*TOOLS)
    if missing:
        ROWS.append(Row("scale", "10,000 notifications", f"not measured: {missing}"))
        return
    sys.path.insert(0, str(REPO))
    try:
        from certrelay import matcher, plan as plan_module, rules as rules_module, spool as spool_module
    finally:
        sys.path.remove(str(REPO))
    # One config dir per size: certrelay looks at every lineage under live/ (reconcile,
    # expiry), so a smaller batch must come with fewer lineages, not just fewer notifications.
    sites = {count: Sandbox(work / f"site-{count}", scale_rules()) for count in SCALE_SIZES}
    sandbox = sites[SCALE_NOTIFICATIONS]
    wrapper = install_certrelay("", work / "install")
    rule_files = {}
    for count in SCALE_RULE_COUNTS:
        rule_files[count] = sandbox.rules.parent / f"rules-{count}.toml"
        rule_files[count].write_text(scale_rules(count))
        rule_files[count].chmod(0o644)
    rules = rules_module.load(str(sandbox.rules))
    certificates_ = scale_certificates(SCALE_NOTIFICATIONS)
    pool = certificates(work.parent / "certificates")
    progress(f"scale: making {len(certificates_):,} live certificates ({pool.how}) and notifications")
    contents = {count: {} for count in SCALE_SIZES}
    for index, (name, domains) in enumerate(certificates_):
        for count, site in sites.items():
            if index < count:
                site.renew(name, version=1, pem=pool.pem(name, domains))
                contents[count][name] = site.notification(name, domains)

    def fill_queue(count=SCALE_NOTIFICATIONS):
        for name, data in contents[count].items():
            (sites[count].queue / name).write_bytes(data)

    def run_batch(count, rule_count, tag):
        """`certrelay run` on `count` notifications under `rule_count` rules, with a fresh
        state dir (else every certificate is "unchanged"). Return (wall s, usage, calls, log)."""
        site = sites[count]
        fill_queue(count)
        arguments = ["--config-dir", str(site.config_dir), "--rules", str(rule_files[rule_count]),
                     "--state-dir", str(work / f"state-{tag}")]
        wall, usage, status, _, log = run_measured([str(wrapper), "run", *arguments], site.environment(),
                                                   work / f"certrelay-{tag}.log", timeout=300)
        calls = site.calls()
        (site.bin / "calls").unlink(missing_ok=True)
        left = os.listdir(site.queue) + os.listdir(site.claimed)
        if status != 0 or left:
            raise RuntimeError(f"certrelay run exited {status}, left {len(left)} entries:\n{log[-2000:]}")
        return wall, usage, calls, log

    def run_floor(tag):
        """scale-floor.py on the full queue: the least work any program does with it."""
        fill_queue()
        wall, _, status, _, log = run_measured([PYTHON, str(HERE / "scale-floor.py"), str(sandbox.config_dir)],
                                               sandbox.environment(), work / f"floor-{tag}.log", timeout=300)
        left = os.listdir(sandbox.queue) + os.listdir(sandbox.claimed)
        if status != 0 or left:
            raise RuntimeError(f"scale-floor.py exited {status}, left {len(left)} entries:\n{log[-2000:]}")
        return wall, None, None, log

    # Linearity: every configuration SCALE_REPEATS times, interleaved, the median run
    # counts; FLOOR (scale-floor.py) takes its turn among them.
    configs = [(count, 100) for count in SCALE_SIZES]
    configs += [(SCALE_NOTIFICATIONS, rule_count) for rule_count in SCALE_RULE_COUNTS if rule_count != 100]
    measured = {config: [] for config in configs + [FLOOR]}
    for round_number in range(SCALE_REPEATS):
        turns = configs + [FLOOR]
        for count, rule_count in rotated(turns, round_number):
            tag = f"{count}-{rule_count}-{round_number}"
            if (count, rule_count) == FLOOR:
                progress(f"scale: the floor, {SCALE_NOTIFICATIONS:,} notifications (round {round_number + 1})")
                measured[FLOOR].append(run_floor(tag))
                continue
            progress(f"scale: certrelay run, {count:,} notifications, {rule_count} rules"
                     f" (round {round_number + 1} of {SCALE_REPEATS})")
            measured[count, rule_count].append(run_batch(count, rule_count, tag))
    median_run = {config: sorted(runs, key=lambda run: run[0])[len(runs) // 2] for config, runs in measured.items()}
    wall, usage, calls, stderr = median_run[SCALE_NOTIFICATIONS, 100]
    certrelay_cpu, certrelay_rss = usage["cpu"], usage["maxrss"]
    log_lines = stderr.splitlines()
    longest = max((len(line.encode()) for line in log_lines), default=0)

    # Matching alone, in this process: the simple matcher (Rule.selects per rule) vs
    # certrelay.matcher (built once, included), on the same certificates, interleaved.
    timings = {"simple": [], "matcher": []}
    for _ in range(3):
        started = time.perf_counter()
        simple = [[rule.line for rule in rules.rules if rule.selects(name, domains)] for name, domains in certificates_]
        timings["simple"].append(time.perf_counter() - started)
        started = time.perf_counter()
        fast = matcher.Matcher(rules.rules)
        indexed = [[rule.line for rule in fast.matching(name, domains)] for name, domains in certificates_]
        timings["matcher"].append(time.perf_counter() - started)
        if indexed != simple:
            raise RuntimeError("certrelay.matcher disagrees with the simple matcher on the scale rules")

    # What each certificate needs, by certrelay's own matching: the naive loop's plan.
    plans, units = [], set()
    for name, domains in certificates_:
        notification = spool_module.Notification(entry=name, name=name, lineage="", domains=tuple(domains), time="")
        actions = plan_module.make_plan([notification], rules, str(sandbox.config_dir)).actions
        plans.append(f"{name} " + " ".join(f"{action.verb}:{action.target}" for action in actions))
        units |= {action.target for action in actions}
    (work / "plan.txt").write_text("\n".join(plans) + "\n")
    naive_calls = sum(len(line.split()) - 1 for line in plans)

    # Where the time goes: the same batch again under cProfile.
    fill_queue()
    progress("scale: certrelay run again under cProfile, for the hotspots")
    arguments = sandbox.arguments()
    arguments[arguments.index(str(sandbox.state_dir))] = str(work / "state-profile")
    done = subprocess.run([PYTHON, "-m", "cProfile", "-o", str(work / "run.prof"), str(wrapper), "run", *arguments],
                          env=sandbox.environment(), capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"certrelay run under cProfile exited {done.returncode}:\n{done.stderr[-2000:]}")
    NOTES.append("scale: cProfile of certrelay's batch, cumulative share of the run: " + hotspots(work / "run.prof"))
    (sandbox.bin / "calls").unlink(missing_ok=True)

    fill_queue()
    progress(f"scale: naive shell loop, {naive_calls:,} systemctl calls expected (stopped after {SCALE_BASELINE_CAP:g} s)")
    base_wall, base_usage, base_status, timed_out, base_stderr = run_measured(
        ["/bin/sh", str(HERE / "naive-loop.sh"), str(sandbox.queue), str(work / "plan.txt")],
        sandbox.environment(), work / "naive.log", timeout=SCALE_BASELINE_CAP, group=True)
    base_calls = len(sandbox.calls())
    if not timed_out and (base_status != 0 or base_calls != naive_calls):
        raise RuntimeError(f"naive loop exited {base_status} after {base_calls} calls:\n{base_stderr[-2000:]}")
    label = "naive loop (sh, per notification per unit)"
    if timed_out:
        base_wall /= base_calls / naive_calls
        label += f", extrapolated from {base_calls:,} of {naive_calls:,} calls"
        base_calls = naive_calls
    metric = f"{SCALE_NOTIFICATIONS:,} notifications, {len(rules.rules)} rules"
    walls = ", ".join(seconds(run[0]) for run in measured[SCALE_NOTIFICATIONS, 100])
    ROWS.append(seconds_row("scale", f"{metric}: wall time (target ≤ 1 s)", wall, label, base_wall,
                            shown=f"{seconds(wall)} (median of {walls})"))
    floor = median_run.pop(FLOOR)[0]
    ROWS.append(seconds_row("scale", f"{metric}: wall time against the floor", wall,
                            "the floor: scale-floor.py (claim, read and delete each notification; read, hash and"
                            " parse each certificate; nothing else)", floor))
    if base_usage:
        ROWS.append(seconds_row("scale", f"{metric}: CPU time (user+sys, with children)", certrelay_cpu, label,
                                base_usage["cpu"]))
    check = "= distinct units ✓" if len(calls) == len(units) else f"≠ {len(units)} distinct units ✗"
    ROWS.append(Row("scale", f"{metric}: systemctl calls", f"{len(calls)} ({check}: {len(units)})", label,
                    f"{base_calls:,}", ratio(len(calls), base_calls)))
    ROWS.append(Row("scale", f"{metric}: peak memory (max RSS of the process tree)", f"{certrelay_rss / 1024:.1f} MiB",
                    label, f"{base_usage['maxrss'] / 1024:.1f} MiB" if base_usage else "n/a (stopped)",
                    ratio(certrelay_rss, base_usage["maxrss"]) if base_usage else ""))
    # Linear: the wall time of each size against 10,000's scaled down in proportion.
    for count, rule_count in configs:
        if (count, rule_count) == (SCALE_NOTIFICATIONS, 100):
            continue
        share = count / SCALE_NOTIFICATIONS if rule_count == 100 else rule_count / 100
        what = f"{count:,} notifications, 100 rules" if rule_count == 100 else f"10,000 notifications, {rule_count} rules"
        ours = median_run[count, rule_count][0]
        ROWS.append(seconds_row("scale", f"linearity: {what}: wall time", ours,
                                f"10,000 × 100 scaled by {share:g} (linear)", wall * share))
    simple_time, matcher_time = statistics.median(timings["simple"]), statistics.median(timings["matcher"])
    ROWS.append(seconds_row("scale", f"{metric}: rule matching alone, in process", matcher_time,
                            "simple matcher (fnmatch per rule, per pattern, per domain)", simple_time,
                            shown=f"certrelay.matcher {seconds(matcher_time)}"))
    NOTES.append(
        f"scale: {SCALE_NOTIFICATIONS:,} queue files in the hook's format, each with its live certificate: {pool.how};"
        " rules: one catch-all, 49 lineage-name globs, 25 mail-domain rules, 24 domain globs, 1 mixed (20 units,"
        " reload, restart, reload-or-restart; fewer rules: an even spread of these); every seventh certificate"
        " is a wildcard one. Each configuration ran"
        f" {SCALE_REPEATS} times, interleaved, each with a fresh state dir; the median run counts. Linearity: a"
        " ratio of 1 is linear; above 1 the smaller run costs more than its share (the fixed start-up cost"
        " shows there). Both use the recording fake systemctl (tests/fake_systemctl, about 3 ms a call). The"
        " naive loop gets each certificate's units precomputed (certrelay's own matching), so it measures the"
        " calls alone. Peak memory and CPU time: /usr/bin/time (%M: the largest RSS of the process and its"
        f" descendants; %U + %S). certrelay's log of this batch: {len(log_lines)} lines, the longest"
        f" {longest:,} bytes. Smaller batches: a config dir holding only their lineages. Matching alone: median of 3, the matcher's build included, results"
        " checked equal."
    )
    NOTES.append(
        "scale, the floor: benchmarks/scale-floor.py, same interpreter, same queue, its turn among the runs above;"
        " no check of names, sizes, links or contents, no rules, no state, no log. "
        + (f"The floor alone takes {seconds(floor)}: more than the 1 s target on this machine."
           if floor > 1 else f"The floor takes {seconds(floor)}: the 1 s target leaves certrelay {seconds(1 - floor)}"
           " for everything the floor skips.")
    )
