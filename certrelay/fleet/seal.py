"""The fleet's keys, and sealing a lineage for one host so that the store never holds
a usable private key (FLEET.md, "Keys never usable in the store").

The only certrelay module that imports PyNaCl (Debian's python3-nacl).

Keys are one line of text, a prefix naming their kind, then standard base64 of the
32 raw key bytes, so a key pasted in the wrong place is refused with its kind named:

    certrelay-fleet-identity-v1:...  a host's X25519 private key   (its `identity` file)
    certrelay-recipient-v1:...       that host's public key        (printed; [[fleet.host]] recipient)
    certrelay-fleet-signing-v1:...   the certbot host's Ed25519 seed (its `signing-key` file)
    certrelay-publisher-v1:...       its public key                (printed; [subscribe] publisher)

A value in the store (`seal` writes it, `open_value` reads it) is UTF-8 JSON:

    {"format": 1, "host": "mail", "name": "herzbube.ch", "sequence": 7,
     "fingerprint": "<SHA-256 hex of cert.pem's DER>",
     "not_before": "2025-01-01T00:00:00Z", "not_after": "2025-04-01T00:00:00Z",
     "published_at": "2025-01-01T01:02:03Z", "recipient": "certrelay-recipient-v1:...",
     "sealed": "<base64>"}

`sealed` is a libsodium sealed box (X25519, XSalsa20-Poly1305, an ephemeral sender
key) to `recipient`, holding the 64-byte Ed25519 signature of the publisher followed
by the signed message: canonical JSON (sorted keys, no spaces, ASCII) of
{format, host, name, sequence, fingerprint, recipient, published_at, files}, where
`files` maps cert.pem, chain.pem, fullchain.pem and privkey.pem to base64. Everything
in clear is either signed or derived from the signed certificate, and the host checks
that it agrees. Sign-then-seal: the host and name inside the signature keep a host from
re-sealing its own value for another host; the sequence inside lets the subscriber
refuse a replayed older value (that comparison is the subscriber's).
"""

import base64
import binascii
import dataclasses
import datetime
import json
import os
import re
import stat
import time

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography import x509

from certrelay import certificate, certinfo, files as files_module

try:
    import nacl.exceptions
    import nacl.public
    import nacl.signing
except ImportError as error:  # the CLI reports it; the rest of certrelay needs no nacl
    raise ImportError(
        "python3-nacl (PyNaCl) is not installed, and the fleet needs it for its keys and sealing:"
        " apt-get install python3-nacl, or in a venv: pip install pynacl"
    ) from error

FORMAT = 1
FILES = ("cert.pem", "chain.pem", "fullchain.pem", "privkey.pem")
MAX_VALUE = 1024 * 1024  # below etcd's default request limit (1.5 MiB)
MAX_FILE = certificate.MAX_CERTIFICATE  # 64 KiB each: four fit in MAX_VALUE after two base64s
MAX_KEY_FILE = 4096
MAX_LABEL = 255  # a host or lineage name: one file name, one etcd key component
MAX_SEQUENCE = 2**63 - 1
KEY_BYTES = 32  # X25519 private and public keys, Ed25519 seeds and public keys
SIGNATURE_BYTES = 64
DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")
FINGERPRINT = re.compile(r"[0-9a-f]{64}")
EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
CLEAR_FIELDS = ("format", "host", "name", "sequence", "fingerprint", "not_before", "not_after", "published_at",
                "recipient", "sealed")

IDENTITY, RECIPIENT = "certrelay-fleet-identity-v1", "certrelay-recipient-v1"
SIGNING, PUBLISHER = "certrelay-fleet-signing-v1", "certrelay-publisher-v1"
#: What each kind of key text is, in words an admin recognizes.
KINDS = {
    IDENTITY: "a host's private identity key (the file `certrelay fleet keygen` writes)",
    RECIPIENT: "a host's recipient key (printed by `certrelay fleet keygen` on that host)",
    SIGNING: "the certbot host's private signing key (the file `certrelay fleet init` writes)",
    PUBLISHER: "the publisher key (printed by `certrelay fleet init` on the certbot host)",
}
PRIVATE = (IDENTITY, SIGNING)
#: The command that makes each kind of key file.
MAKES = {IDENTITY: "certrelay fleet keygen", SIGNING: "certrelay fleet init"}


class KeyFileError(Exception):
    """A key file cannot be read, has a bad mode or owner, or bad content; str() names
    the file and the fix."""


class Refused(Exception):
    """A value a host must not use; `reason` is one short sentence for an admin."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Opened:
    """A value that `open_value` checked: for `host`, lineage `name`, signed by the
    publisher. `not_before`, `not_after`, `published_at`: epoch seconds (UTC), the
    first two from the certificate itself. `files`: FILES name -> bytes (kept out of
    repr(): it holds the private key)."""

    host: str
    name: str
    sequence: int
    fingerprint: str
    not_before: float
    not_after: float
    files: dict = dataclasses.field(repr=False)
    published_at: float = 0.0


# --- key texts and key files ----------------------------------------------------------


def key_text(kind, raw):
    """Return the one-line text of the 32 bytes `raw` as a key of `kind` (a prefix)."""
    return f"{kind}:{base64.b64encode(bytes(raw)).decode('ascii')}"


def decode_key(text, kind):
    """Return the 32 raw bytes of the key text `text`, which must be of `kind`.

    Raise ValueError saying what `text` is instead (its kind, if it has a known one);
    the message never repeats the text, which may be a private key.
    """
    if not isinstance(text, str):
        raise ValueError(f"not {KINDS[kind]}: not text")
    prefix, colon, body = text.strip().partition(":")
    if prefix != kind and prefix in KINDS:
        advice = ""
        if prefix in PRIVATE and kind not in PRIVATE:
            # Pasted into a config file or a chat: that key should now be replaced.
            advice = "; a private key must stay in its file: make a new one if this one was copied elsewhere"
        raise ValueError(f"this is {KINDS[prefix]}, not {KINDS[kind]}{advice}")
    example = f"one line '{kind}:' and {4 * ((KEY_BYTES + 2) // 3)} characters of base64"
    if not colon or prefix != kind:
        known = re.fullmatch(r"(certrelay-[a-z-]+)-v([0-9]+)", prefix) if colon else None
        if known and f"{known.group(1)}-v1" in KINDS:
            raise ValueError(f"not {KINDS[kind]}: a version {known.group(2)} key, which this certrelay cannot read")
        raise ValueError(f"not {KINDS[kind]}: expected {example}")
    try:
        raw = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"not {KINDS[kind]}: its base64 is invalid (expected {example})") from None
    if len(raw) != KEY_BYTES:
        raise ValueError(f"not {KINDS[kind]}: {len(raw)} bytes instead of {KEY_BYTES} (cut short when copied?)")
    return raw


def new_identity():
    """Make a host's X25519 key: return (text for its identity file, recipient text to print)."""
    key = nacl.public.PrivateKey.generate()
    return key_text(IDENTITY, bytes(key)), recipient_of(key)


def new_signing_key():
    """Make the certbot host's Ed25519 key: return (text for its signing-key file,
    publisher text to print)."""
    key = nacl.signing.SigningKey.generate()
    return key_text(SIGNING, bytes(key)), publisher_of(key)


def recipient_of(identity):
    """Return the recipient text of `identity` (a nacl.public.PrivateKey)."""
    return key_text(RECIPIENT, bytes(identity.public_key))


def publisher_of(signing_key):
    """Return the publisher text of `signing_key` (a nacl.signing.SigningKey)."""
    return key_text(PUBLISHER, bytes(signing_key.verify_key))


def parse_recipient(text):
    """Return the nacl.public.PublicKey of a recipient text; ValueError says what is wrong."""
    return nacl.public.PublicKey(decode_key(text, RECIPIENT))


def parse_publisher(text):
    """Return the nacl.signing.VerifyKey of a publisher text; ValueError says what is wrong."""
    return nacl.signing.VerifyKey(decode_key(text, PUBLISHER))


def write_key(path, text):
    """Create the key file `path` holding `text` (a private key text, as `new_identity`
    or `new_signing_key` return it) and a newline, mode 0600; a missing parent directory
    is made 0700.

    Never replaces an existing file: a host's identity or the publisher's key that is
    replaced silently cuts the fleet off. Raise KeyFileError (also when writing fails);
    ValueError if `text` is not a private key text.
    """
    if not isinstance(text, str) or text.partition(":")[0] not in PRIVATE:
        raise ValueError("write_key writes only a private key text (new_identity, new_signing_key)")
    kind = text.partition(":")[0]
    decode_key(text, kind)
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    exists = (f"{path} already exists: refusing to overwrite a key; to replace it, move it away first (then give"
              f" the new {'recipient' if kind == IDENTITY else 'publisher'} key it prints to the fleet)")
    if os.path.lexists(path):
        raise KeyFileError(exists)
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        try:
            os.unlink(temporary)  # left by a crashed process that had our PID
        except FileNotFoundError:
            pass
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(descriptor, "w", encoding="ascii") as file:
                os.fchmod(file.fileno(), 0o600)  # whatever the umask
                file.write(text.strip() + "\n")
                file.flush()
                os.fsync(file.fileno())
            # link() fails if `path` appeared meanwhile: the key is whole or absent, never replaced.
            os.link(temporary, path)
        finally:
            os.unlink(temporary)
        directory_descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(directory_descriptor)
        finally:
            os.close(directory_descriptor)
    except FileExistsError:
        raise KeyFileError(exists) from None
    except OSError as error:
        raise KeyFileError(f"cannot write the key file {path}: {error.strerror}") from None


def read_key_file(path, kind):
    """Return the raw key of `kind` in the key file `path`, after checking that it is a
    regular file of this user or root that group and others cannot use. Raise KeyFileError."""
    path = os.fspath(path)
    make = f"make it with `{MAKES[kind]}`"
    try:
        # O_NONBLOCK: a FIFO planted there must not hang us; it is refused below.
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such key file; {make}") from None
    except OSError as error:
        raise KeyFileError(f"cannot read the key file {path}: {error.strerror}"
                           " (run as the user that owns it, normally root)") from None
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"{path} is a {files_module.kind(info.st_mode)}, not a key file; {make}")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise KeyFileError(f"{path} holds a private key but group or others have access to it"
                               f" (mode {mode:04o}); fix: chmod 600 {path}")
        user = os.geteuid()
        if info.st_uid not in (user, 0):
            raise KeyFileError(f"{path} is owned by uid {info.st_uid}, not by this user (uid {user}) or root, so"
                               f" that user could replace the key; fix: chown {user} {path}")
        data = os.read(descriptor, MAX_KEY_FILE + 1)
    except OSError as error:
        raise KeyFileError(f"cannot read the key file {path}: {error.strerror}") from None
    finally:
        os.close(descriptor)
    if len(data) > MAX_KEY_FILE:
        raise KeyFileError(f"{path} is larger than a key file can be ({MAX_KEY_FILE} bytes); {make}")
    try:
        return decode_key(data.decode("ascii"), kind)
    except UnicodeDecodeError:
        raise KeyFileError(f"{path} is not a key file (not ASCII text); {make}") from None
    except ValueError as error:
        raise KeyFileError(f"{path}: {error}; {make}, or point the setting at the right file") from None


def load_identity(path):
    """Return the nacl.public.PrivateKey in the identity file `path`; raise KeyFileError
    if it cannot be read, is open to group or others, or holds anything else."""
    return nacl.public.PrivateKey(read_key_file(path, IDENTITY))


def load_signing_key(path):
    """Return the nacl.signing.SigningKey in the signing-key file `path`; raise
    KeyFileError as `load_identity` does."""
    return nacl.signing.SigningKey(read_key_file(path, SIGNING))


# --- sealing ---------------------------------------------------------------------------


def iso(seconds):
    """Return epoch `seconds` as 'YYYY-MM-DDTHH:MM:SSZ' (whole seconds, UTC)."""
    return (EPOCH + datetime.timedelta(seconds=int(seconds))).strftime("%Y-%m-%dT%H:%M:%SZ")


def from_iso(text):
    """Return the epoch seconds of an `iso` text; ValueError if it is anything else."""
    if not isinstance(text, str) or not DATE.fullmatch(text):
        raise ValueError("not a date as YYYY-MM-DDTHH:MM:SSZ")
    moment = datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    return (moment - EPOCH).total_seconds()


def canonical(data):
    """Return the canonical JSON bytes of `data` that the publisher signs."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def check_label(what, value):
    """Raise ValueError unless `value` is a usable host or lineage name."""
    if (not isinstance(value, str) or not value or len(value) > MAX_LABEL or "/" in value
            or value in (".", "..") or any(ord(character) < 32 or ord(character) == 127 for character in value)):
        raise ValueError(f"{what} {value!r} is not a usable name")


def checked(files):
    """Return `check_files(files)` (a certinfo.CertInfo), raising ValueError instead of
    Refused: for the publisher, which checks a lineage once for all its hosts."""
    try:
        return check_files(files)
    except Refused as error:
        raise ValueError(error.reason) from None


def seal(signing_key, recipient, host, name, files, sequence, published_at=None, info=None):
    """Return the value to store for lineage `name` of `host` (bytes: the JSON in the
    module docstring), signed with `signing_key` (nacl.signing.SigningKey) and sealed to
    `recipient` (nacl.public.PublicKey).

    `files`: {"cert.pem": bytes, "chain.pem": ..., "fullchain.pem": ..., "privkey.pem": ...};
    `sequence`: an int the subscriber compares with what it has; `published_at`: epoch
    seconds, now if None. Raise ValueError if the files are not what a host would
    accept (the same checks as `open_value`: e.g. read from live/ while certbot was
    switching its links, a new certificate with the old key): publish later instead.
    """
    check_label("host", host)
    check_label("lineage", name)
    if not isinstance(sequence, int) or isinstance(sequence, bool) or not 0 <= sequence <= MAX_SEQUENCE:
        raise ValueError(f"sequence {sequence!r} is not an integer from 0 to {MAX_SEQUENCE}")
    if not isinstance(files, dict) or sorted(files) != sorted(FILES):
        raise ValueError(f"files must be exactly {', '.join(FILES)}")
    for part, data in files.items():
        if not isinstance(data, (bytes, bytearray)):
            raise ValueError(f"{part} is not bytes")
        if len(data) > MAX_FILE:
            raise ValueError(f"{part} is larger than {MAX_FILE} bytes")
    files = {part: bytes(data) for part, data in files.items()}
    if info is None:  # given: `checked(files)` of these very files, done once for many hosts
        info = checked(files)
    if published_at is None:
        published_at = time.time()
    recipient_text = key_text(RECIPIENT, bytes(recipient))
    signed = {
        "format": FORMAT, "host": host, "name": name, "sequence": sequence, "fingerprint": info.sha256,
        "recipient": recipient_text, "published_at": iso(published_at),
        "files": {part: base64.b64encode(data).decode("ascii") for part, data in files.items()},
    }
    clear = {
        "format": FORMAT, "host": host, "name": name, "sequence": sequence, "fingerprint": info.sha256,
        "not_before": iso(info.not_before), "not_after": iso(info.not_after), "published_at": signed["published_at"],
        "recipient": recipient_text, "sealed": sign_and_seal(signing_key, recipient, canonical(signed)),
    }
    value = json.dumps(clear, indent=None, separators=(", ", ": ")).encode("utf-8")
    if len(value) > MAX_VALUE:  # cannot happen with MAX_FILE as it is: kept as the guard it is
        raise ValueError(f"the value would be {len(value)} bytes, more than {MAX_VALUE}")
    return value


def sign_and_seal(signing_key, recipient, message):
    """Return base64 text of the sealed box to `recipient` of `message` signed by `signing_key`."""
    signed = signing_key.sign(message)  # signature (64 bytes), then the message
    return base64.b64encode(nacl.public.SealedBox(recipient).encrypt(bytes(signed))).decode("ascii")


# --- reading a value -------------------------------------------------------------------


def no_duplicates(pairs):
    """json object_pairs_hook: refuse a key given twice, which two JSON readers (this one
    and jq in a status script) could take differently."""
    data = {}
    for key, item in pairs:
        if key in data:
            raise ValueError(f"the key {key!r} appears twice")
        data[key] = item
    return data


def no_constant(name):
    """json parse_constant: refuse NaN and Infinity, which are not JSON."""
    raise ValueError(f"{name} is not JSON")


def load_json(data, what):
    """Return the JSON object in the bytes `data`; Refused(`what` ...) if it is not one."""
    try:
        parsed = json.loads(data.decode("utf-8"), object_pairs_hook=no_duplicates, parse_constant=no_constant)
    except UnicodeDecodeError:
        raise Refused(f"{what} is not UTF-8 text") from None
    except (ValueError, RecursionError) as error:  # JSONDecodeError is a ValueError; deep nesting: RecursionError
        raise Refused(f"{what} is not valid JSON ({str(error)[:100]})") from None
    if not isinstance(parsed, dict):
        raise Refused(f"{what} is not a JSON object")
    return parsed


def typed(data, key, kind, what):
    """Return data[key] if it is of `kind`; Refused otherwise."""
    item = data.get(key)
    if kind is int:
        good = isinstance(item, int) and not isinstance(item, bool)
    else:
        good = isinstance(item, kind)
    if not good:
        raise Refused(f"{what} has no valid {key!r} field")
    return item


def clear_fields(value):
    """Return the checked clear fields of `value` as a dict (the JSON's, with "sealed").
    Raise Refused if the value is too large or malformed."""
    if not isinstance(value, (bytes, bytearray)):
        raise Refused("not a certrelay fleet value: not bytes")
    if len(value) > MAX_VALUE:
        raise Refused(f"too large: {len(value)} bytes, more than the {MAX_VALUE} a value may have")
    data = load_json(bytes(value), "not a certrelay fleet value: it")
    version = data.get("format")
    if version != FORMAT or isinstance(version, bool):
        raise Refused(f"written in format {str(version)[:20]!r}, which this certrelay cannot read (is it older than"
                      " the certbot host's?)")
    what = "not a certrelay fleet value: it"
    for key in ("host", "name", "fingerprint", "not_before", "not_after", "published_at", "recipient", "sealed"):
        typed(data, key, str, what)
    sequence = typed(data, "sequence", int, what)
    if not 0 <= sequence <= MAX_SEQUENCE:
        raise Refused(f"{what} has no valid 'sequence' field")
    if not FINGERPRINT.fullmatch(data["fingerprint"]):
        raise Refused(f"{what} has no valid 'fingerprint' field")
    for key in ("not_before", "not_after", "published_at"):
        try:
            from_iso(data[key])
        except ValueError:
            raise Refused(f"{what} has no valid {key!r} field") from None
    unknown = sorted(set(data) - set(CLEAR_FIELDS))
    if unknown:
        raise Refused(f"{what} has fields this format does not have: {', '.join(map(repr, unknown))[:100]}")
    return data


def peek(value):
    """Return the clear fields of a stored `value` without opening it (for status and
    acks; nothing here is authenticated): format, host, name, sequence (int),
    fingerprint, recipient, and not_before, not_after, published_at as epoch seconds.
    Raise Refused if the value is too large or malformed."""
    data = clear_fields(value)
    peeked = {key: item for key, item in data.items() if key != "sealed"}
    for key in ("not_before", "not_after", "published_at"):
        peeked[key] = from_iso(data[key])
    return peeked


def short(key):
    """A recipient text cut to what tells two keys apart in a sentence."""
    return key.partition(":")[2][:8] + "..."


def open_value(identity, publisher, host, name, value):
    """Open and check a stored `value` for lineage `name` of this `host`, with this
    host's `identity` (nacl.public.PrivateKey) and the `publisher`'s key
    (nacl.signing.VerifyKey). Return an Opened.

    Raise Refused, with a reason of its own, for anything a host must not use: too large
    or malformed, sealed to another key, tampered with, signed by another key, meant for
    another host or lineage, clear fields that disagree with the signed ones, or files
    that do not fit (a certificate that does not parse, a key that does not match it, a
    fullchain that is not cert and chain). Whether the sequence is newer than the one the
    host has is the caller's check.
    """
    clear = clear_fields(value)
    mine = recipient_of(identity)
    if clear["recipient"] != mine:
        # Said apart from tampering so the admin fixes the right thing: the certbot host's
        # [[fleet.host]] recipient is old (the host made a new key) or another host's.
        raise Refused(f"sealed to another recipient key ({short(clear['recipient'])}) than this host's"
                      f" ({short(mine)}): the certbot host has an old or wrong recipient for this host")
    try:
        sealed = base64.b64decode(clear["sealed"], validate=True)
    except (binascii.Error, ValueError):
        raise Refused("not a certrelay fleet value: its 'sealed' field is not valid base64") from None
    try:
        signed = nacl.public.SealedBox(identity).decrypt(sealed)
    except (nacl.exceptions.CryptoError, TypeError, ValueError):  # TypeError: shorter than a sealed box
        raise Refused("tampered with: the sealed part does not open with this host's key") from None
    try:
        message = publisher.verify(signed[SIGNATURE_BYTES:], signed[:SIGNATURE_BYTES])
    except (nacl.exceptions.BadSignatureError, ValueError):
        # The box opened, so its content is whole: another key signed it (a forger who
        # knows this host's public recipient key, or a new publisher key not pasted here).
        raise Refused("signed by another key than the publisher's (is [subscribe] publisher current?)") from None
    inside = load_json(message, "the signed content")
    what = "the signed content"
    if inside.get("format") != FORMAT or isinstance(inside.get("format"), bool):
        raise Refused(f"{what} has no valid 'format' field")
    for key in ("host", "name", "fingerprint", "recipient", "published_at"):
        typed(inside, key, str, what)
    typed(inside, "sequence", int, what)
    signed_files = typed(inside, "files", dict, what)
    if inside["host"] != host:
        raise Refused(f"meant for host {inside['host'][:64]!r}, not {host!r}")
    if inside["name"] != name:
        raise Refused(f"meant for lineage {inside['name'][:64]!r}, not {name!r}")
    # A writer to the store can edit the clear fields (status and acks read them): they
    # must say what the publisher signed.
    for key in ("host", "name", "sequence", "fingerprint", "recipient", "published_at"):
        if clear[key] != inside[key]:
            raise Refused(f"tampered with: the {key} in clear ({str(clear[key])[:64]}) is not the signed one"
                          f" ({str(inside[key])[:64]})")
    if sorted(signed_files) != sorted(FILES) or not all(isinstance(item, str) for item in signed_files.values()):
        raise Refused(f"{what} does not hold exactly {', '.join(FILES)}")
    files = {}
    for part, text in signed_files.items():
        try:
            files[part] = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise Refused(f"{what}: {part} is not valid base64") from None
    info = check_files(files)
    if info.sha256 != inside["fingerprint"]:
        raise Refused("the signed fingerprint is not cert.pem's")
    for key in ("not_before", "not_after"):
        if from_iso(clear[key]) != from_iso(iso(getattr(info, key))):  # whole seconds, as written
            raise Refused(f"tampered with: {key} in clear ({clear[key]}) is not the certificate's"
                          f" ({iso(getattr(info, key))})")
    return Opened(host=host, name=name, sequence=inside["sequence"], fingerprint=info.sha256,
                  not_before=info.not_before, not_after=info.not_after, files=files,
                  published_at=from_iso(inside["published_at"]))


# --- the files -------------------------------------------------------------------------

PEM_CERTIFICATE = re.compile(re.escape(certificate.PEM_BEGIN) + rb"(.*?)" + re.escape(certificate.PEM_END), re.DOTALL)


def certificates(pem, part):
    """Return the DER bytes of every PEM certificate in `pem`; Refused naming `part`."""
    found = []
    for match in PEM_CERTIFICATE.finditer(pem):
        try:
            found.append(binascii.a2b_base64(b"".join(match.group(1).split()), strict_mode=True))
        except binascii.Error:
            raise Refused(f"{part} holds a certificate whose base64 is invalid") from None
    return found


def check_files(files):
    """Check that the four `files` (name -> bytes) can be served together: cert.pem is a
    certificate, privkey.pem its private key, fullchain.pem cert.pem and then chain.pem.
    Return cert.pem's certinfo.CertInfo (sha256 as certificate.der_fingerprint gives it).
    Raise Refused."""
    for part in FILES:
        if len(files[part]) > MAX_FILE:
            raise Refused(f"{part} is larger than {MAX_FILE} bytes")
    try:
        der = certificate.pem_to_der(files["cert.pem"])
        info = certinfo.from_der(der)
        public = x509.load_der_x509_certificate(der).public_key()
    except (certificate.CertificateError, certinfo.CertificateParseError, ValueError, UnsupportedAlgorithm) as error:
        raise Refused(f"cert.pem is not a readable certificate: {str(error)[:100]}") from None
    try:
        key = serialization.load_pem_private_key(files["privkey.pem"], password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):  # TypeError: an encrypted key
        raise Refused("privkey.pem is not a readable, unencrypted PEM private key") from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        matches = key.public_key().public_bytes(*spki) == public.public_bytes(*spki)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        matches = False
    if not matches:
        # consul-template #1672: a server restarted on a certificate and a key that do
        # not belong together fails, so the pair is refused as one.
        raise Refused("the private key does not match the certificate")
    # Servers read fullchain.pem (apache, exim, dovecot): its first certificate must be
    # the one the key matches. Compared as DER, so line endings do not matter.
    if certificates(files["fullchain.pem"], "fullchain.pem") != (
            certificates(files["cert.pem"], "cert.pem") + certificates(files["chain.pem"], "chain.pem")):
        raise Refused("fullchain.pem is not cert.pem followed by chain.pem")
    return info
