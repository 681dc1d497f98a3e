"""A test image that behaves like the official certbot/dns-cloudflare, built with no registry.

The official image is Alpine with certbot in a venv, BusyBox ash as /bin/sh, no bash,
`ENTRYPOINT ["certbot"]` and `VOLUME /etc/letsencrypt /var/lib/letsencrypt`. No registry
is reachable here, so this builds the same from Debian's packages and PyPI:

    mmdebstrap bookworm minbase (merged /usr) + python3, python3-venv, busybox (the
    dynamic package: its applets defer to PATH, like Alpine's), ca-certificates;
    certbot and certbot-dns-cloudflare CERTBOT_VERSION from PyPI in the venv /opt/certbot,
    /usr/local/bin/certbot -> /opt/certbot/bin/certbot; bash purged, dash deleted, /bin/sh ->
    busybox.

The root file system is cached as a tar file, REPO/.cache/certbot-image-KEY.tar, KEY
hashing this file and the pins: a change to either builds it again (about a minute).
`import_image(docker)` loads it into a Docker daemon with the official image's entry
point and volumes, as certbot/dns-cloudflare:latest unless told otherwise (`docker
import`, about 2 s).

Run as a module to build (or find) the cached tar: /usr/bin/python3 -m tests.e2e.docker_image
"""

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import rootfs

REPO = rootfs.REPO
CACHE = rootfs.CACHE
#: The current certbot release on PyPI (`pip index versions certbot`), and its Cloudflare plugin.
CERTBOT_VERSION = "5.8.0"
REQUIREMENTS = (f"certbot=={CERTBOT_VERSION}", f"certbot-dns-cloudflare=={CERTBOT_VERSION}")
PACKAGES = ("python3", "python3-venv", "busybox", "ca-certificates")
TAG = "certbot/dns-cloudflare:latest"
#: What `docker import` gives the image, as the official Dockerfile has it.
CHANGES = (
    'ENTRYPOINT ["certbot"]',
    'VOLUME ["/etc/letsencrypt", "/var/lib/letsencrypt"]',
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "WORKDIR /opt/certbot",
)
#: The environment of commands run in the image's root file system while building it.
BUILD_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", "HOME=/root"]
BUILD_TIMEOUT = 900


def skip_reason():
    """Return why the image cannot be built or run here, or None."""
    if os.geteuid() != 0:
        return "needs root (mmdebstrap --mode=root, chroot, dockerd)"
    for tool in ("mmdebstrap", "chroot", "tar", "dockerd", "docker"):
        if not shutil.which(tool):
            return f"{tool} is not on PATH: apt-get install --no-install-recommends docker.io mmdebstrap"
    return None


def mmdebstrap_argv(target, mirror=None):
    mirror = mirror or rootfs.debian_mirror()
    return [
        "mmdebstrap", "--mode=root", "--variant=minbase", "--quiet",
        "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
        "--include=" + ",".join(PACKAGES),
        "--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        rootfs.SUITE, str(target), f"deb {mirror} {rootfs.SUITE} main",
    ]


def cache_key(mirror=None):
    """The hash naming the cached tar: this script, the pins and mmdebstrap's argv."""
    parts = [Path(__file__).read_bytes().decode(), *REQUIREMENTS, *CHANGES, *mmdebstrap_argv("TARGET", mirror)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _run(argv, **kwargs):
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=BUILD_TIMEOUT, **kwargs)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} exited with {done.returncode}:\n{done.stdout[-4000:]}{done.stderr[-4000:]}")
    return done


def _chroot(root, *argv):
    return _run(["chroot", root, "env", "-i", *BUILD_ENV, *argv])


def build_root(target):
    """Build the image's root file system into `target` (which must not exist)."""
    _run(mmdebstrap_argv(target))
    # pip in the chroot reaches PyPI with the host's resolver and CA bundle (a TLS proxy
    # may sit in between); both are removed again below.
    shutil.copyfile("/etc/ssl/certs/ca-certificates.crt", target / "root" / "pip-ca.pem")
    resolv = target / "etc" / "resolv.conf"
    resolv.unlink(missing_ok=True)
    shutil.copyfile("/etc/resolv.conf", resolv)
    _chroot(target, "python3", "-m", "venv", "/opt/certbot")
    _chroot(target, "env", "PIP_CERT=/root/pip-ca.pem", "PIP_DISABLE_PIP_VERSION_CHECK=1", "PIP_NO_CACHE_DIR=1",
            "/opt/certbot/bin/pip", "install", "-q", *REQUIREMENTS)
    (target / "root" / "pip-ca.pem").unlink()
    resolv.unlink()
    os.symlink("/opt/certbot/bin/certbot", target / "usr" / "local" / "bin" / "certbot")
    # No bash, no dash: /bin/sh is BusyBox ash, as in the official (Alpine) image. bash is
    # purged while dash still runs the maintainer scripts; dash's files are then deleted
    # by hand (dpkg cannot purge it: its postrm needs the /bin/sh it takes away).
    _chroot(target, "dpkg", "--purge", "--force-remove-essential", "--force-depends", "bash")
    dash_files = [line for line in _chroot(target, "dpkg", "-L", "dash").stdout.splitlines() if line.startswith("/")]
    for name in [*dash_files, "/usr/bin/dash"]:
        path = target / name.lstrip("/")
        if not path.is_dir() and (path.is_symlink() or path.exists()):  # never /bin -> usr/bin
            path.unlink()
    for name in ("bin/sh", "usr/bin/sh", "bin/sh.distrib", "usr/bin/sh.distrib"):
        path = target / name
        if path.is_symlink() or path.exists():
            path.unlink()
    os.symlink("busybox", target / "usr" / "bin" / "sh")
    for gone in ("bash", "dash", "rbash"):
        if (target / "usr" / "bin" / gone).exists():
            raise RuntimeError(f"/usr/bin/{gone} is still in the image")
    for leftover in (target / "var" / "cache" / "apt" / "archives").glob("*.deb"):
        leftover.unlink()
    shutil.rmtree(target / "var" / "lib" / "apt" / "lists", ignore_errors=True)
    (target / "var" / "lib" / "apt" / "lists" / "partial").mkdir(parents=True)
    # The check the image must pass: certbot runs from PATH under BusyBox sh.
    version = _chroot(target, "/bin/sh", "-c", "certbot --version").stdout.strip()
    if CERTBOT_VERSION not in version:
        raise RuntimeError(f"certbot --version in the image says {version!r}")


def cached_tar(log=print):
    """Return the path of the cached image tar, building it if needed (a lock serializes builders)."""
    key = cache_key()
    final = CACHE / f"certbot-image-{key}.tar"
    if final.is_file():
        return final
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "certbot-image.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_file():
            return final
        for stale in CACHE.glob("certbot-image-*.partial-*"):
            log(f"removing the interrupted build {stale}")
            rootfs.remove_tree(stale) if stale.is_dir() else stale.unlink()
        partial = CACHE / f"certbot-image-{key}.partial-{os.getpid()}"
        partial_tar = CACHE / f"certbot-image-{key}.partial-{os.getpid()}.tar"
        started = time.monotonic()
        log(f"building the certbot image's root file system (once): certbot {CERTBOT_VERSION} into {final}")
        try:
            build_root(partial)
            _run(["tar", "--numeric-owner", "-C", partial, "-cf", partial_tar, "."])
            os.rename(partial_tar, final)
        finally:
            with contextlib.suppress(Exception):
                rootfs.remove_tree(partial)
            partial_tar.unlink(missing_ok=True)
        # Older builds are no use any more.
        for old in CACHE.glob("certbot-image-*.tar"):
            if old != final and ".partial-" not in old.name:
                old.unlink()
        log(f"built {final} in {time.monotonic() - started:.0f} s")
    return final


def import_image(docker, tag=TAG, tar=None):
    """`docker import` the cached root file system as `tag` with the official image's
    entry point, volumes and PATH. `docker` is the argv prefix of the client
    (e.g. ["docker", "-H", "unix:///..."]). Returns the image id."""
    tar = tar or cached_tar()
    argv = [*docker, "import"]
    for change in CHANGES:
        argv += ["--change", change]
    return _run([*argv, tar, tag]).stdout.strip()


if __name__ == "__main__":
    reason = skip_reason()
    if reason:
        sys.exit(reason)
    print(cached_tar())
