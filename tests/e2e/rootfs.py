"""A Debian root file system for the end-to-end test, built once and cached.

`cached_rootfs()` builds bookworm with mmdebstrap (systemd, apache2, dovecot, exim4,
python3 with certrelay's Debian dependencies) into REPO/.cache/e2e-rootfs-HASH, HASH
covering everything that goes into the build; `cached_rootfs(packages=...)` builds
another package set (e.g. PACKAGES plus etcd for the fleet test) into its own HASH. The
build goes into a temporary directory that is renamed into place only when complete, so
an interrupted build is never reused. `Overlay` gives each test run a writable copy on
top of it (overlayfs): runs never change the cache; `scratch_roots` gives several
machines one each, on the same cache.

Run as a script to build (or find) the cache: python3 tests/e2e/rootfs.py
"""

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache"
SUITE = "bookworm"
#: Bumped by hand when the build changes in a way the argv below does not show.
BUILD_VERSION = "1"
PACKAGES = (
    "systemd", "systemd-sysv", "dbus",
    "apache2", "dovecot-imapd", "exim4-daemon-light", "openssl", "ssl-cert", "ca-certificates",
    # daemons that cannot read /etc/letsencrypt: certrelay installs their files
    "haproxy", "postgresql",
    # certrelay on the server's own python3, no pip: what the package depends on.
    "python3", "python3-click", "python3-pyinotify", "python3-sdnotify", "python3-cryptography",
    # `man certrelay` from the package (test_package.py lets dpkg install its man pages)
    "man-db",
    # for a person debugging inside the container (ps, ss)
    "procps", "iproute2",
)
BUILD_TIMEOUT = 900  # seconds: a cold build takes about a minute or two


def debian_mirror():
    """Return the Debian mirror apt uses on this host (sources.list*), or deb.debian.org.

    Reads one-line (`deb URI SUITE ...`) and deb822 (`URIs:`) sources; skips security
    and third-party archives by taking the first URI whose path ends in /debian.
    """
    candidates = []
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for source in sources:
        try:
            text = source.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        for line in text.splitlines():
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            if words[0] == "URIs:":
                candidates += words[1:]
            elif words[0] == "deb":
                candidates += [word for word in words[1:] if "://" in word][:1]
    for uri in candidates:
        if uri.rstrip("/").endswith("/debian"):
            return uri.rstrip("/")
    return "http://deb.debian.org/debian"


def mmdebstrap_argv(target, mirror=None, packages=PACKAGES):
    """Return the mmdebstrap command line that builds the root file system of
    `packages` (default PACKAGES) into `target`."""
    mirror = mirror or debian_mirror()
    return [
        "mmdebstrap", "--mode=root", "--variant=minbase", "--quiet",
        "--include=" + ",".join(packages),
        # No documentation or man pages: smaller and faster to build.
        "--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        SUITE, str(target), f"deb {mirror} {SUITE} main",
    ]


def cache_key(mirror=None, packages=PACKAGES):
    """Return the hash naming the cached root file system (argv without the target)."""
    argv = mmdebstrap_argv("TARGET", mirror, packages)
    return hashlib.sha256("\0".join([BUILD_VERSION, *argv]).encode()).hexdigest()[:16]


def skip_reason():
    """Return why the root file system cannot be built or booted here, or None."""
    if os.geteuid() != 0:
        return "needs root (mmdebstrap --mode=root, systemd-nspawn, overlay mounts, nsenter)"
    for tool in ("mmdebstrap", "systemd-nspawn", "nsenter", "mount", "umount", "openssl"):
        if not shutil.which(tool):
            return f"{tool} is not on PATH: apt-get install mmdebstrap systemd-container util-linux openssl"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "the kernel has no overlayfs"
    return None


def mounts_under(path):
    """Return the mount points at or below `path` (from /proc/self/mountinfo), deepest first."""
    path = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == path or point.startswith(path + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def remove_tree(path):
    """Remove the directory `path`, never crossing into a file system mounted below it.

    Mounts left below it (an interrupted mmdebstrap leaves /proc, /dev, /sys bound in its
    target) are unmounted first; if one cannot be, the tree is left alone (RuntimeError).
    """
    path = Path(path)
    for point in mounts_under(path):
        subprocess.run(["umount", "--recursive", point], capture_output=True)
    left = mounts_under(path)
    if left:
        raise RuntimeError(f"not removing {path}: still mounted below it: {left}")
    subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)], check=True)


def cached_rootfs(log=print, packages=PACKAGES):
    """Return the path of the complete cached root file system of `packages` (default
    PACKAGES: the one every e2e module shares), building it if needed.

    A lock file serializes builders; temporary directories left by an interrupted build
    are removed. Raises RuntimeError with mmdebstrap's output if the build fails.
    """
    key = cache_key(packages=packages)
    final = CACHE / f"e2e-rootfs-{key}"
    if (final / "usr" / "lib" / "systemd" / "systemd").exists():
        return final
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "e2e-rootfs.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.exists():
            return final
        for stale in CACHE.glob("e2e-rootfs-*.partial-*"):
            log(f"removing the interrupted build {stale}")
            remove_tree(stale)
        partial = CACHE / f"e2e-rootfs-{key}.partial-{os.getpid()}"
        argv = mmdebstrap_argv(partial, packages=packages)
        log(f"building the e2e root file system (once): {' '.join(argv)}")
        started = time.monotonic()
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
            if done.returncode != 0:
                raise RuntimeError(f"mmdebstrap failed ({done.returncode}):\n{done.stdout}{done.stderr}")
            # Clean every apt download: the cache only needs the installed system.
            for leftover in (partial / "var" / "cache" / "apt" / "archives").glob("*.deb"):
                leftover.unlink()
            os.rename(partial, final)
        except BaseException:
            with contextlib.suppress(Exception):
                remove_tree(partial)
            raise
        log(f"built {final} in {time.monotonic() - started:.0f} s")
    return final


class Overlay:
    """A writable overlayfs view of a read-only lower directory, for one test run.

    `mount()` mounts LOWER + WORK_DIR/upper at WORK_DIR/root; `unmount()` undoes it (and
    everything mounted below). The cache below is never written.
    """

    def __init__(self, lower, work_dir):
        self.lower = Path(lower)
        self.work_dir = Path(work_dir)
        self.root = self.work_dir / "root"
        self.mounted = False

    def mount(self):
        upper, work = self.work_dir / "upper", self.work_dir / "work"
        for directory in (upper, work, self.root):
            directory.mkdir(parents=True, exist_ok=True)
        options = f"lowerdir={self.lower},upperdir={upper},workdir={work}"
        subprocess.run(["mount", "-t", "overlay", "certrelay-e2e", "-o", options, str(self.root)],
                       check=True, capture_output=True, text=True)
        self.mounted = True
        return self.root

    def unmount(self):
        """Unmount the overlay and anything below it; raise RuntimeError if one stays."""
        for point in mounts_under(self.root):
            done = subprocess.run(["umount", point], capture_output=True, text=True)
            if done.returncode != 0:
                # Busy: detach it now, the kernel finishes when the last user goes.
                subprocess.run(["umount", "--lazy", point], capture_output=True, text=True)
        self.mounted = False
        left = mounts_under(self.root)
        if left:
            raise RuntimeError(f"still mounted: {left}")


@contextlib.contextmanager
def scratch_root(prefix):
    """Yield (root, work_dir, stack) for one e2e module: `root` a writable overlay of the
    cached root file system in a fresh `work_dir` under /var/tmp, `stack` an ExitStack
    for the module's own clean-ups, closed before the overlay is unmounted and the work
    dir removed (kept when CERTRELAY_E2E_KEEP=1)."""
    with scratch_roots(prefix, [None]) as (roots, work_dir, stack):
        yield roots[None], work_dir, stack


@contextlib.contextmanager
def scratch_roots(prefix, names, packages=PACKAGES):
    """Yield ({name: root}, work_dir, stack) for a module booting several machines:
    each root a writable overlay of its own (in WORK_DIR/NAME/) on the same cached root
    file system of `packages`, in one fresh `work_dir` under /var/tmp. `stack` is an
    ExitStack for the module's clean-ups (stopping the machines), closed before the
    overlays are unmounted and the work dir removed (kept when CERTRELAY_E2E_KEEP=1).
    A name of None puts that overlay in the work dir itself (scratch_root's layout)."""
    lower = cached_rootfs(packages=packages)
    work_dir = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    overlays = [Overlay(lower, work_dir if name is None else work_dir / name) for name in names]
    try:
        with contextlib.ExitStack() as stack:
            yield {name: overlay.mount() for name, overlay in zip(names, overlays)}, work_dir, stack
    finally:
        left = []
        for overlay in overlays:
            if overlay.mounted:
                try:
                    overlay.unmount()
                except RuntimeError as error:
                    left.append(str(error))
        if left:
            raise RuntimeError(f"not removing {work_dir}: {'; '.join(left)}")
        if os.environ.get("CERTRELAY_E2E_KEEP") != "1":
            remove_tree(work_dir)

if __name__ == "__main__":
    reason = skip_reason()
    if reason:
        sys.exit(reason)
    print(cached_rootfs())
