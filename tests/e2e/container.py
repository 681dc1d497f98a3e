"""A booted systemd in a container: systemd-nspawn, driven from the host with nsenter.

    container = Container(root_dir, log_path)
    container.boot()                      # waits until systemd is up (running or degraded)
    container.run(["systemctl", "restart", "dovecot"])
    container.serial_on_port(993)         # the certificate a TLS client sees
    container.stop()                      # poweroff, wait; kill by PID only as a last resort

    boot_all([a, b, c])                   # several at once: all start, then each is waited for
    stop_all([a, b, c])                   # all asked to power off, then each is waited for
    lan = Lan(a, "192.0.2.10")            # a private network between them (a bridge in a's
    lan.connect(b, "192.0.2.25")          # namespace, a veth pair to each other one)

No machined: `--register=no`, and the leader (the container's PID 1) is found as the
child of the systemd-nspawn process. `--private-network` gives the container a loopback
of its own, so its ports never clash with the host's; the host reaches them with
`nsenter --net`. `Lan` links containers with each other, never with the host.
"""

import os
import signal
import subprocess
from pathlib import Path

from tests import wait  # the repository is on sys.path: under pytest, and in benchmarks/run.py

#: The environment of commands run inside: like a root login, nothing from the host.
INSIDE_ENVIRONMENT = [
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG=C.UTF-8", "HOME=/root", "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0",
]


class ContainerError(RuntimeError):
    """The container did not boot, or a command inside it could not be run."""


def wait_until(predicate, timeout, interval=0.2, what="condition", explain=None):
    """Call `predicate()` until it returns a true value; return that value.

    Raises AssertionError after `timeout` seconds, with `what` and the text `explain()`
    returns (e.g. the relevant journals), so a failed wait says why (tests.wait.until,
    polling every `interval` s: most predicates here run a command in the container).
    """
    return wait.until(predicate, timeout, what=what, explain=explain, interval=interval)


class Container:
    """One systemd-nspawn container booting the directory `root`.

    Fields: root, log_path (nspawn's and the console's output), options (more
    systemd-nspawn options), process (the systemd-nspawn Popen), leader (the
    container's PID 1 as the host sees it).
    """

    def __init__(self, root, log_path, name="certrelay-e2e", options=()):
        self.root = Path(root)
        self.log_path = Path(log_path)
        self.name = name
        self.options = tuple(options)  # more systemd-nspawn options
        self.process = None
        self.leader = None
        self.powering_off = False

    # --- life cycle ----------------------------------------------------------------

    def boot(self, timeout=120):
        """Start systemd-nspawn and wait until systemd inside is up; return self.

        Up means `systemctl is-system-running` says running or degraded (a unit that
        cannot work in a container is no reason to stop). Raises ContainerError with
        the console log if nspawn exits or systemd does not come up within `timeout`.
        """
        self.start()
        return self.wait_booted(timeout)

    def start(self):
        """Start systemd-nspawn, without waiting (`wait_booted` waits); return self."""
        argv = [
            "systemd-nspawn", "--quiet", "--directory", str(self.root), "--boot",
            "--register=no", "--keep-unit", "--private-network", f"--machine={self.name}",
            "--link-journal=no", "--resolv-conf=off", "--timezone=off", "--console=pipe",
            # bpf: without it systemd inside runs every unit WITHOUT its IP firewall
            # (IPAddressDeny=, silently): the units' hardening is then not what is tested.
            "--system-call-filter=bpf", *self.options,
        ]
        self.leader, self.powering_off = None, False
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        return self

    def wait_booted(self, timeout=120):
        """Wait until the container `start` started has a PID 1 and systemd in it is up
        (as `boot` says); return self."""

        def leader():
            self._check_alive()
            self.leader = self._find_leader()
            return self.leader

        try:
            wait.until(leader, timeout, what="the container's PID 1", interval=0.05)
        except AssertionError:
            raise ContainerError(f"no container PID 1 after {timeout} s:\n{self.console_log()}") from None
        state = ""

        def up():
            nonlocal state
            self._check_alive()
            state = self.run(["systemctl", "is-system-running"], timeout=10).stdout.strip()
            return state in ("running", "degraded")

        try:
            wait.until(up, timeout, what="systemd in the container to be up", interval=0.2)
        except AssertionError:
            raise ContainerError(
                f"systemd in the container is {state!r}, not up after {timeout} s:\n"
                f"{self.run(['systemctl', '--failed', '--no-legend']).stdout}\n{self.console_log()}"
            ) from None
        return self

    def stop(self, timeout=60):
        """Power the container off and wait for systemd-nspawn to exit.

        SIGRTMIN+4 asks the container's systemd for a clean poweroff. If nspawn has not
        exited after `timeout` s, SIGKILL the leader (which ends every process in the
        container's PID namespace), then nspawn itself; both by PID. Safe to call twice.
        """
        if self.process is None or self.process.poll() is not None:
            return
        if not self.powering_off:
            self.poweroff()
        try:
            self.process.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            pass
        for pid in (self.leader, self.process.pid):
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.process.wait(timeout=30)

    def poweroff(self):
        """Ask the container's systemd for a clean poweroff (SIGRTMIN+4 to its PID 1; before
        there is one, SIGTERM to nspawn), without waiting: `stop` waits."""
        if self.process is None or self.process.poll() is not None:
            return
        self.powering_off = True
        if self.leader:
            try:
                os.kill(self.leader, signal.SIGRTMIN + 4)
            except ProcessLookupError:
                pass
        else:
            self.process.terminate()

    def _check_alive(self):
        if self.process.poll() is not None:
            raise ContainerError(f"systemd-nspawn exited with {self.process.returncode}:\n{self.console_log()}")

    def _find_leader(self):
        """Return the container's PID 1 (a child of nspawn in a new PID namespace), or None."""
        own = os.readlink("/proc/self/ns/pid")
        pid = self.process.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return None
        for child in children:
            try:
                if os.readlink(f"/proc/{child}/ns/pid") == own:
                    continue
                status = Path(f"/proc/{child}/status").read_text()
            except OSError:
                continue
            nspid = next((line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), [])
            if nspid[-1:] == ["1"]:
                return int(child)
        return None

    def console_log(self, lines=80):
        """Return the last `lines` lines nspawn and the container's console printed."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # --- commands inside -----------------------------------------------------------

    def run(self, argv, timeout=60, check=False, namespaces=("-a",), input=None, environment=()):
        """Run `argv` inside the container (all its namespaces); return the CompletedProcess.

        Text output; the environment is INSIDE_ENVIRONMENT only, plus `environment`
        ("NAME=value" strings); stdin is `input` (text), else empty. With `check`, raise
        ContainerError (with the output) for a non-zero exit status.
        """
        command = ["nsenter", "-t", str(self.leader), *namespaces, "env", "-i", *INSIDE_ENVIRONMENT, *environment,
                   *argv]
        stdin = {"input": input} if input is not None else {"stdin": subprocess.DEVNULL}
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **stdin)
        if check and done.returncode != 0:
            raise ContainerError(f"{' '.join(argv)} exited with {done.returncode}:\n{done.stdout}{done.stderr}")
        return done

    def systemctl(self, *args, check=True):
        """Run `systemctl ARGS` inside; return its stdout (raise ContainerError if it fails and `check`)."""
        return self.run(["systemctl", *args], check=check).stdout

    def show(self, unit, *properties):
        """Return {property: value} from `systemctl show UNIT -p ...` inside the container."""
        out = self.systemctl("show", unit, *(f"--property={name}" for name in properties))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit, lines=50, since=None):
        """Return the journal of `unit` inside (last `lines` lines, or all since epoch `since`)."""
        argv = ["journalctl", "--no-pager", "--quiet", "-o", "short-monotonic", "-u", unit]
        argv += [f"--since=@{since:.0f}"] if since is not None else ["-n", str(lines)]
        done = self.run(argv)
        return done.stdout + done.stderr

    def journals(self, *units, lines=50):
        """Return the journals of `units`, each under a heading, for failure messages."""
        return "\n".join(f"--- journalctl -u {unit} -n {lines}\n{self.journal(unit, lines)}" for unit in units)

    def serial_on_port(self, port, server_name="example.test", timeout=10):
        """Return the serial (hex) of the certificate served on 127.0.0.1:PORT inside, or None.

        The host's openssl runs in the container's network namespace only; None if
        nothing answers or the handshake fails.
        """
        client = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-n", "openssl", "s_client", "-connect", f"127.0.0.1:{port}",
             "-servername", server_name],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
        )
        if "-----BEGIN CERTIFICATE-----" not in client.stdout:
            return None
        parsed = subprocess.run(["openssl", "x509", "-noout", "-serial"], input=client.stdout,
                                capture_output=True, text=True, timeout=timeout)
        return parsed.stdout.strip().partition("=")[2] or None


def boot_all(containers, timeout=120):
    """Boot `containers` side by side: start every systemd-nspawn, then wait for each
    (as Container.boot does); return them. The ones that started are the caller's to
    stop, also when one fails to boot (ContainerError)."""
    for container in containers:
        container.start()
    for container in containers:
        container.wait_booted(timeout)
    return containers


def stop_all(containers, timeout=60):
    """Stop `containers` side by side: ask each to power off, then `stop` each (which
    waits, and kills by PID one that does not go)."""
    for container in containers:
        container.poweroff()
    errors = []
    for container in containers:
        try:
            container.stop(timeout)
        except Exception as error:  # the others are still stopped; then it is raised
            errors.append(error)
    if errors:
        raise errors[0]


class Lan:
    """A private network between booted containers, made by the test with addresses it
    chooses: a bridge in the network namespace of `hub` (which gets `address` on it), and
    a veth pair from that bridge to each container `connect`ed. Nothing is made in the
    host's network namespace and nothing routes out of it (no default route, no
    forwarding): the containers reach each other and nothing else. Every link lives in
    the containers' namespaces and goes with them when they stop.

    The host's `ip` (iproute2) runs in the containers' network namespaces (nsenter -n).
    """

    def __init__(self, hub, address, prefix_length=24, interface="lan0"):
        self.hub, self.prefix_length, self.interface = hub, prefix_length, interface
        self.addresses = {hub.name: address}
        self._ip(hub, "link", "add", interface, "type", "bridge")
        self._ip(hub, "addr", "add", f"{address}/{prefix_length}", "dev", interface)
        self._ip(hub, "link", "set", interface, "up")

    def connect(self, container, address):
        """Link `container` to the hub's bridge; its end is INTERFACE with `address`."""
        port = f"lan{len(self.addresses)}"  # the hub's end, on the bridge
        self._ip(self.hub, "link", "add", port, "type", "veth", "peer", "name", self.interface,
                 "netns", str(container.leader))
        self._ip(self.hub, "link", "set", port, "master", self.interface, "up")
        self._ip(container, "addr", "add", f"{address}/{self.prefix_length}", "dev", self.interface)
        self._ip(container, "link", "set", self.interface, "up")
        self.addresses[container.name] = address
        return self

    @staticmethod
    def _ip(container, *argv):
        command = ["nsenter", "-t", str(container.leader), "-n", "ip", *argv]
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise ContainerError(f"{' '.join(command)} exited with {done.returncode}:\n{done.stdout}{done.stderr}")
