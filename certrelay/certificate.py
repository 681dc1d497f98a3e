"""Read a lineage's live certificate without ever leaving the certbot config dir.

live/NAME/cert.pem is a symlink into archive/, and the container writes this tree: a
planted symlink could point at /etc/shadow, a FIFO or a device. So the path is walked
one component at a time from a directory descriptor (files.open_path, or for a
directory on the way an O_PATH open that only a directory passes: nothing is opened
before its kind is known), links resolved by hand and only inside the config dir,
like openat2's RESOLVE_BENEATH, which Python does not offer. A `Tree` kept open for a
scan opens the config dir, live/ and archive/ once, not once per certificate.
"""

import os
import re
import stat

from certrelay import files

MAX_CERTIFICATE = 64 * 1024
MAX_LINKS = 16
# Opens only a directory (O_PATH: nothing is read), never a link (ENOTDIR) or anything else.
DIRECTORY = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
ARCHIVE_LIMIT = 20  # older certificates a lineage had, for telling "old" from "other"
ARCHIVE_CERTIFICATE = re.compile(r"cert([0-9]{1,9})\.pem")
PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"
PEM_END = b"-----END CERTIFICATE-----"


class CertificateError(Exception):
    """The live certificate cannot be read safely; the message says why."""


def fingerprint(config_dir, name):
    """Return the SHA-256 hex digest of the DER of live/NAME/cert.pem under
    `config_dir` (what `openssl x509 -fingerprint -sha256` prints, without colons).

    Raise CertificateError if it is missing, not a regular file, larger than
    MAX_CERTIFICATE, or reached only through a link leading out of `config_dir`.
    """
    return der_fingerprint(live_certificate(config_dir, name))


def read_beneath(root, relative, limit):
    """Return the content (at most `limit` bytes) of the regular file `relative` below
    the directory `root` (see `Tree.read`). Raise CertificateError."""
    with Tree(root) as tree:
        return tree.read(relative, limit)


class Tree:
    """The directory `root`, for reading regular files below it without leaving it.

    Use as a context manager: the descriptors of `root` and of the plain directories
    right below it that a `read` passed (live/, archive/) stay open until it ends, so a
    scan of every lineage opens them once, not once per certificate.
    """

    def __init__(self, root):
        self.root = root
        self.top = None  # O_PATH descriptor of root, once a read opened it
        self.below = {}  # name: O_PATH descriptor of a plain directory right below root

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        for descriptor in (self.top, *self.below.values()):
            if descriptor is not None:
                os.close(descriptor)
        self.top, self.below = None, {}

    def read(self, relative, limit):
        """Return the content (at most `limit` bytes) of the regular file `relative`.

        Symbolic links are followed only while they stay below `root` (relative
        targets; an absolute target or one `..` too many is refused). Raise
        CertificateError.
        """
        if self.top is None:
            try:
                self.top = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as error:
                raise CertificateError(f"cannot open {self.root}: {error.strerror}") from None
        kept = {self.top, *self.below.values()}
        directories = [self.top]
        parts = components(relative)  # a stack: the next component last
        links = 0
        try:
            while parts:
                part = parts.pop()
                if part == "..":
                    if len(directories) == 1:
                        raise CertificateError(f"{relative} leads out of {self.root}")
                    self.release(directories.pop(), kept)
                    continue
                if parts:
                    if len(directories) == 1 and part in self.below:
                        directories.append(self.below[part])
                        continue
                    # Most components on the way are plain directories: one open that only a
                    # real directory passes (O_NOFOLLOW: a link fails with ENOTDIR) saves the
                    # fstat(); whatever fails takes the general way below, which says why.
                    try:
                        directories.append(os.open(part, DIRECTORY, dir_fd=directories[-1]))
                    except OSError:
                        pass
                    else:
                        if len(directories) == 2:
                            self.below[part] = directories[-1]
                            kept.add(directories[-1])
                        continue
                descriptor, info = files.open_path(part, directories[-1])
                if stat.S_ISLNK(info.st_mode):
                    os.close(descriptor)
                    target = os.readlink(part, dir_fd=directories[-1])
                    links += 1
                    if target.startswith("/") or links > MAX_LINKS:
                        raise CertificateError(f"{relative} in {self.root} is a link leading out of it ({target!r})")
                    parts += components(target)
                elif parts:
                    directories.append(descriptor)
                    if not stat.S_ISDIR(info.st_mode):
                        raise CertificateError(f"{relative} in {self.root}: {part} is not a directory")
                else:
                    try:
                        return files.read_opened(descriptor, info, limit)
                    finally:
                        os.close(descriptor)
            raise CertificateError(f"{relative} names a directory")
        except files.UnsafeFile as error:
            raise CertificateError(f"{relative} in {self.root}: {error}") from None
        finally:
            for descriptor in directories:
                self.release(descriptor, kept)

    @staticmethod
    def release(descriptor, kept):
        if descriptor not in kept:
            os.close(descriptor)


def components(path):
    """Return the components of the relative `path` that name something (not `.`),
    last first: a stack to pop() from."""
    return [part for part in reversed(path.split("/")) if part and part != "."]


def sha256(data):
    """Return the SHA-256 hex digest of `data`. hashlib loads libcrypto: a run that
    finds nothing to hash does not pay for it."""
    import hashlib

    return hashlib.sha256(data).hexdigest()


def live_certificate(config_dir, name, tree=None):
    """Return the bytes of live/NAME/cert.pem under `config_dir` (see `fingerprint`),
    through `tree` (a Tree of `config_dir` kept open) if given."""
    if tree is None:
        return read_beneath(config_dir, f"live/{name}/cert.pem", MAX_CERTIFICATE)
    return tree.read(f"live/{name}/cert.pem", MAX_CERTIFICATE)


def pem_to_der(data):
    """Return the DER bytes of the first certificate in PEM `data` (bytes or str), as
    a TLS client sees it. Raise CertificateError if there is no PEM certificate block
    or its base64 is invalid."""
    import binascii

    if isinstance(data, str):
        data = data.encode("ascii", "replace")
    # The first BEGIN with an END after it: if the first BEGIN has none, no later one has.
    begin = data.find(PEM_BEGIN)
    end = data.find(PEM_END, begin + len(PEM_BEGIN)) if begin >= 0 else -1
    if end < 0:
        raise CertificateError("no PEM certificate (-----BEGIN CERTIFICATE-----) found")
    # split() drops ASCII whitespace; strict_mode is what b64decode(validate=True) does.
    body = b"".join(data[begin + len(PEM_BEGIN):end].split())
    try:
        der = binascii.a2b_base64(body, strict_mode=True)
    except binascii.Error as error:
        raise CertificateError(f"the PEM certificate is not valid base64: {error}") from None
    if not der:
        raise CertificateError("the PEM certificate block is empty")
    return der


def der_fingerprint(pem):
    """Return the SHA-256 hex digest of `pem_to_der(pem)`; raise CertificateError."""
    return sha256(pem_to_der(pem))


def archive_fingerprints(config_dir, name, limit=ARCHIVE_LIMIT):
    """Return the DER fingerprints of the certificates the lineage `name` had, from
    archive/NAME/certN.pem (the newest `limit`); unreadable ones are skipped.

    archive/ and archive/NAME must be plain directories: certbot makes them so.
    """
    try:
        directory = os.open(config_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return set()
    try:
        for part in ("archive", name):
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
            os.close(directory)
            directory = inner
        names = [entry for entry in os.listdir(directory) if ARCHIVE_CERTIFICATE.fullmatch(entry)]
    except OSError:
        return set()
    finally:
        os.close(directory)
    names.sort(key=lambda entry: int(ARCHIVE_CERTIFICATE.fullmatch(entry).group(1)), reverse=True)
    found = set()
    with Tree(config_dir) as tree:
        for entry in names[:limit]:
            try:
                found.add(der_fingerprint(tree.read(f"archive/{name}/{entry}", MAX_CERTIFICATE)))
            except CertificateError:
                continue
    return found
