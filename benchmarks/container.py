"""A booted Debian container (systemd-nspawn) for the benchmarks that need systemd.

Reuses the end-to-end test's code, imported read-only: tests/e2e/rootfs.py (the cached
root file system, `cached_rootfs()`, and `Overlay`, a private writable layer on it, so
the cache is never written) and tests/e2e/container.py (`Container`: boot with
systemd-nspawn --private-network, run commands inside with nsenter, power off). The
container has its own network namespace (only `lo`): apache2 inside listens on the
container's 127.0.0.1 and the host's ports stay untouched.

    box = BenchContainer(work_dir, log=print)
    box.prepare()           # overlay mounted: write files under box.root before or after boot
    box.boot()              # systemd running
    box.run(["systemctl", "is-active", "apache2"])
    box.stop()              # always: poweroff (by PID), unmount, remove work_dir

Needs root, systemd-nspawn, nsenter, overlayfs, and the cached root file system (built on
first use by tests/e2e/rootfs.py with mmdebstrap, a few minutes).
"""

import importlib.util
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
E2E = REPO / "tests" / "e2e"
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def load_e2e(name):
    """Import tests/e2e/NAME.py under a private module name; return it, or None if absent."""
    path = E2E / f"{name}.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location(f"certrelay_bench_e2e_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unavailable_reason():
    """Return why no container can be booted here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    for name in ("rootfs", "container"):
        if not (E2E / f"{name}.py").exists():
            return f"tests/e2e/{name}.py does not exist (yet)"
    reason = load_e2e("rootfs").skip_reason()
    if reason:
        return reason
    return None


class BenchContainer:
    """One booted container on a private overlay of the cached root file system."""

    def __init__(self, work_dir, log=print):
        self.work_dir = Path(work_dir)
        self.log = log
        self.overlay = None
        self.container = None

    @property
    def root(self):
        return self.overlay.root

    @property
    def leader(self):
        return self.container.leader

    def prepare(self):
        """Find (or build) the cached root file system and mount a writable overlay on it."""
        rootfs = load_e2e("rootfs")
        lower = rootfs.cached_rootfs(log=self.log)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.overlay = rootfs.Overlay(lower, self.work_dir)
        self.overlay.mount()
        return self.root

    def boot(self, timeout=120):
        container_module = load_e2e("container")
        self.container = container_module.Container(
            self.root, self.work_dir / "console.log", name=f"certrelay-bench-{os.getpid()}")
        self.container.boot(timeout=timeout)

    def enter(self, namespaces="n"):
        """Return the nsenter prefix that runs a host program in the container's namespaces
        (default: the network namespace only)."""
        return ["nsenter", "-t", str(self.leader), *(f"-{letter}" for letter in namespaces), "--"]

    def run(self, argv, check=True, timeout=120):
        """Run `argv` inside the container (all namespaces, a clean environment); return
        the CompletedProcess (text). With `check`, raise RuntimeError if it fails."""
        done = self.container.run(list(argv), timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"in the container, {' '.join(argv)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        return done

    def host_path(self, path):
        """Return the host's path of the container's absolute `path` (on the overlay)."""
        return self.root / str(path).lstrip("/")

    def stop(self):
        """Power the container off (by PID), unmount the overlay, remove the work dir."""
        try:
            if self.container is not None:
                self.container.stop(timeout=30)
        finally:
            if self.overlay is not None and self.overlay.mounted:
                self.overlay.unmount()
            if self.work_dir.exists() and not (self.overlay and self.overlay.mounted):
                subprocess.run(["rm", "-rf", "--one-file-system", "--", str(self.work_dir)], check=False)
