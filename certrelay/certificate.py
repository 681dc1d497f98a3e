"""Read a lineage's live certificate without ever leaving the certbot config dir.

live/NAME/cert.pem is a symlink into archive/, and the container writes this tree: a
planted symlink could point at /etc/shadow, a FIFO or a device. So the path is walked
one component at a time from a directory descriptor, links resolved by hand and only
inside the config dir (like openat2's RESOLVE_BENEATH, which Python does not offer).
"""

import errno
import hashlib
import os
import stat

MAX_CERTIFICATE = 64 * 1024
MAX_LINKS = 16


class CertificateError(Exception):
    """The live certificate cannot be read safely; the message says why."""


def fingerprint(config_dir, name):
    """Return the SHA-256 hex digest of live/NAME/cert.pem under `config_dir`.

    Raise CertificateError if it is missing, not a regular file, larger than
    MAX_CERTIFICATE, or reached only through a link leading out of `config_dir`.
    """
    descriptor = open_beneath(config_dir, f"live/{name}/cert.pem")
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise CertificateError(f"live/{name}/cert.pem is not a regular file")
        data = os.read(descriptor, MAX_CERTIFICATE + 1)
    finally:
        os.close(descriptor)
    if len(data) > MAX_CERTIFICATE:
        raise CertificateError(f"live/{name}/cert.pem is larger than {MAX_CERTIFICATE} bytes")
    return hashlib.sha256(data).hexdigest()


def open_beneath(root, relative):
    """Open `relative` below the directory `root` for reading; return the descriptor.

    Symbolic links are followed only while they stay below `root` (relative targets;
    an absolute target or too many `..` is refused). Never blocks on a FIFO.
    """
    try:
        directories = [os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)]
    except OSError as error:
        raise CertificateError(f"cannot open {root}: {error.strerror}") from None
    parts = [part for part in relative.split("/") if part not in ("", ".")]
    links = 0
    try:
        while parts:
            part = parts.pop(0)
            if part == "..":
                if len(directories) == 1:
                    raise CertificateError(f"{relative} leads out of {root}")
                os.close(directories.pop())
                continue
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            try:
                descriptor = os.open(part, flags | (os.O_DIRECTORY if parts else 0), dir_fd=directories[-1])
            except OSError as error:
                if error.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise CertificateError(f"cannot open {relative} in {root}: {error.strerror}") from None
                target = read_link(part, directories[-1], relative)
                links += 1
                if target.startswith("/") or links > MAX_LINKS:
                    raise CertificateError(f"{relative} in {root} is a link leading out of it ({target!r})")
                parts[:0] = [piece for piece in target.split("/") if piece not in ("", ".")]
                continue
            if not parts:
                return descriptor
            directories.append(descriptor)
        raise CertificateError(f"{relative} names a directory")
    finally:
        for descriptor in directories:
            os.close(descriptor)


def read_link(part, directory, relative):
    """Return the target of the symbolic link `part` in `directory`, or raise."""
    try:
        return os.readlink(part, dir_fd=directory)
    except OSError:
        raise CertificateError(f"cannot open {relative}: a component is not a directory") from None
