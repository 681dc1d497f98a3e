"""Test images built with no registry: one like the official certbot/dns-cloudflare, and nginx.

No registry is reachable here, so each image is a root file system built from Debian's
packages (and PyPI) by this script, cached as a tar file and `docker import`ed with the
official image's configuration (entry point, volumes, stop signal). What they share: an
`Image` names its Debian packages, the step that finishes the root file system, the
`docker import` changes and any Dockerfile lines import cannot apply; `cached_tar(image)`
builds it once (mmdebstrap bookworm minbase, merged /usr, no documentation) into
REPO/.cache/NAME-image-KEY.tar, KEY hashing the code that builds it (BUILD_CODE), the
pins and mmdebstrap's argv: a change to any of them builds it again (one to three
minutes, most of it downloading); `import_image(docker, image=image)` loads it into a
Docker daemon (about 3 s).

certbot_image(VERSION), like certbot/dns-cloudflare:vVERSION (Alpine, certbot in a venv,
BusyBox ash as /bin/sh, no bash, `ENTRYPOINT ["certbot"]`, `VOLUME /etc/letsencrypt
/var/lib/letsencrypt`):
    CERTBOT_VERSION (the current release): python3, python3-venv, busybox (the dynamic
    package: its applets defer to PATH, like Alpine's), ca-certificates; certbot and
    certbot-dns-cloudflare from PyPI in the venv /opt/certbot, /usr/local/bin/certbot ->
    /opt/certbot/bin/certbot.
    OLDEST_CERTBOT (2.1.0, Debian 12's, the oldest the README claims): Debian's own
    certbot and python3-certbot-dns-cloudflare packages (2.1.0 and 2.0.0 in bookworm,
    with the josepy, pyOpenSSL and cryptography of their time: certbot 2.1 from PyPI
    would get today's, which it predates); /opt/certbot/bin/{certbot,python} link to
    Debian's, so the image is used the same way.
    Both: bash purged, dash deleted, /bin/sh -> busybox.

NGINX, like the official nginx image (Debian, nginx as PID 1 in the foreground, `STOPSIGNAL
SIGQUIT`, logs to the container's stdout and stderr, error_log at notice, so that
`docker logs` shows each reload): Debian's nginx package, its default site removed.

Run as a module to build (or find) the cached tars: /usr/bin/python3 -m tests.e2e.docker_image [certbot VERSION|nginx]
"""

import contextlib
import dataclasses
import fcntl
import hashlib
import inspect
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from . import rootfs

REPO = rootfs.REPO
CACHE = rootfs.CACHE
#: The current certbot release on PyPI (`pip index versions certbot`), and its Cloudflare plugin.
CERTBOT_VERSION = "5.8.0"
#: The oldest certbot the README claims: Debian 12's (its package, not PyPI's).
OLDEST_CERTBOT = "2.1.0"
#: certbot versions built from Debian's packages rather than PyPI: VERSION -> packages.
DEBIAN_CERTBOT = {OLDEST_CERTBOT: ("certbot", "python3-certbot-dns-cloudflare")}
REQUIREMENTS = (f"certbot=={CERTBOT_VERSION}", f"certbot-dns-cloudflare=={CERTBOT_VERSION}")  # the current image's pins
TAG = "certbot/dns-cloudflare:latest"
#: The environment of commands run in the image's root file system while building it.
BUILD_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", "HOME=/root"]
BUILD_TIMEOUT = 900
PATH_CHANGE = "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclasses.dataclass(frozen=True)
class Image:
    """What one test image is: `name` (the cache file's prefix), the Debian `packages`
    mmdebstrap installs, `pins` (anything else its build depends on, for the cache key),
    `finish(root)` (the steps after mmdebstrap), the `changes` `docker import` gives it,
    the `tag` it is imported as by default, and `dockerfile`: lines that `docker import
    --change` refuses (STOPSIGNAL, in Debian's docker 20.10), applied by a `docker build`
    FROM the imported image."""

    name: str
    packages: tuple
    pins: tuple
    finish: Callable[[Path], None]
    changes: tuple
    tag: str
    dockerfile: tuple = ()


def skip_reason():
    """Return why the images cannot be built or run here, or None."""
    if os.geteuid() != 0:
        return "needs root (mmdebstrap --mode=root, chroot, dockerd)"
    for tool in ("mmdebstrap", "chroot", "tar", "dockerd", "docker"):
        if not shutil.which(tool):
            return f"{tool} is not on PATH: apt-get install --no-install-recommends docker.io mmdebstrap"
    return None


def mmdebstrap_argv(target, packages, mirror=None):
    mirror = mirror or rootfs.debian_mirror()
    return [
        "mmdebstrap", "--mode=root", "--variant=minbase", "--quiet",
        "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
        "--include=" + ",".join(packages),
        "--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        rootfs.SUITE, str(target), f"deb {mirror} {rootfs.SUITE} main",
    ]


def _run(argv, **kwargs):
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=BUILD_TIMEOUT, **kwargs)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} exited with {done.returncode}:\n{done.stdout[-4000:]}{done.stderr[-4000:]}")
    return done


def _chroot(root, *argv):
    return _run(["chroot", root, "env", "-i", *BUILD_ENV, *argv])


def _unlink(path):
    if not path.is_dir() and (path.is_symlink() or path.exists()):  # never /bin -> usr/bin
        path.unlink()


# --- certbot ------------------------------------------------------------------------------


def _pip_install(target, requirements):
    """certbot from PyPI into the venv /opt/certbot, with the host's resolver and CA bundle
    (a TLS proxy may sit in between), both removed again."""
    shutil.copyfile("/etc/ssl/certs/ca-certificates.crt", target / "root" / "pip-ca.pem")
    resolv = target / "etc" / "resolv.conf"
    resolv.unlink(missing_ok=True)
    shutil.copyfile("/etc/resolv.conf", resolv)
    _chroot(target, "python3", "-m", "venv", "/opt/certbot")
    _chroot(target, "env", "PIP_CERT=/root/pip-ca.pem", "PIP_DISABLE_PIP_VERSION_CHECK=1", "PIP_NO_CACHE_DIR=1",
            "/opt/certbot/bin/pip", "install", "-q", *requirements)
    (target / "root" / "pip-ca.pem").unlink()
    resolv.unlink()
    os.symlink("/opt/certbot/bin/certbot", target / "usr" / "local" / "bin" / "certbot")


def _busybox_sh(target):
    """No bash, no dash: /bin/sh is BusyBox ash, as in the official (Alpine) image. bash is
    purged while dash still runs the maintainer scripts; dash's files are then deleted by
    hand (dpkg cannot purge it: its postrm needs the /bin/sh it takes away)."""
    _chroot(target, "dpkg", "--purge", "--force-remove-essential", "--force-depends", "bash")
    dash_files = [line for line in _chroot(target, "dpkg", "-L", "dash").stdout.splitlines() if line.startswith("/")]
    for name in [*dash_files, "/usr/bin/dash"]:
        _unlink(target / name.lstrip("/"))
    for name in ("bin/sh", "usr/bin/sh", "bin/sh.distrib", "usr/bin/sh.distrib"):
        _unlink(target / name)
    os.symlink("busybox", target / "usr" / "bin" / "sh")
    for gone in ("bash", "dash", "rbash"):
        if (target / "usr" / "bin" / gone).exists():
            raise RuntimeError(f"/usr/bin/{gone} is still in the image")


def _finish_certbot(version):
    def finish(target):
        if version in DEBIAN_CERTBOT:
            # Debian's certbot, reached where the venv's would be.
            (target / "opt" / "certbot" / "bin").mkdir(parents=True)
            os.symlink("/usr/bin/certbot", target / "opt" / "certbot" / "bin" / "certbot")
            os.symlink("/usr/bin/python3", target / "opt" / "certbot" / "bin" / "python")
        else:
            _pip_install(target, (f"certbot=={version}", f"certbot-dns-cloudflare=={version}"))
        _busybox_sh(target)
        # The check the image must pass: certbot runs from PATH under BusyBox sh.
        said = _chroot(target, "/bin/sh", "-c", "certbot --version").stdout.strip()
        if said != f"certbot {version}":
            raise RuntimeError(f"certbot --version in the image says {said!r}, not certbot {version}")
    return finish


def certbot_image(version=CERTBOT_VERSION):
    """The Image of certbot/dns-cloudflare at certbot `version` (CERTBOT_VERSION, or a
    version of DEBIAN_CERTBOT)."""
    base = ("busybox", "ca-certificates")
    if version in DEBIAN_CERTBOT:
        packages, pins = (*DEBIAN_CERTBOT[version], *base), ("debian",)
    else:
        packages, pins = ("python3", "python3-venv", *base), (f"certbot=={version}", f"certbot-dns-cloudflare=={version}")
    changes = (
        'ENTRYPOINT ["certbot"]',
        'VOLUME ["/etc/letsencrypt", "/var/lib/letsencrypt"]',
        PATH_CHANGE,
        "WORKDIR /opt/certbot",
    )
    return Image(f"certbot-{version}", packages, pins, _finish_certbot(version), changes, TAG)


# --- nginx --------------------------------------------------------------------------------


def _finish_nginx(target):
    """As the official image has it: no default site, logs to the container's stdout and
    stderr, the error log at notice (a reload is logged: "signal 1 (SIGHUP) received")."""
    for name in ("etc/nginx/sites-enabled/default",):
        _unlink(target / name)
    conf = target / "etc" / "nginx" / "nginx.conf"
    text = conf.read_text()
    if "error_log /var/log/nginx/error.log;" not in text:
        raise RuntimeError("Debian's nginx.conf changed: no `error_log /var/log/nginx/error.log;` to raise to notice")
    conf.write_text(text.replace("error_log /var/log/nginx/error.log;", "error_log /var/log/nginx/error.log notice;"))
    _chroot(target, "nginx", "-t", "-q")  # before the logs go to /dev/std*, which the chroot lacks
    for log, device in (("access.log", "/dev/stdout"), ("error.log", "/dev/stderr")):
        _unlink(target / "var" / "log" / "nginx" / log)
        os.symlink(device, target / "var" / "log" / "nginx" / log)


NGINX = Image(
    "nginx", ("nginx",), (), _finish_nginx,
    ('CMD ["nginx", "-g", "daemon off;"]', "EXPOSE 80 443", PATH_CHANGE),
    "certrelay-e2e/nginx:latest", ("STOPSIGNAL SIGQUIT",),
)


# --- building, caching, importing ---------------------------------------------------------


def build_root(target, image):
    """Build `image`'s root file system into `target` (which must not exist)."""
    _run(mmdebstrap_argv(target, image.packages))
    image.finish(target)
    for leftover in (target / "var" / "cache" / "apt" / "archives").glob("*.deb"):
        leftover.unlink()
    shutil.rmtree(target / "var" / "lib" / "apt" / "lists", ignore_errors=True)
    (target / "var" / "lib" / "apt" / "lists" / "partial").mkdir(parents=True)


#: The code whose every change builds the images again (the cache key hashes its source).
BUILD_CODE = (mmdebstrap_argv, _run, _chroot, _unlink, _pip_install, _busybox_sh, _finish_certbot, _finish_nginx,
              build_root)


def cache_key(image, mirror=None):
    """The hash naming the cached tar: the code that builds it, its packages and pins,
    and mmdebstrap's argv."""
    parts = [*map(inspect.getsource, BUILD_CODE), *BUILD_ENV, image.name, *image.pins,
             *mmdebstrap_argv("TARGET", image.packages, mirror)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def cached_tar(image=None, log=print):
    """Return the path of `image`'s cached tar (default: the current certbot), building it
    if needed (a lock serializes builders)."""
    image = image or certbot_image()
    key = cache_key(image)
    prefix = f"{image.name}-image-"
    final = CACHE / f"{prefix}{key}.tar"
    if final.is_file():
        return final
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{image.name}-image.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_file():
            return final
        for stale in CACHE.glob(f"{prefix}*.partial-*"):
            log(f"removing the interrupted build {stale}")
            rootfs.remove_tree(stale) if stale.is_dir() else stale.unlink()
        partial = CACHE / f"{prefix}{key}.partial-{os.getpid()}"
        partial_tar = CACHE / f"{prefix}{key}.partial-{os.getpid()}.tar"
        started = time.monotonic()
        log(f"building the {image.name} image's root file system (once) into {final}")
        try:
            build_root(partial, image)
            _run(["tar", "--numeric-owner", "-C", partial, "-cf", partial_tar, "."])
            os.rename(partial_tar, final)
        finally:
            with contextlib.suppress(Exception):
                rootfs.remove_tree(partial)
            partial_tar.unlink(missing_ok=True)
        # Older builds of this image are no use any more (nor those named before the
        # image had a version: certbot-image-KEY.tar).
        for old in [*CACHE.glob(f"{prefix}*.tar"), *CACHE.glob("certbot-image-" + "[0-9a-f]" * 16 + ".tar")]:
            if old != final and ".partial-" not in old.name:
                old.unlink()
        log(f"built {final} in {time.monotonic() - started:.0f} s")
    return final


def import_image(docker, tag=None, tar=None, image=None):
    """`docker import` `image`'s cached root file system (default: the current certbot) as
    `tag` (default: the image's) with its configuration; its Dockerfile lines, if any, by
    a `docker build` FROM the import (tagged TAG-imported). `docker` is the argv prefix of
    the client (e.g. ["docker", "-H", "unix:///..."]). Returns the image id."""
    image = image or certbot_image()
    tar = tar or cached_tar(image)
    tag = tag or image.tag
    argv = [*docker, "import"]
    for change in image.changes:
        argv += ["--change", change]
    imported = f"{tag}-imported" if image.dockerfile else tag
    done = _run([*argv, tar, imported])
    if not image.dockerfile:
        return done.stdout.strip()
    with tempfile.TemporaryDirectory(prefix="certrelay-image-") as context:
        Path(context, "Dockerfile").write_text("\n".join([f"FROM {imported}", *image.dockerfile, ""]))
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "DOCKER_BUILDKIT": "0", "HOME": context}
        return _run([*docker, "build", "-q", "-t", tag, context], env=env).stdout.strip()


def main(argv):
    reason = skip_reason()
    if reason:
        sys.exit(reason)
    if argv[:1] == ["nginx"]:
        images = [NGINX]
    elif argv[:1] == ["certbot"]:
        images = [certbot_image(argv[1] if len(argv) > 1 else CERTBOT_VERSION)]
    elif not argv:
        images = [certbot_image(), certbot_image(OLDEST_CERTBOT), NGINX]
    else:
        sys.exit("usage: python3 -m tests.e2e.docker_image [certbot [VERSION] | nginx]")
    for image in images:
        print(cached_tar(image))


if __name__ == "__main__":
    main(sys.argv[1:])
