"""Deliver an install: a lineage's certificate files where a daemon needs them.

The sources are read without leaving the config dir (the container writes it), checked
before anything is written (each part is what it claims, the key matches the
certificate), and the destination is replaced atomically: a temp file in the same
directory gets its owner and mode before it holds the secret, is fsynced, renamed over
the destination, and the directory is fsynced. A reader sees the old file or the new
one, never a partial one or one with the wrong owner or mode.
"""

import contextlib
import dataclasses
import os
import re
import secrets
import ssl
import stat

from certrelay import certificate, execute, files, install as spec

KEY_FILE_MODE = 0o600  # a new file holding a private key
CERTIFICATE_FILE_MODE = 0o644  # a new file holding certificates only
DIRECTORY_MODE = 0o755  # directories made for create-dirs
MAX_EXISTING = 1024 * 1024  # bytes of an existing destination read to compare
MAX_PASSWORD = 4096
TEMP_ATTEMPTS = 8
PKCS12_KDF_ROUNDS = 50000  # also what OpenSSL 3 uses by default for PBKDF2

BASE64_LINES = rb"\r?\n[A-Za-z0-9+/=\r\n]+"
CERTIFICATE_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----" + BASE64_LINES + rb"-----END CERTIFICATE-----")
CERTIFICATES = re.compile(rb"\s*(" + CERTIFICATE_BLOCK.pattern + rb"\s*)+")
# certbot writes PKCS#8 or the traditional RSA/EC forms; never an encrypted key.
PRIVATE_KEY = re.compile(
    rb"\s*(-----BEGIN EC PARAMETERS-----" + BASE64_LINES + rb"-----END EC PARAMETERS-----\s*)?"
    rb"-----BEGIN (?P<label>(RSA |EC )?PRIVATE KEY)-----" + BASE64_LINES + rb"-----END (?P=label)-----\s*"
)
TEMP_NAME = re.compile(r"\.(?P<dest>.+)\.certrelay-(?P<pid>[0-9]+)-[0-9a-f]+")


@dataclasses.dataclass(frozen=True)
class Delivered(execute.Result):
    """The outcome of `deliver`: an `execute.Result` (`ok`, and `detail` saying what was
    done or what to fix) plus `changed`, True only if the destination was written."""

    changed: bool = False


# ---------------------------------------------------------------------------------
# Delivering


class DeliveryError(Exception):
    """Nothing was written; the message says why and what to fix."""


def deliver(install, config_dir, name, values):
    """Write the destination of `install` for lineage `name` of `config_dir`, with the
    placeholder `values` {name, lineage, domains}.

    Return `Delivered`: `ok`; `changed` False when the destination already held the
    same content with the wanted owner, group and mode; `detail` saying what was done or
    what to fix. Never raises for a problem with the files; on failure the old
    destination is left as it was.
    """
    path = install.destination(values)
    try:
        if files.is_inside(path, config_dir):
            raise DeliveryError(f"{path} is inside the certbot config dir {config_dir}; fix dest")
        sources = read_sources(install, config_dir, name)
        check_sources(sources, name)
        data = build(install, sources, name)
        return write(install, path, data)
    except DeliveryError as error:
        return Delivered(False, str(error))
    except OSError as error:
        return Delivered(False, f"cannot deliver {path}: {error}")


def read_sources(install, config_dir, name):
    """Return {part: bytes} of the parts `install` needs from live/NAME/ below
    `config_dir`, read without following any link out of it."""
    sources = {}
    for part in install.sources:
        relative = f"live/{name}/{part}.pem"
        try:
            sources[part] = certificate.read_beneath(config_dir, relative, certificate.MAX_CERTIFICATE)
        except certificate.CertificateError as error:
            raise DeliveryError(f"cannot read the lineage's {part}.pem: {error}") from None
    return sources


def check_sources(sources, name):
    """Raise DeliveryError unless every part is what it claims to be and the key (if
    read) belongs to the certificate."""
    for part, data in sources.items():
        check_part(part, data, name)
    if "privkey" in sources:
        check_key_matches(sources, name)


def check_part(part, data, name):
    """Raise DeliveryError unless `data` is a PEM private key (part "privkey") or one
    or more PEM certificates that OpenSSL can parse."""
    path = f"live/{name}/{part}.pem"
    if part == "privkey":
        if not PRIVATE_KEY.fullmatch(data):
            raise DeliveryError(f"{path} is not an unencrypted PEM private key{broken(name)}")
        return  # parsed by check_key_matches
    if not CERTIFICATES.fullmatch(data):
        raise DeliveryError(f"{path} is not a list of PEM certificates{broken(name)}")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=data.decode("ascii"))
    except ssl.SSLError as error:
        raise DeliveryError(f"{path} holds a certificate that cannot be parsed ({error}){broken(name)}") from None


def check_key_matches(sources, name):
    """Raise DeliveryError unless live/NAME/privkey.pem belongs to the first certificate
    of fullchain.pem (or, without it, of cert.pem).

    OpenSSL checks it in `load_cert_chain`, which takes only file names: the key goes
    into a memory-only file (memfd), never onto a disk.
    """
    leaf_part = "fullchain" if "fullchain" in sources else "cert"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with memory_file(sources[leaf_part]) as certificate_file, memory_file(sources["privkey"]) as key_file:
        try:
            context.load_cert_chain(certificate_file, key_file)
        except ssl.SSLError as error:
            what = "does not match" if error.reason == "KEY_VALUES_MISMATCH" else f"cannot be loaded ({error}) with"
            raise DeliveryError(f"live/{name}/privkey.pem {what} {leaf_part}.pem{broken(name)}") from None


def broken(name):
    """Return the advice appended to a message about a broken lineage."""
    return f": the lineage is broken; run certbot renew --force-renewal --cert-name {name}"


@contextlib.contextmanager
def memory_file(data):
    """Yield a /proc/self/fd path to a file that holds `data` and exists only in memory."""
    descriptor = os.memfd_create("certrelay", os.MFD_CLOEXEC)
    try:
        write_all(descriptor, data)
        yield f"/proc/self/fd/{descriptor}"
    finally:
        os.close(descriptor)


def build(install, sources, name):
    """Return the bytes of the destination file from the parts `sources`."""
    if install.format == "der":
        return ssl.PEM_cert_to_DER_cert(first_certificate(sources["cert"]).decode("ascii"))
    if install.format == "pkcs12":
        return build_pkcs12(sources, name, read_password(install.password_file))
    return b"".join(with_newline(sources[part]) for part in install.content)


def first_certificate(data):
    """Return the first PEM certificate block of `data`."""
    return CERTIFICATE_BLOCK.search(data).group(0) + b"\n"


def with_newline(data):
    """Return `data` ending with a newline, so that concatenated PEM blocks stay apart."""
    return data if data.endswith(b"\n") else data + b"\n"


def read_password(path):
    """Return the password in the file `path`, without a trailing newline. The
    password is never logged or put in a message."""
    try:
        with open(path, "rb") as file:
            password = file.read(MAX_PASSWORD + 1)
    except OSError as error:
        raise DeliveryError(f"cannot read the password file {path}: {error.strerror}") from None
    if len(password) > MAX_PASSWORD:
        raise DeliveryError(f"the password file {path} has more than {MAX_PASSWORD} bytes; is it the right file?")
    password = password.removesuffix(b"\n").removesuffix(b"\r")
    if not password:
        raise DeliveryError(f"the password file {path} is empty; write the keystore password into it")
    return password


def build_pkcs12(sources, name, password):
    """Return a PKCS#12 keystore holding the key, the certificate and the chain of
    `sources`, named `name`, encrypted with `password` (PBES2, AES-256, SHA-256)."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.serialization import pkcs12

    key, leaf, chain = load_parts(sources)
    encryption = (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(PKCS12_KDF_ROUNDS)
        .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
        .hmac_hash(hashes.SHA256())
        .build(password)
    )
    return pkcs12.serialize_key_and_certificates(name.encode("utf-8"), key, leaf, chain, encryption)


def load_parts(sources):
    """Return (key, leaf certificate, [chain certificates]) as cryptography objects."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(sources["privkey"], password=None)
    leaf = x509.load_pem_x509_certificate(first_certificate(sources["cert"]))
    # load_pem_x509_certificates (plural) exists only from cryptography 39
    blocks = CERTIFICATE_BLOCK.finditer(sources["chain"])
    chain = [x509.load_pem_x509_certificate(block.group(0)) for block in blocks]
    return key, leaf, chain


def same_pkcs12(existing, data, password):
    """Return True if the PKCS#12 bytes `existing` and `data` hold the same key,
    certificates and name (the encryption salt differs on every write)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import pkcs12

    def contents(blob):
        stored = pkcs12.load_pkcs12(blob, password)
        key = stored.key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        certificates = [
            (entry.friendly_name, entry.certificate.public_bytes(serialization.Encoding.DER))
            for entry in [stored.cert, *stored.additional_certs]
        ]
        return key, certificates

    try:
        return contents(existing) == contents(data)
    except (ValueError, TypeError, AttributeError):
        return False  # not a keystore, another password, no key: write it anew


# ---------------------------------------------------------------------------------
# Writing atomically


def write(install, path, data):
    """Replace the file at `path` with `data` atomically, unless it already holds it
    with the wanted owner, group and mode; return `Delivered`."""
    problems = spec.destination_problems(install, path)
    if problems:
        raise DeliveryError("; ".join(problems))
    directory, base = os.path.split(path)
    if install.create_dirs:
        make_directories(directory)
    directory_descriptor = open_directory(directory)
    try:
        existing = existing_file(directory_descriptor, base, path)
        owner, group, mode, note = wanted_attributes(install, existing)
        if existing and attributes(existing) == (owner, group, mode):
            if unchanged(install, directory_descriptor, base, data):
                return Delivered(True, f"{path} is up to date", changed=False)
        replace(directory_descriptor, base, data, owner, group, mode)
        # Stale temp files hold a key too; the lock keeps other certrelay runs away.
        remove_stale_temp_files(directory_descriptor, base)
    finally:
        os.close(directory_descriptor)
    return Delivered(True, f"wrote {path} ({owner}:{group} {mode:04o}){note}", changed=True)


def attributes(info):
    """Return (uid, gid, permission bits) of the stat `info`."""
    return info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)


def make_directories(directory):
    """Create `directory` and missing parents, root-owned, mode 0755."""
    missing = []
    while not os.path.lexists(directory):
        missing.append(directory)
        directory = os.path.dirname(directory)
    for new in reversed(missing):
        try:
            os.mkdir(new, DIRECTORY_MODE)
            os.chown(new, 0, 0)
            os.chmod(new, DIRECTORY_MODE)  # the umask may have taken bits away
        except OSError as error:
            raise DeliveryError(f"cannot create the directory {new}: {error.strerror}") from None


def open_directory(directory):
    """Return a descriptor of `directory`, refusing a symbolic link or a directory that
    changed into an unsafe one since it was checked."""
    try:
        descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        raise DeliveryError(f"cannot open the directory {directory}: {error.strerror}") from None
    problems = spec.unsafe_directory(directory, os.fstat(descriptor))
    if problems:
        os.close(descriptor)
        raise DeliveryError("; ".join(problems))
    return descriptor


def existing_file(directory_descriptor, base, path):
    """Return the lstat of `base` in the directory, None if absent; refuse anything
    but a regular file."""
    try:
        info = os.stat(base, dir_fd=directory_descriptor, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(info.st_mode):
        raise DeliveryError(spec.not_regular(path, info))
    return info


def wanted_attributes(install, existing):
    """Return (uid, gid, mode, note) for the destination: what the install sets, else
    what the existing file has, else root:root and 0600 for a key, 0644 otherwise.

    A kept mode loses the bits parse_install would refuse (group or other write, and
    other read on a key); `note` says so for the log.
    """
    uid = resolve(install.owner, spec.user_id, "user", "owner")
    gid = resolve(install.group, spec.group_id, "group", "group")
    if existing is not None:
        uid = existing.st_uid if uid is None else uid
        gid = existing.st_gid if gid is None else gid
    uid, gid = (0 if uid is None else uid), (0 if gid is None else gid)
    if install.mode is not None:
        return uid, gid, install.mode, ""
    if existing is None:
        return uid, gid, KEY_FILE_MODE if install.holds_key else CERTIFICATE_FILE_MODE, ""
    kept = stat.S_IMODE(existing.st_mode)
    mode = kept & ~(stat.S_IWGRP | stat.S_IWOTH | stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX)
    if install.holds_key:
        mode &= ~stat.S_IRWXO
    if mode == kept:
        return uid, gid, mode, ""
    return uid, gid, mode, f"; mode {kept:04o} tightened to {mode:04o}: set mode in the rule to choose"


def resolve(value, lookup, word, key):
    """Return the id of the user or group `value` (None if not set)."""
    if value is None:
        return None
    number = lookup(value)
    if number is None:
        raise DeliveryError(f"unknown {word} {value!r}; create it or fix {key!r} in the rule")
    return number


def unchanged(install, directory_descriptor, base, data):
    """Return True if the existing file `base` already holds `data` (for PKCS#12: the
    same key and certificates)."""
    try:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        descriptor = os.open(base, flags, dir_fd=directory_descriptor)
    except OSError:
        return False
    try:
        existing = os.read(descriptor, MAX_EXISTING + 1)
    finally:
        os.close(descriptor)
    if install.format == "pkcs12":
        return same_pkcs12(existing, data, read_password(install.password_file))
    return existing == data


def replace(directory_descriptor, base, data, owner, group, mode):
    """Atomically replace `base` in the directory with `data` owned by owner:group
    with `mode`. On failure remove the temp file and leave `base` as it was."""
    temp, descriptor = create_temp_file(directory_descriptor, base)
    try:
        try:
            # Owner and mode before the secret goes in, and so before anyone can see it.
            os.fchown(descriptor, owner, group)
            os.fchmod(descriptor, mode)
            write_all(descriptor, data)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.rename(temp, base, src_dir_fd=directory_descriptor, dst_dir_fd=directory_descriptor)
    except OSError as error:
        try:
            os.unlink(temp, dir_fd=directory_descriptor)
        except OSError:
            pass
        raise DeliveryError(f"cannot write {base}: {error.strerror}; the old file is unchanged") from None
    os.fsync(directory_descriptor)  # the rename itself must survive a crash


def create_temp_file(directory_descriptor, base):
    """Return (name, descriptor) of a new, empty, 0600 temp file next to `base`.

    The name starts with a dot (haproxy's crt directory and systemd's DirectoryNotEmpty
    skip dotfiles) and carries the pid and a random part; a name left by a crash is
    skipped, never reused.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(TEMP_ATTEMPTS):
        name = f".{base}.certrelay-{os.getpid()}-{secrets.token_hex(8)}"
        try:
            return name, os.open(name, flags, 0o600, dir_fd=directory_descriptor)
        except FileExistsError:
            continue
        except OSError as error:
            raise DeliveryError(f"cannot create a temp file next to {base}: {error.strerror}") from None
    raise DeliveryError(f"cannot create a temp file next to {base}: {TEMP_ATTEMPTS} names were taken")


def write_all(descriptor, data):
    """Write all of `data` (os.write may write less than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(descriptor, view):]


def remove_stale_temp_files(directory_descriptor, base):
    """Remove temp files of `base` left by certrelay processes that no longer run."""
    for entry in os.listdir(directory_descriptor):
        found = TEMP_NAME.fullmatch(entry)
        if not found or found.group("dest") != base or process_exists(int(found.group("pid"))):
            continue
        try:
            if stat.S_ISREG(os.stat(entry, dir_fd=directory_descriptor, follow_symlinks=False).st_mode):
                os.unlink(entry, dir_fd=directory_descriptor)
        except OSError:
            pass  # gone already, or not ours to remove


def process_exists(pid):
    """Return True if a process `pid` exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
