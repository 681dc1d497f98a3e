"""The fleet's keys and sealed values (certrelay/fleet/seal.py): a host opens only what
the publisher signed for it, and the store never holds a usable private key."""

import base64
import contextlib
import json
import os
import random
import re

import pytest

from certrelay import certificate, certinfo
from certrelay.fleet import seal
from tests import certs

PUBLISHED = 1_750_000_000


@pytest.fixture(scope="module")
def authority():
    return certs.Authority("Test Intermediate", certs.Authority("Test Root"))


def lineage(authority, domains=("x.ch",)):
    """The four files of a lineage as certbot writes them, the leaf issued by `authority`."""
    cert, key = authority.issue(list(domains))
    return {"cert.pem": cert, "chain.pem": authority.pem, "fullchain.pem": cert + authority.pem, "privkey.pem": key}


class Keys:
    """Key files made and read back as `certrelay fleet keygen` and `fleet init` would."""

    def __init__(self, directory):
        self.directory = directory

    def identity(self, host):
        text, printed = seal.new_identity()
        path = os.path.join(self.directory, f"{host}.key")
        seal.write_key(path, text)
        identity = seal.load_identity(path)
        assert seal.recipient_of(identity) == printed
        return identity, seal.parse_recipient(printed)

    def signing(self, name="publisher"):
        text, printed = seal.new_signing_key()
        path = os.path.join(self.directory, f"{name}.key")
        seal.write_key(path, text)
        signing = seal.load_signing_key(path)
        assert seal.publisher_of(signing) == printed
        return signing, seal.parse_publisher(printed)


@pytest.fixture
def keys(tmp_path):
    keys = Keys(str(tmp_path / "keys"))
    keys.mail_identity, keys.mail = keys.identity("mail")
    keys.web_identity, keys.web = keys.identity("web")
    keys.signing_key, keys.publisher = keys.signing()
    return keys


@pytest.fixture
def files(authority):
    return lineage(authority)


def sealed_for_mail(keys, files, host="mail", name="x.ch", sequence=7, recipient=None, signing_key=None):
    return seal.seal(signing_key or keys.signing_key, recipient or keys.mail, host, name, files, sequence,
                     published_at=PUBLISHED)


def open_as_mail(keys, value, name="x.ch"):
    return seal.open_value(keys.mail_identity, keys.publisher, "mail", name, value)


def refusal(keys, value, name="x.ch"):
    with pytest.raises(seal.Refused) as raised:
        open_as_mail(keys, value, name)
    assert str(raised.value) == raised.value.reason
    return raised.value.reason


def edited(value, **clear):
    data = json.loads(value)
    data.update(clear)
    return json.dumps(data).encode()


@contextlib.contextmanager
def without_file_checks(monkeypatch, info=None):
    """A context in which `seal` signs files it would refuse (as a buggy or older
    publisher might), to prove the host checks them itself."""
    with monkeypatch.context() as context:
        context.setattr(seal, "check_files", lambda files: info or certinfo.from_pem(files["cert.pem"]))
        yield


# --- round trip --------------------------------------------------------------------------


def test_a_sealed_value_opens_for_its_host_with_every_file_and_fact(keys, files):
    value = sealed_for_mail(keys, files)
    info = certinfo.from_pem(files["cert.pem"])

    opened = open_as_mail(keys, value)

    assert opened.files == files
    assert (opened.host, opened.name, opened.sequence) == ("mail", "x.ch", 7)
    assert opened.fingerprint == certificate.der_fingerprint(files["cert.pem"]) == info.sha256
    assert (opened.not_before, opened.not_after, opened.published_at) == (info.not_before, info.not_after, PUBLISHED)
    assert "PRIVATE KEY" not in repr(opened)  # a logged Opened must not carry the key


def test_the_clear_fields_say_what_status_needs_without_opening(keys, files):
    value = sealed_for_mail(keys, files)
    info = certinfo.from_pem(files["cert.pem"])

    clear = json.loads(value)
    peeked = seal.peek(value)

    assert clear["not_after"] == seal.iso(info.not_after) and clear["published_at"] == "2025-06-15T15:06:40Z"
    assert peeked == {
        "format": 1, "host": "mail", "name": "x.ch", "sequence": 7, "fingerprint": info.sha256,
        "not_before": info.not_before, "not_after": info.not_after, "published_at": PUBLISHED,
        "recipient": seal.recipient_of(keys.mail_identity),
    }


def test_a_fullchain_with_other_line_endings_but_the_same_certificates_opens(keys, files):
    files["fullchain.pem"] = files["fullchain.pem"].replace(b"\n", b"\r\n")

    assert open_as_mail(keys, sealed_for_mail(keys, files)).files["fullchain.pem"] == files["fullchain.pem"]


# --- refusals, each with its own reason ---------------------------------------------------


@pytest.mark.parametrize("where", [0, 40, 500, -1])  # ephemeral key, tag/ciphertext, ciphertext, last byte
def test_a_flipped_byte_in_the_sealed_part_is_refused_as_tampered(keys, files, where):
    value = sealed_for_mail(keys, files)
    sealed = bytearray(base64.b64decode(json.loads(value)["sealed"]))
    sealed[where] ^= 0x01

    reason = refusal(keys, edited(value, sealed=base64.b64encode(bytes(sealed)).decode()))

    assert reason == "tampered with: the sealed part does not open with this host's key"


def test_a_value_signed_by_another_key_is_refused(keys, files):
    """What a writer to the store who knows mail's recipient (it is public) could make."""
    forger, _ = keys.signing("forger")

    reason = refusal(keys, sealed_for_mail(keys, files, signing_key=forger))

    assert reason.startswith("signed by another key than the publisher's")


def test_a_value_sealed_to_another_hosts_key_is_refused_naming_both_keys(keys, files):
    value = sealed_for_mail(keys, files, recipient=keys.web)

    reason = refusal(keys, value)
    hidden = refusal(keys, edited(value, recipient=seal.recipient_of(keys.mail_identity)))

    web, mail = (seal.recipient_of(identity).split(":")[1][:8] for identity in (keys.web_identity, keys.mail_identity))
    assert reason.startswith(f"sealed to another recipient key ({web}...) than this host's ({mail}...)")
    assert "old or wrong recipient" in reason
    assert hidden == "tampered with: the sealed part does not open with this host's key"


def test_a_value_signed_for_another_host_is_refused(keys, files):
    """web's value, re-sealed to mail's key (by web itself, say): the signed host says so."""
    reason = refusal(keys, sealed_for_mail(keys, files, host="web"))

    assert reason == "meant for host 'web', not 'mail'"


def test_a_value_signed_for_another_lineage_is_refused(keys, files):
    """A store writer moving a value to another lineage's key of the same host."""
    reason = refusal(keys, sealed_for_mail(keys, files, name="other.ch"))

    assert reason == "meant for lineage 'other.ch', not 'x.ch'"


@pytest.mark.parametrize("key, change", [
    ("fingerprint", lambda value: "0" * 64),
    ("sequence", lambda value: value + 1),  # an old value made to look new (a replay)
    ("host", lambda value: "web"),
    ("name", lambda value: "other.ch"),
    ("published_at", lambda value: "2030-01-01T00:00:00Z"),
    ("not_after", lambda value: "2099-01-01T00:00:00Z"),
    ("not_before", lambda value: "2000-01-01T00:00:00Z"),
])
def test_clear_fields_a_store_writer_edited_are_refused(keys, files, key, change):
    value = sealed_for_mail(keys, files)

    reason = refusal(keys, edited(value, **{key: change(json.loads(value)[key])}))

    assert reason.startswith(f"tampered with: the {key} in clear" if key not in ("not_before", "not_after")
                             else f"tampered with: {key} in clear")


def test_a_key_that_does_not_match_the_certificate_is_refused_by_the_publisher_and_the_host(
        keys, files, authority, monkeypatch):
    files["privkey.pem"] = lineage(authority)["privkey.pem"]  # the old key with the new certificate

    with pytest.raises(ValueError, match="^the private key does not match the certificate$"):
        sealed_for_mail(keys, files)
    with without_file_checks(monkeypatch):
        value = sealed_for_mail(keys, files)

    assert refusal(keys, value) == "the private key does not match the certificate"


@pytest.mark.parametrize("fullchain", [
    lambda files, other: files["cert.pem"],  # the chain left out
    lambda files, other: files["chain.pem"] + files["cert.pem"],  # the wrong order
    lambda files, other: other["cert.pem"] + files["chain.pem"],  # another certificate first
])
def test_a_fullchain_that_is_not_cert_then_chain_is_refused_by_the_publisher_and_the_host(
        keys, files, authority, monkeypatch, fullchain):
    files["fullchain.pem"] = fullchain(files, lineage(authority))

    with pytest.raises(ValueError, match="^fullchain.pem is not cert.pem followed by chain.pem$"):
        sealed_for_mail(keys, files)
    with without_file_checks(monkeypatch):
        value = sealed_for_mail(keys, files)

    assert refusal(keys, value) == "fullchain.pem is not cert.pem followed by chain.pem"


def test_a_signed_certificate_that_does_not_parse_is_refused(keys, files, authority, monkeypatch):
    files["cert.pem"] = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"

    with pytest.raises(ValueError, match="^cert.pem is not a readable certificate"):
        sealed_for_mail(keys, files)
    with without_file_checks(monkeypatch, certinfo.from_pem(lineage(authority)["cert.pem"])):
        value = sealed_for_mail(keys, files)

    assert refusal(keys, value).startswith("cert.pem is not a readable certificate")


def test_a_signed_fingerprint_that_is_not_the_certificates_is_refused(keys, files, authority, monkeypatch):
    """A publisher that read the fingerprint of one certificate and the files of another."""
    with without_file_checks(monkeypatch, certinfo.from_pem(lineage(authority)["cert.pem"])):
        value = sealed_for_mail(keys, files)

    assert refusal(keys, value) == "the signed fingerprint is not cert.pem's"


@pytest.mark.parametrize("value, reason", [
    (b"not json", "not a certrelay fleet value: it is not valid JSON"),
    (b"\xff\xfe{}", "not a certrelay fleet value: it is not UTF-8 text"),
    (b"[1, 2]", "not a certrelay fleet value: it is not a JSON object"),
    (b"[" * 200_000 + b"]" * 200_000, "not a certrelay fleet value: it is not valid JSON"),
    (b'{"format": 1, "sequence": NaN}', "not a certrelay fleet value: it is not valid JSON"),
    (b'{"format": 1, "format": 1}', "not a certrelay fleet value: it is not valid JSON (the key 'format' appears"),
    (b'{"format": 2}', "written in format '2', which this certrelay cannot read"),
    (b'{"format": true}', "written in format 'True'"),
    (b'{"format": 1}', "not a certrelay fleet value: it has no valid 'host' field"),
])
def test_malformed_values_are_refused_with_their_reason(keys, value, reason):
    assert refusal(keys, value).startswith(reason)
    with pytest.raises(seal.Refused):
        seal.peek(value)


@pytest.mark.parametrize("key, change, reason", [
    ("sealed", "!!!not base64!!!", "not a certrelay fleet value: its 'sealed' field is not valid base64"),
    ("sealed", "AAAA", "tampered with: the sealed part does not open"),  # shorter than any sealed box
    ("sequence", "7", "not a certrelay fleet value: it has no valid 'sequence' field"),
    ("sequence", True, "not a certrelay fleet value: it has no valid 'sequence' field"),
    ("sequence", -1, "not a certrelay fleet value: it has no valid 'sequence' field"),
    ("sequence", 10**400, "not a certrelay fleet value: it has no valid 'sequence' field"),
    ("fingerprint", "AB:CD", "not a certrelay fleet value: it has no valid 'fingerprint' field"),
    ("not_after", "tomorrow", "not a certrelay fleet value: it has no valid 'not_after' field"),
    ("host", ["mail"], "not a certrelay fleet value: it has no valid 'host' field"),
    ("extra", 1, "not a certrelay fleet value: it has fields this format does not have: 'extra'"),
])
def test_malformed_clear_fields_are_refused_with_their_reason(keys, files, key, change, reason):
    value = edited(sealed_for_mail(keys, files), **{key: change})

    assert refusal(keys, value).startswith(reason)


def test_malformed_signed_content_is_refused_not_crashed_on(keys, files):
    """A publisher bug, not an attack: the host still refuses cleanly."""
    value = json.loads(sealed_for_mail(keys, files))
    signed = {"format": 1, "host": "mail", "name": "x.ch", "sequence": 7, "fingerprint": value["fingerprint"],
              "recipient": value["recipient"], "published_at": value["published_at"],
              "files": {part: base64.b64encode(data).decode() for part, data in files.items()}}
    cases = [
        (b"not json", "the signed content is not valid JSON"),
        (b"", "the signed content is not valid JSON"),
        (seal.canonical({**signed, "sequence": "7"}), "the signed content has no valid 'sequence' field"),
        (seal.canonical({**signed, "files": {"cert.pem": "AAAA"}}), "the signed content does not hold exactly"),
        (seal.canonical({**signed, "files": {**signed["files"], "privkey.pem": "%%"}}),
         "the signed content: privkey.pem is not valid base64"),
        (seal.canonical({**signed, "files": {**signed["files"], "privkey.pem": "AAAA"}}),
         "privkey.pem is not a readable, unencrypted PEM private key"),
    ]
    for message, reason in cases:
        sealed = seal.sign_and_seal(keys.signing_key, keys.mail, message)

        assert refusal(keys, json.dumps({**value, "sealed": sealed}).encode()).startswith(reason), message[:40]


def test_an_oversized_value_is_refused_before_it_is_parsed(keys, files):
    value = sealed_for_mail(keys, files)
    padded = value[:-1] + b" " * (seal.MAX_VALUE - len(value) + 1) + b"}"  # still valid JSON, and sealed well

    assert len(padded) == seal.MAX_VALUE + 1
    assert refusal(keys, padded) == f"too large: {len(padded)} bytes, more than the {seal.MAX_VALUE} a value may have"
    assert open_as_mail(keys, padded[:-2] + b"}").sequence == 7  # one byte less passes


def test_any_damage_to_a_value_is_refused_or_harmless_never_an_exception(keys, files):
    value = sealed_for_mail(keys, files)
    original = open_as_mail(keys, value)
    rng = random.Random(20)
    for _ in range(400):
        damaged = bytearray(value)
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.2:
                del damaged[rng.randrange(len(damaged)):]
            elif damaged:
                damaged[rng.randrange(len(damaged))] ^= rng.randint(1, 255)
        try:
            opened = open_as_mail(keys, bytes(damaged))
        except seal.Refused:
            continue
        assert opened == original  # only damage that changes nothing (a space made a tab) passes


# --- the store holds no usable key ---------------------------------------------------------


def layers(data, depth=0):
    """`data` and every base64 string found in it, decoded, to some depth: what anyone
    with a copy of the store could decode without a key."""
    yield data
    if depth < 4:
        for match in re.finditer(rb"[A-Za-z0-9+/]{16,}={0,2}", data):
            try:
                decoded = base64.b64decode(match.group(0), validate=True)
            except ValueError:
                continue
            yield from layers(decoded, depth + 1)


def test_the_private_key_appears_nowhere_in_the_value(keys, files, tmp_path):
    value = sealed_for_mail(keys, files)
    pem = files["privkey.pem"]
    body = b"".join(line for line in pem.splitlines() if not line.startswith(b"-----"))
    secrets = [pem, body, base64.b64decode(body), base64.b64encode(pem)[:40],
               *(line for line in pem.splitlines() if len(line) > 16 and not line.startswith(b"-----")),
               bytes(keys.mail_identity), bytes(keys.signing_key)]

    seen = list(layers(value))

    assert len(seen) > 2  # the sealed part was decoded too
    for layer in seen:
        for secret in secrets:
            assert secret not in layer
    assert b"PRIVATE KEY" not in b"".join(seen)


# --- key files and key texts -----------------------------------------------------------------


def test_a_key_file_is_written_0600_in_a_0700_directory_and_read_back(tmp_path):
    text, recipient = seal.new_identity()
    path = tmp_path / "fleet" / "host.key"

    seal.write_key(str(path), text)

    assert path.read_text() == text + "\n"
    assert os.stat(path).st_mode & 0o777 == 0o600 and os.stat(path.parent).st_mode & 0o777 == 0o700
    assert seal.recipient_of(seal.load_identity(str(path))) == recipient
    assert [entry.name for entry in path.parent.iterdir()] == ["host.key"]  # no temporary file left


@pytest.mark.parametrize("make", [seal.new_identity, seal.new_signing_key])
def test_an_existing_key_file_is_never_overwritten(tmp_path, make):
    path = tmp_path / "host.key"
    seal.write_key(str(path), make()[0])
    before = path.read_bytes()

    with pytest.raises(seal.KeyFileError) as raised:
        seal.write_key(str(path), make()[0])

    assert path.read_bytes() == before
    assert f"{path} already exists: refusing to overwrite a key" in str(raised.value)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_a_key_file_others_can_use_is_refused_naming_the_file_and_the_fix(tmp_path, mode):
    path = tmp_path / "host.key"
    seal.write_key(str(path), seal.new_identity()[0])
    os.chmod(path, mode)

    with pytest.raises(seal.KeyFileError) as raised:
        seal.load_identity(str(path))

    assert str(path) in str(raised.value) and f"(mode {mode:04o})" in str(raised.value)
    assert str(raised.value).endswith(f"fix: chmod 600 {path}")


def test_a_signing_key_file_others_can_read_is_refused_too(tmp_path):
    path = tmp_path / "publisher.key"
    seal.write_key(str(path), seal.new_signing_key()[0])
    os.chmod(path, 0o644)

    with pytest.raises(seal.KeyFileError, match="chmod 600"):
        seal.load_signing_key(str(path))


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
def test_a_key_file_of_another_user_is_refused(tmp_path):
    path = tmp_path / "host.key"
    seal.write_key(str(path), seal.new_identity()[0])
    os.chown(path, 65534, 65534)

    with pytest.raises(seal.KeyFileError) as raised:
        seal.load_identity(str(path))

    assert str(raised.value).startswith(f"{path} is owned by uid 65534") and f"chown 0 {path}" in str(raised.value)


def test_a_missing_key_file_names_the_command_that_makes_it(tmp_path):
    with pytest.raises(seal.KeyFileError, match="no such key file; make it with `certrelay fleet keygen`"):
        seal.load_identity(str(tmp_path / "host.key"))
    with pytest.raises(seal.KeyFileError, match="no such key file; make it with `certrelay fleet init`"):
        seal.load_signing_key(str(tmp_path / "publisher.key"))


def test_a_key_file_that_is_not_a_regular_file_is_refused_without_hanging(tmp_path):
    os.mkfifo(tmp_path / "host.key", 0o600)

    with pytest.raises(seal.KeyFileError, match="is a FIFO, not a key file"):
        seal.load_identity(str(tmp_path / "host.key"))


def test_the_wrong_kind_of_key_file_is_named(tmp_path):
    path = tmp_path / "host.key"
    seal.write_key(str(path), seal.new_signing_key()[0])

    with pytest.raises(seal.KeyFileError) as raised:
        seal.load_identity(str(path))

    assert str(raised.value).startswith(f"{path}: this is the certbot host's private signing key")
    assert "not a host's private identity key" in str(raised.value)


@pytest.mark.parametrize("content, reason", [
    ("garbage\n", "expected one line 'certrelay-fleet-identity-v1:' and 44 characters of base64"),
    ("certrelay-fleet-identity-v1:AAAA\n", "3 bytes instead of 32 (cut short when copied?)"),
    ("certrelay-fleet-identity-v1:not base64!\n", "its base64 is invalid"),
    ("certrelay-fleet-identity-v9:AAAA\n", "a version 9 key, which this certrelay cannot read"),
])
def test_a_malformed_key_file_says_what_is_wrong(tmp_path, content, reason):
    path = tmp_path / "host.key"
    path.write_text(content)
    os.chmod(path, 0o600)

    with pytest.raises(seal.KeyFileError) as raised:
        seal.load_identity(str(path))

    assert str(raised.value).startswith(f"{path}: not a host's private identity key") and reason in str(raised.value)


def test_a_key_pasted_in_the_wrong_place_is_named_by_its_kind():
    identity, recipient = seal.new_identity()
    signing, publisher = seal.new_signing_key()

    with pytest.raises(ValueError, match=r"^this is the publisher key \(printed by `certrelay fleet init`"):
        seal.parse_recipient(publisher)
    with pytest.raises(ValueError, match=r"^this is a host's recipient key \(printed by `certrelay fleet keygen`"):
        seal.parse_publisher(recipient)
    for private, parse in ((identity, seal.parse_recipient), (signing, seal.parse_publisher)):
        with pytest.raises(ValueError) as raised:
            parse(private)
        assert "private" in str(raised.value) and "must stay in its file" in str(raised.value)
        assert private.split(":")[1][:8] not in str(raised.value)  # the secret is not repeated
    assert bytes(seal.parse_recipient(f"  {recipient}\n")) == base64.b64decode(recipient.split(":")[1])


def test_write_key_writes_only_private_key_texts(tmp_path):
    with pytest.raises(ValueError):
        seal.write_key(str(tmp_path / "x.key"), seal.new_identity()[1])
    assert not (tmp_path / "x.key").exists()
