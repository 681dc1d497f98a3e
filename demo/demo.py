"""certrelay demo, step by step: certbot renews certificates in a container, the deploy
hook queues notifications, and `certrelay run` restarts/reloads units for them.

Run through demo/demo.sh (it installs the Debian packages first), as root:
    sh demo/demo.sh [--keep] [--docker | --stand-in]
--keep leaves the throw-away directory in place and prints its path.
--docker builds the test image if it is not built yet (one to three minutes, once).
--stand-in runs certbot in the stand-in container even where Docker could run.

Where a Docker engine can run (root on Debian: tools/need installs docker.io, mmdebstrap
and iproute2; dockerd starts) and the end-to-end tests' image is built (`make e2e`
builds it, or --docker), certbot runs in a real container, as the README's cron line
runs it: `docker run --rm -v /etc/letsencrypt:/etc/letsencrypt -v
/var/lib/letsencrypt:/var/lib/letsencrypt certbot/dns-cloudflare ...`, the image being
tests/e2e/docker_image.py's (like the official one: BusyBox as /bin/sh, no bash), in a
dockerd the demo starts in namespaces of its own and stops by its PID (tests/e2e/dockerd.py),
its data root kept in .cache/demo-docker so that the image is imported once. Elsewhere,
or when the engine fails, certbot from PyPI runs in a stand-in container (tests/acme.py:
its own mount namespace, BusyBox as /bin/sh). The demo says which it used and why.

Everything happens in a throw-away directory under /var/tmp (removed at the end) and
against Pebble; systemctl is demo/systemctl, a stand-in that only prints.
Exit status: 0 when every step worked, 1 otherwise.
"""

import contextlib
import fcntl
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
DOMAINS = (["example.test", "*.example.test"], ["mail.example.test"])
#: dockerd's data root, kept between demos (the image is imported into it once, 10 to 20 s),
#: and the lock that keeps two demos from starting a daemon on it at once.
DATA_ROOT = REPO / ".cache" / "demo-docker"
DATA_LOCK = REPO / ".cache" / "demo-docker.lock"
#: The README's cron line without its schedule and `; certrelay run`, as the demo runs it
#: (with --force-renewal: the certificates it just obtained are not due).
README_RENEW = ("docker run --rm -v /etc/letsencrypt:/etc/letsencrypt -v /var/lib/letsencrypt:/var/lib/letsencrypt"
                " certbot/dns-cloudflare renew")

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
    shown = f"$DEMO/{Path(config_dir).relative_to(Path(rules).parent)}"  # rules.toml is in $DEMO
    say("$ " + " ".join(["python3", "-m", "certrelay", command, "--config-dir", shown,
                         "--rules", "$DEMO/rules.toml", "--state-dir", "$DEMO/state", *options]))
    return subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)


class StandIn:
    """certbot from PyPI (.cache/certbot-venv) in a stand-in container: its own mount
    namespace, the demo's letsencrypt/ at /etc/letsencrypt, BusyBox as /bin/sh, no bash;
    Pebble on 127.0.0.1 (tests/acme.py)."""

    name = "stand-in"

    def __init__(self, demo_dir, why):
        self.demo_dir = demo_dir
        self.config = demo_dir / "letsencrypt"
        self.why = why
        self.server = None

    def prepare(self, stack):
        step("certbot from PyPI in a STAND-IN container (installed once into .cache/certbot-venv)")
        if self.why:
            say(f"no real container: {self.why}")
        if not (acme.DEFAULT_VENV / "bin" / "certbot").exists():
            say("installing certbot with pip, once (about 15 s) ...")
        certbot = acme.ensure_certbot()
        say(f"certbot {acme.certbot_version(certbot)}: {certbot.relative_to(REPO)}")
        step("Start Pebble (ACME test server) and its DNS server on 127.0.0.1")
        self.server = stack.enter_context(acme.acme_server(self.demo_dir / "acme", certbot=certbot))
        say(f"throw-away directory ($DEMO): {self.demo_dir}")
        say(f"ACME directory: {self.server.directory_url} (pid {self.server.pebble_pid})")
        say(f"DNS for DNS-01: 127.0.0.1:{self.server.dns_port} (pebble-challtestsrv, pid {self.server.challtestsrv_pid})")
        say("certbot runs as in its container: own mount namespace, $DEMO/letsencrypt")
        say("at /etc/letsencrypt, BusyBox as /bin/sh, no bash")

    def certonly(self, domains):
        self.server.certonly(self.config, domains)

    def renew(self):
        step("Force a renewal of all certificates (certbot renew --force-renewal)")
        return self.server.renew(self.config)


class InDocker:
    """certbot in the end-to-end tests' image certbot/dns-cloudflare, through `docker run`
    with the README's volumes, in a dockerd started for the demo (stopped by its PID);
    Pebble on the Docker bridge, where the container reaches it."""

    name = "docker"

    def __init__(self, demo_dir, e2e):
        self.demo_dir = demo_dir
        self.e2e = e2e  # (docker_image, dockerd, rootfs) from tests/e2e
        # The "host" whose /etc/letsencrypt the daemon's volumes resolve to.
        self.config = demo_dir / "host" / "etc" / "letsencrypt"
        self.images = None

    def prepare(self, stack):
        docker_image, dockerd, _ = self.e2e
        image = docker_image.certbot_image()
        step(f"certbot {docker_image.CERTBOT_VERSION} in a REAL CONTAINER: docker run {dockerd.IMAGE}")
        tar = docker_image.CACHE / f"{image.name}-image-{docker_image.cache_key(image)}.tar"
        if not tar.is_file():
            say("building the image once (Debian packages and certbot from PyPI: one to three minutes) ...")
        tar = docker_image.cached_tar(image, log=lambda line: None)
        say(f"image: {tar.relative_to(REPO)} (like the official one: BusyBox as /bin/sh, no bash)")
        daemon = self.start_daemon(stack, dockerd)
        say(f"dockerd started (pid {daemon.process.pid}), in namespaces of its own; its /etc/letsencrypt is")
        say("$DEMO/host/etc/letsencrypt, so the README's -v /etc/letsencrypt:/etc/letsencrypt gives the")
        say("container the demo's certificates")
        self.images = dockerd.CertbotInDocker(daemon, self.config, image).prepare()
        kept = f"{DATA_ROOT.relative_to(REPO)}" if daemon.data_root == DATA_ROOT else "$DEMO (another demo holds the kept one)"
        say(f"image {'found in' if self.images.reused else 'imported into'} dockerd's data root {kept}")
        (self.config / "cli.ini").write_text("no-random-sleep-on-renew = true\n")
        say("letsencrypt/cli.ini: no-random-sleep-on-renew = true (as the README says)")
        step("Start Pebble (ACME test server) and its DNS server on the Docker bridge")
        pebble = dockerd.PebbleOnBridge(daemon, self.demo_dir, self.images.acme_dir, 90 * 86400)
        stack.callback(self.stop_pebble, pebble)
        pebble.start()
        say(f"throw-away directory ($DEMO): {self.demo_dir}")
        say(f"ACME directory: {dockerd.DIRECTORY_URL} (pid {pebble.processes[1].pid})")
        say(f"DNS for DNS-01: {dockerd.BRIDGE_IP}:{dockerd.DNS_PORT} (pebble-challtestsrv, pid {pebble.processes[0].pid})")

    def start_daemon(self, stack, dockerd):
        """Start dockerd, its images in DATA_ROOT (kept between demos: the image is imported
        once) unless another demo holds it; a kept data root it cannot start on is made anew."""
        DATA_ROOT.parent.mkdir(parents=True, exist_ok=True)
        lock = stack.enter_context(open(DATA_LOCK, "w"))
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            data_root = DATA_ROOT
        except BlockingIOError:
            data_root = None
        for attempt in (1, 2):
            daemon = dockerd.DockerDaemon(self.demo_dir / "host", self.demo_dir, data_root=data_root)
            stack.callback(self.stop_daemon, daemon)
            try:
                return daemon.start()
            except (AssertionError, RuntimeError) as error:
                daemon.stop()
                if data_root is None or attempt == 2:
                    raise RuntimeError(f"dockerd did not start: {str(error).splitlines()[0]}") from None
                say(f"dockerd did not start on {data_root.relative_to(REPO)}: making it anew")
                subprocess.run(["rm", "-rf", "--one-file-system", "--", str(data_root)], check=False)

    @staticmethod
    def stop_pebble(pebble):
        pebble.stop()
        say("pebble and pebble-challtestsrv stopped")

    @staticmethod
    def stop_daemon(daemon):
        if daemon.process is not None and daemon.process.returncode is None:
            daemon.stop()
            say(f"dockerd (pid {daemon.process.pid}) stopped, its mounts gone with it")

    def certonly(self, domains):
        done = self.images.certonly(domains)
        if done.returncode != 0:
            raise RuntimeError(f"certbot certonly {' '.join(domains)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")

    def renew(self):
        step("Force a renewal of all certificates, in the container")
        say(f"$ {README_RENEW} --force-renewal")
        return self.images.run("renew", "--force-renewal")


def load_e2e():
    """Import tests/e2e's docker_image, dockerd and rootfs (the repository on sys.path)."""
    sys.path.insert(0, str(REPO))
    from tests.e2e import docker_image, dockerd, rootfs  # noqa: E402
    return docker_image, dockerd, rootfs


def choose_certbot(demo_dir, mode):
    """Return the certbot back end for `mode` (auto, docker, stand-in): InDocker where an
    engine can run and (auto) the image is built already, else StandIn saying why. For
    InDocker, tools/need installs docker.io, mmdebstrap and iproute2 first."""
    if mode == "stand-in":
        return StandIn(demo_dir, "--stand-in was given")
    e2e = load_e2e()
    docker_image = e2e[0]
    image = docker_image.certbot_image()
    if mode == "auto" and not (docker_image.CACHE / f"{image.name}-image-{docker_image.cache_key(image)}.tar").is_file():
        return StandIn(demo_dir, "the test image is not built yet, which takes one to three minutes once;"
                                 " `sh demo/demo.sh --docker` builds it and uses it (so does `make e2e`)")
    need = subprocess.run(["sh", str(REPO / "tools" / "need"), "demo", "docker.io", "mmdebstrap", "iproute2"])
    if need.returncode != 0:
        return StandIn(demo_dir, "docker.io, mmdebstrap or iproute2 could not be installed")
    reason = docker_image.skip_reason() or e2e[1].skip_reason()
    return StandIn(demo_dir, reason) if reason else InDocker(demo_dir, e2e)


def obtain_and_renew(certbot):
    """Start the back end, obtain the certificates, install the hooks, renew (all in one
    ExitStack: the servers stop at its end); return False if the renewal failed."""
    config = certbot.config
    with contextlib.ExitStack() as stack:
        certbot.prepare(stack)

        step("Obtain certificates (DNS-01)")
        for domains in DOMAINS:
            t = time.monotonic()
            certbot.certonly(domains)
            say(f"{' + '.join(domains):34} -> live/{domains[0]}/ "
                f"serial {acme.cert_serial(config, domains[0])} ({time.monotonic() - t:.1f} s)")

        step("Install the deploy hook into letsencrypt/renewal-hooks/deploy/")
        acme.install_deploy_hook(config, HOOK)
        acme.install_deploy_hook(config, DEMO / "shell-probe-hook")
        # certbot 5.3+ ran the hooks already there for the new certificates: none yet, but
        # start from an empty queue all the same.
        say("certrelay-hook    writes letsencrypt/certrelay/queue/NAME after each renewal")
        say("shell-probe-hook  (demo only) records which shell runs the deploy hooks")

        t = time.monotonic()
        result = certbot.renew()
        say(f"certbot renew exited {result.returncode} ({time.monotonic() - t:.1f} s)")
        if result.returncode != 0:
            say(result.stdout + result.stderr)
            return False
        for name in ("example.test", "mail.example.test"):
            say(f"live/{name}/cert.pem -> cert{acme.cert_version(config, name)}.pem, "
                f"serial {acme.cert_serial(config, name)}")
        probe = config / "demo-shell-probe.log"
        for line in probe.read_text().splitlines() if probe.exists() else ["(no probe output)"]:
            say(f"deploy hook for {line}")

        step("Stop Pebble" + (" and dockerd" if certbot.name == "docker" else ""))
    if certbot.name == "stand-in":
        say("pebble and pebble-challtestsrv stopped")
    return True


def main():
    keep = "--keep" in sys.argv[1:]
    mode = "stand-in" if "--stand-in" in sys.argv[1:] else "docker" if "--docker" in sys.argv[1:] else "auto"
    reason = acme.skip_reason()
    if reason:
        sys.exit(f"demo: cannot run: {reason}")
    if not HOOK.exists():
        sys.exit(f"demo: {HOOK} is missing")
    started = time.monotonic()
    ok = True

    demo_dir = Path(tempfile.mkdtemp(prefix="certrelay-demo.", dir="/var/tmp"))
    certbot = choose_certbot(demo_dir, mode)
    try:
        try:
            renewed = obtain_and_renew(certbot)
        except Exception as error:  # noqa: BLE001 - the engine failed: say so, then the stand-in
            if certbot.name != "docker":
                raise
            say(f"the real container failed: {str(error).strip().splitlines()[0][:300]}")
            say("falling back to the stand-in container")
            subprocess.run(["rm", "-rf", "--one-file-system", "--", str(demo_dir / "host")], check=False)
            certbot = StandIn(demo_dir, f"the Docker engine failed ({str(error).splitlines()[0][:120]})")
            renewed = obtain_and_renew(certbot)
        if not renewed:
            raise SystemExit("demo: certbot renew failed")
        config = certbot.config

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
            # Never across a mount (dockerd's are gone with it; this makes sure).
            subprocess.run(["rm", "-rf", "--one-file-system", "--", str(demo_dir)], check=False)
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
