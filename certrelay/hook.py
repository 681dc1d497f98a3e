"""The hooks: where this installation keeps them, and putting them where certbot runs them.

certbot runs every executable in CONFIG_DIR/renewal-hooks/deploy/ after a renewal, and
in renewal-hooks/post/ after a renewal attempt. The deploy hook (certrelay-hook) and
the post hook (certrelay-post-hook) ship inside the Python package in every
installation (the source tree, a wheel, `make install`, the Debian package, whose
/usr/share/certrelay/ links to them), and are copied into the certbot config dir by
`certrelay install-hook`, never by the package itself: /etc/letsencrypt belongs to the
admin and to certbot.
"""

import dataclasses
import importlib.resources
import os
import stat
from pathlib import Path

from certrelay import files

CURRENT, OUTDATED, MISSING = "current", "outdated", "missing"


@dataclasses.dataclass(frozen=True)
class Hook:
    """One of certrelay's hooks: `kind`, the renewal-hooks/ directory certbot runs it
    from; `name`, its file name in the package and there; `marker`, what a copy
    certrelay installed contains (its first comment line), so that `install` replaces
    an older certrelay hook but not someone else's file."""

    kind: str
    name: str
    marker: bytes


#: The deploy hook publishes each renewed certificate; the post hook records each
#: renewal attempt (attempts.py), failed ones included.
DEPLOY = Hook("deploy", "certrelay-hook", b"certrelay-hook: certbot deploy hook")
POST = Hook("post", "certrelay-post-hook", b"certrelay-post-hook: certbot post hook")
HOOKS = (DEPLOY, POST)
HOOK_NAME, MARKER = DEPLOY.name, DEPLOY.marker


class HookError(Exception):
    """The hook cannot be installed; the message says why and what to do."""


def packaged_hook(hook=DEPLOY):
    """Return the bytes of `hook` as shipped with this installation (package data).

    Raise HookError if it cannot be read (an installation without its hook).
    """
    shipped = importlib.resources.files("certrelay").joinpath(hook.name)
    try:
        return shipped.read_bytes()
    except OSError as error:
        raise HookError(
            f"the {hook.name} shipped with certrelay cannot be read ({shipped}: {error.strerror or error}):"
            " reinstall certrelay"
        ) from None


def installed_path(config_dir, hook=DEPLOY):
    """Return CONFIG_DIR/renewal-hooks/KIND/NAME of `hook`."""
    return Path(config_dir) / "renewal-hooks" / hook.kind / hook.name


def status(config_dir, hook=DEPLOY):
    """Return "current", "outdated" or "missing" for the hook in `config_dir`.

    current: a regular executable file with the packaged hook's bytes. outdated: there,
    but different or not executable (certbot skips it). missing: nothing there, or not
    a regular file. Raise HookError, saying what to do, if the two cannot be compared:
    the packaged hook or the installed one cannot be read.
    """
    path = installed_path(config_dir, hook)
    try:
        info = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return MISSING
    except OSError as error:
        raise HookError(f"{path}: cannot look at it ({error.strerror}): renewal-hooks/{hook.kind}/ must be a"
                        " directory certrelay can read") from None
    if not stat.S_ISREG(info.st_mode):
        return MISSING
    if not info.st_mode & stat.S_IXUSR:
        return OUTDATED
    try:
        installed = path.read_bytes()
    except OSError as error:
        raise HookError(
            f"{path}: cannot read it ({error.strerror}) to compare it with the hook shipped with certrelay:"
            " fix its permissions, or replace it: certrelay install-hook --force"
        ) from None
    return CURRENT if installed == packaged_hook(hook) else OUTDATED


def bash_hooks(config_dir):
    """Return the hooks under CONFIG_DIR/renewal-hooks/{pre,deploy,post}/ whose first
    line asks for bash: the certbot images have none, so certbot in the container runs
    each, gets exit status 127, and still exits 0 (each is a path)."""
    found = []
    for kind in ("pre", "deploy", "post"):
        directory = Path(config_dir) / "renewal-hooks" / kind
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            try:
                descriptor = os.open(directory / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue
            with os.fdopen(descriptor, "rb") as file:
                first = file.read(128).split(b"\n", 1)[0] if stat.S_ISREG(os.fstat(file.fileno()).st_mode) else b""
            if first.startswith(b"#!") and b"bash" in first:
                found.append(directory / name)
    return found


def install(config_dir, force=False, hook=DEPLOY):
    """Copy the packaged `hook` to CONFIG_DIR/renewal-hooks/KIND/, atomically, mode 0755.

    Creates renewal-hooks/KIND/ (0755) if needed. Refuses, unless `force`: a config dir
    that does not exist (a typo would otherwise create a tree certbot never reads), and
    a destination that is not a certrelay hook (someone else's file, a symlink). The copy
    is written to a hidden temporary file in the destination directory, flushed, given
    mode 0755, then renamed over the destination, and the directory is flushed: certbot
    sees the old hook or the new one, never a partial file. Returns (path, what happened):
    "installed", "updated" or "current" (nothing written).
    """
    config_dir = Path(config_dir)
    source = packaged_hook(hook)
    dest = installed_path(config_dir, hook)
    if not config_dir.is_dir() and not force:
        raise HookError(
            f"{config_dir}: no such directory; pass certbot's config dir with --config-dir,"
            " or --force to create it"
        )
    try:
        previous = status(config_dir, hook)
    except HookError:  # unreadable there: replaced below if a certrelay hook, or with `force`
        previous = OUTDATED
    if previous == CURRENT:
        return dest, CURRENT
    if os.path.lexists(dest):
        if os.path.isdir(dest) and not os.path.islink(dest):
            raise HookError(f"{dest} is a directory: remove it, then run certrelay install-hook again")
        if not force and not _is_certrelay_hook(dest, hook.marker):
            raise HookError(
                f"{dest} exists and is not a certrelay hook (or is a symlink): move it away,"
                " or replace it with --force"
            )
    dest.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    files.write_atomically(str(dest), source, 0o755)
    return dest, "installed" if previous == MISSING else "updated"


def _is_certrelay_hook(path, marker):
    """True if `path` is a regular file (not a symlink) holding `marker`: a certrelay
    hook wrote it."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    with os.fdopen(descriptor, "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            return False
        return marker in file.read(4096)
