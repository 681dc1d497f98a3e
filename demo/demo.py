"""certrelay demo, step by step: certbot in a stand-in container renews certificates, the
deploy hook queues notifications, and `certrelay run` restarts/reloads units for them.

Run through demo/demo.sh (it installs the Debian packages first), as root:
    sh demo/demo.sh [--keep]
--keep leaves the throw-away directory in place and prints its path.

Everything happens in a throw-away directory under /var/tmp (removed at the end) and
against Pebble on 127.0.0.1; systemctl is demo/systemctl, a stand-in that only prints.
Exit status: 0 when every step worked, 1 otherwise.
"""

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEMO = Path(__file__).resolve().parent
REPO = DEMO.parent
HOOK = REPO / "certrelay" / "certrelay-hook"

RULES = """\
# Demo rules: which units to act on when a certificate was renewed.
[[rule]]
match = ["example.test"]          # the wildcard certificate's lineage
restart = ["dovecot", "exim4"]

[[rule]]
match = ["*"]                     # every certificate
reload = ["apache2"]
"""


def load_acme():
    """Load tests/acme.py (the Pebble + certbot harness) by path."""
    spec = importlib.util.spec_from_file_location("certrelay_tests_acme", REPO / "tests" / "acme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


acme = load_acme()
STEP = 0


def step(title):
    """Print a numbered step heading."""
    global STEP
    STEP += 1
    print(f"\n==> {STEP}. {title}", flush=True)


def say(text=""):
    """Print detail lines, indented under the current step."""
    for line in str(text).rstrip("\n").splitlines() or [""]:
        print(f"    {line}", flush=True)


def show_file(path, relative_to):
    """Print a file's name (relative to `relative_to`) and its content, indented."""
    say(f"{path.relative_to(relative_to)}:")
    for line in path.read_text().splitlines():
        say(f"    {line}")


def certrelay(config_dir, rules, state_dir, *options, path=None, env_extra=None, command="run"):
    """Run `python3 -m certrelay COMMAND ...` with Debian's python3 and the repo on PYTHONPATH.

    Out: the CompletedProcess (stdout and stderr merged into stdout).
    """
    env = dict(os.environ, PYTHONPATH=str(REPO), **(env_extra or {}))
    if path:
        env["PATH"] = path
    argv = [
        "/usr/bin/python3", "-m", "certrelay", command,
        "--config-dir", str(config_dir), "--rules", str(rules), "--state-dir", str(state_dir),
        *options,
    ]
    say("$ " + " ".join(["python3", "-m", "certrelay", command, "--config-dir", "$DEMO/letsencrypt",
                         "--rules", "$DEMO/rules.toml", "--state-dir", "$DEMO/state", *options]))
    return subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)


def main():
    keep = "--keep" in sys.argv[1:]
    reason = acme.skip_reason()
    if reason:
        sys.exit(f"demo: cannot run: {reason}")
    if not HOOK.exists():
        sys.exit(f"demo: {HOOK} is missing")
    started = time.monotonic()
    ok = True

    step("certbot from PyPI (installed once into .cache/certbot-venv)")
    if not (acme.DEFAULT_VENV / "bin" / "certbot").exists():
        say("installing certbot with pip, once (about 15 s) ...")
    certbot = acme.ensure_certbot()
    say(f"certbot {acme.certbot_version(certbot)}: {certbot.relative_to(REPO)}")

    demo_dir = Path(tempfile.mkdtemp(prefix="certrelay-demo.", dir="/var/tmp"))
    config = demo_dir / "letsencrypt"
    try:
        step("Start Pebble (ACME test server) and its DNS server on 127.0.0.1")
        with acme.acme_server(demo_dir / "acme", certbot=certbot) as server:
            say(f"throw-away directory ($DEMO): {demo_dir}")
            say(f"ACME directory: {server.directory_url} (pid {server.pebble_pid})")
            say(f"DNS for DNS-01: 127.0.0.1:{server.dns_port} (pebble-challtestsrv, pid {server.challtestsrv_pid})")
            say("certbot runs as in its container: own mount namespace, $DEMO/letsencrypt")
            say("at /etc/letsencrypt, BusyBox as /bin/sh, no bash")

            step("Obtain certificates (DNS-01)")
            for domains in (["example.test", "*.example.test"], ["mail.example.test"]):
                t = time.monotonic()
                server.certonly(config, domains)
                say(f"{' + '.join(domains):34} -> live/{domains[0]}/ "
                    f"serial {acme.cert_serial(config, domains[0])} ({time.monotonic() - t:.1f} s)")

            step("Install the deploy hook into letsencrypt/renewal-hooks/deploy/")
            acme.install_deploy_hook(config, HOOK)
            acme.install_deploy_hook(config, DEMO / "shell-probe-hook")
            say("certrelay-hook    writes letsencrypt/certrelay/queue/NAME after each renewal")
            say("shell-probe-hook  (demo only) records which shell runs the deploy hooks")

            step("Force a renewal of all certificates (certbot renew --force-renewal)")
            t = time.monotonic()
            result = server.renew(config)
            say(f"certbot renew exited {result.returncode} ({time.monotonic() - t:.1f} s)")
            if result.returncode != 0:
                say(result.stdout + result.stderr)
                raise SystemExit("demo: certbot renew failed")
            for name in ("example.test", "mail.example.test"):
                say(f"live/{name}/cert.pem -> cert{acme.cert_version(config, name)}.pem, "
                    f"serial {acme.cert_serial(config, name)}")
            probe = config / "demo-shell-probe.log"
            for line in probe.read_text().splitlines() if probe.exists() else ["(no probe output)"]:
                say(f"deploy hook for {line}")

        step("Stop Pebble")
        say("pebble and pebble-challtestsrv stopped")

        step("The queue the host reads: letsencrypt/certrelay/queue/")
        queue = config / "certrelay" / "queue"
        for path in sorted(queue.iterdir()) if queue.is_dir() else []:
            show_file(path, config)

        step("Rules: $DEMO/rules.toml")
        rules = demo_dir / "rules.toml"
        rules.write_text(RULES)
        say(RULES)
        state = demo_dir / "state"

        step("Plan only: certrelay run --dry-run")
        result = certrelay(config, rules, state, "--dry-run")
        say(result.stdout or "(no output)")
        if result.returncode != 0:
            say(f"certrelay run --dry-run exited {result.returncode}")
            ok = False

        step("For real, with a STAND-IN systemctl (demo/systemctl: prints, touches nothing)")
        systemctl_log = demo_dir / "systemctl.log"
        result = certrelay(
            config, rules, state,
            path=f"{DEMO}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
            env_extra={"DEMO_SYSTEMCTL_LOG": str(systemctl_log)},
        )
        say(result.stdout or "(no output)")
        if result.returncode != 0:
            say(f"certrelay run exited {result.returncode}")
            ok = False
        calls = systemctl_log.read_text().splitlines() if systemctl_log.exists() else []
        say("stand-in systemctl was called:" if calls else "stand-in systemctl was not called")
        for call in calls:
            say(f"  {call}")
        left = sorted(p.name for p in queue.iterdir()) if queue.is_dir() else []
        say(f"queue afterwards: {', '.join(left) if left else 'empty'}")

        step("What an admin asks afterwards: certrelay status")
        result = certrelay(config, rules, state, command="status")
        say(result.stdout or "(no output)")
        if result.returncode != 0:
            say(f"certrelay status exited {result.returncode}")
            ok = False
    finally:
        step("Clean up")
        if keep:
            say(f"kept {demo_dir}")
        else:
            shutil.rmtree(demo_dir, ignore_errors=True)
            say(f"removed {demo_dir}")
    print(f"\n{'Done' if ok else 'FAILED'} in {time.monotonic() - started:.1f} s.")
    return 0 if ok else 1


if __name__ == "__main__":
    # Ctrl-C or a TERM still runs the clean-up: Pebble stopped, throw-away directory removed.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit("demo: interrupted")
