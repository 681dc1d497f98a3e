"""certrelay.deliver on the real file system, as root: formats, owners and modes,
idempotence, atomicity under a concurrent reader, and the traps a destination or a
lineage can hold."""

import datetime
import grp
import json
import os
import pwd
import stat
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from certrelay import deliver as delivery, install
from tests import wait

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="delivers files with owners: needs root")

NAME = "example.org"
PASSWORD = "correct horse battery staple"
NOBODY, NOGROUP = "nobody", "nogroup"


# --- certificates, laid out like certbot ---------------------------------------------------


def new_certificate(subject, key, issuer=None, issuer_key=None, ca=False):
    """Return a certificate for `subject` with the public half of `key`, signed by
    `issuer_key` (self-signed without one)."""
    issuer_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer or subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime(2024, 1, 1))
        .not_valid_after(datetime.datetime(2099, 1, 1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    return builder.sign(issuer_key or key, hashes.SHA256())


def pem(certificate):
    return certificate.public_bytes(serialization.Encoding.PEM)


def key_pem(key):
    # certbot writes PKCS#8
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@pytest.fixture(scope="session")
def versions():
    """Two renewals of one lineage: [{part: bytes, "key": key object, "leaf": cert}, ...],
    different keys, one CA."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = new_certificate("certrelay test CA", ca_key, ca=True)
    result = []
    for _ in range(2):
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = new_certificate(NAME, key, issuer="certrelay test CA", issuer_key=ca_key)
        result.append({
            "cert": pem(leaf), "chain": pem(ca), "fullchain": pem(leaf) + pem(ca), "privkey": key_pem(key),
            "key": key, "leaf": leaf, "ca": ca,
        })
    return result


class Lineage:
    """A certbot config dir with lineage NAME: archive/NAME/partN.pem, and live/NAME/
    part.pem relative links to one version."""

    def __init__(self, config_dir, versions):
        self.config_dir = config_dir
        self.archive = os.path.join(config_dir, "archive", NAME)
        self.live = os.path.join(config_dir, "live", NAME)
        for directory in (self.archive, self.live):
            os.makedirs(directory)
        for directory in ("archive", "live"):
            os.chmod(os.path.join(config_dir, directory), 0o700)  # as certbot leaves them
        for number, version in enumerate(versions, start=1):
            self.write_version(number, version)
        self.use(1)

    def write_version(self, number, parts):
        for part in install.PARTS:
            path = os.path.join(self.archive, f"{part}{number}.pem")
            with open(path, "wb") as file:
                file.write(parts[part])
            os.chmod(path, 0o600 if part == "privkey" else 0o644)

    def use(self, number, part=None):
        """Point live/NAME/PART.pem (every part without `part`) at version `number`."""
        for name in [part] if part else install.PARTS:
            self.link(name, f"../../archive/{NAME}/{name}{number}.pem")

    def link(self, part, target):
        temporary = os.path.join(self.live, f".{part}.new")
        os.symlink(target, temporary)
        os.replace(temporary, os.path.join(self.live, f"{part}.pem"))

    @property
    def values(self):
        return {"name": NAME, "lineage": self.live, "domains": NAME}


@pytest.fixture
def lineage(root, versions):
    return Lineage(os.path.join(root, "letsencrypt"), versions)


@pytest.fixture
def out(root):
    """The destination directory, root-owned 0755."""
    directory = os.path.join(root, "out")
    os.mkdir(directory, 0o755)
    return directory


def deliver(lineage, dest, content=("fullchain", "privkey"), **settings):
    return delivery.deliver(install.Install(line=1, dest=dest, content=tuple(content), **settings),
                           lineage.config_dir, NAME, lineage.values)


def attributes(path):
    info = os.lstat(path)
    return info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)


def read(path):
    with open(path, "rb") as file:
        return file.read()


def nobody_ids():
    try:
        return pwd.getpwnam(NOBODY).pw_uid, grp.getgrnam(NOGROUP).gr_gid
    except KeyError:
        pytest.skip("needs the user nobody and the group nogroup")


def leftovers(directory):
    return [name for name in os.listdir(directory) if name.startswith(".")]


# --- formats ------------------------------------------------------------------------------


def test_the_root_fixture_really_is_a_safe_place(root):
    assert install.directory_problems(root, create_dirs=False) == []
    assert attributes(root) == (0, 0, 0o755)


def test_pem_concatenates_the_parts_and_a_new_key_file_is_0600_root(lineage, out, versions):
    dest = os.path.join(out, "{name}.pem")

    result = deliver(lineage, dest)

    path = os.path.join(out, "example.org.pem")
    assert (result.ok, result.changed) == (True, True), result.detail
    assert isinstance(result, delivery.execute.Result)
    assert read(path) == versions[0]["fullchain"] + versions[0]["privkey"]
    assert attributes(path) == (0, 0, 0o600)
    assert leftovers(out) == []


def test_a_new_certificate_only_file_is_0644_root(lineage, out, versions):
    result = deliver(lineage, os.path.join(out, "cert.pem"), content=("cert", "chain"))

    assert result.ok, result.detail
    assert read(os.path.join(out, "cert.pem")) == versions[0]["cert"] + versions[0]["chain"]
    assert attributes(os.path.join(out, "cert.pem")) == (0, 0, 0o644)


def test_parts_without_a_final_newline_stay_apart(lineage, out, versions):
    lineage.write_version(3, {**versions[0], "cert": versions[0]["cert"].rstrip(b"\n")})
    lineage.use(3, "cert")

    assert deliver(lineage, os.path.join(out, "x.pem"), content=("cert", "privkey")).ok

    assert read(os.path.join(out, "x.pem")) == versions[0]["cert"] + versions[0]["privkey"]


def test_der_is_the_leaf_certificate(lineage, out, versions):
    result = deliver(lineage, os.path.join(out, "leaf.der"), content=("cert",), format="der")

    assert result.ok, result.detail
    assert read(os.path.join(out, "leaf.der")) == versions[0]["leaf"].public_bytes(serialization.Encoding.DER)
    assert attributes(os.path.join(out, "leaf.der")) == (0, 0, 0o644)


@pytest.fixture
def password_file(root):
    path = os.path.join(root, "keystore.pass")
    with open(path, "w", encoding="utf-8") as file:
        file.write(PASSWORD + "\n")
    os.chmod(path, 0o600)
    return path


def test_pkcs12_holds_key_leaf_and_chain_with_modern_encryption(lineage, out, versions, password_file):
    path = os.path.join(out, "keystore.p12")

    result = deliver(lineage, path, format="pkcs12", password_file=password_file)

    assert result.ok, result.detail
    assert attributes(path) == (0, 0, 0o600)
    assert PASSWORD not in result.detail
    key, leaf, chain = pkcs12.load_key_and_certificates(read(path), PASSWORD.encode())
    assert key.private_numbers() == versions[0]["key"].private_numbers()
    assert leaf == versions[0]["leaf"] and chain == [versions[0]["ca"]]
    assert pkcs12.load_pkcs12(read(path), PASSWORD.encode()).cert.friendly_name == NAME.encode()
    shown = subprocess.run(
        ["openssl", "pkcs12", "-in", path, "-passin", f"file:{password_file}", "-nodes", "-info"],
        capture_output=True, text=True, check=True,
    )
    assert shown.stdout.count("BEGIN CERTIFICATE") == 2 and "BEGIN PRIVATE KEY" in shown.stdout
    assert f"friendlyName: {NAME}" in shown.stdout
    assert "PBES2, PBKDF2, AES-256-CBC" in shown.stderr and "MAC: sha256" in shown.stderr


def test_pkcs12_is_not_rewritten_while_key_and_certificates_stay_the_same(lineage, out, password_file):
    path = os.path.join(out, "keystore.p12")
    deliver(lineage, path, format="pkcs12", password_file=password_file)
    before = os.stat(path)

    again = deliver(lineage, path, format="pkcs12", password_file=password_file)
    lineage.use(2)
    renewed = deliver(lineage, path, format="pkcs12", password_file=password_file)

    assert (again.ok, again.changed) == (True, False), again.detail
    assert (renewed.ok, renewed.changed) == (True, True), renewed.detail
    assert os.stat(path).st_ino != before.st_ino


def test_pkcs12_with_an_unreadable_password_file_writes_nothing(lineage, out, root):
    result = deliver(lineage, os.path.join(out, "k.p12"), format="pkcs12", password_file=os.path.join(root, "missing"))

    assert not result.ok and "cannot read the password file" in result.detail
    assert os.listdir(out) == []


# --- owner, group, mode ------------------------------------------------------------------------


def test_owner_group_and_mode_are_set(lineage, out):
    uid, gid = nobody_ids()
    path = os.path.join(out, "x.pem")

    result = deliver(lineage, path, owner=NOBODY, group=NOGROUP, mode=0o640)

    assert result.ok, result.detail
    assert attributes(path) == (uid, gid, 0o640)


def test_an_existing_file_keeps_its_owner_group_and_mode(lineage, out, versions):
    uid, gid = nobody_ids()
    path = os.path.join(out, "x.pem")
    with open(path, "wb") as file:
        file.write(b"old")
    os.chown(path, uid, gid)
    os.chmod(path, 0o640)

    result = deliver(lineage, path)

    assert result.ok, result.detail
    assert attributes(path) == (uid, gid, 0o640)
    assert read(path) == versions[0]["fullchain"] + versions[0]["privkey"]


def test_an_existing_key_file_readable_by_everyone_loses_that_and_says_so(lineage, out):
    path = os.path.join(out, "x.pem")
    with open(path, "wb") as file:
        file.write(b"old")
    os.chmod(path, 0o644)

    result = deliver(lineage, path)

    assert result.ok and "0644 tightened to 0640" in result.detail
    assert attributes(path) == (0, 0, 0o640)


def test_the_same_delivery_twice_changes_nothing(lineage, out):
    path = os.path.join(out, "x.pem")
    deliver(lineage, path, mode=0o640)
    before = os.stat(path)

    result = deliver(lineage, path, mode=0o640)

    after = os.stat(path)
    assert (result.ok, result.changed) == (True, False), result.detail
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_a_new_mode_or_a_renewal_is_written(lineage, out, versions):
    path = os.path.join(out, "x.pem")
    deliver(lineage, path)

    mode_changed = deliver(lineage, path, mode=0o640)
    lineage.use(2)
    renewed = deliver(lineage, path, mode=0o640)

    assert mode_changed.changed and renewed.changed
    assert attributes(path) == (0, 0, 0o640)
    assert read(path) == versions[1]["fullchain"] + versions[1]["privkey"]


# --- atomicity ---------------------------------------------------------------------------------

READER = r"""
import json, os, stat, sys
path, stop, ready, uid, gid, mode = sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7])
wanted = set()
for name in sys.argv[7:]:
    with open(name, "rb") as file:
        wanted.add(file.read())
reads, seen, bad = 0, set(), []
open(ready, "w").close()
while not os.path.exists(stop):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        info = os.fstat(descriptor)
        data = os.read(descriptor, 1 << 20)
    finally:
        os.close(descriptor)
    reads += 1
    found = (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode))
    if data not in wanted or found != (uid, gid, mode):
        bad.append([len(data), found])
    else:
        seen.add(data)
print(json.dumps({"reads": reads, "distinct": len(seen), "bad": bad[:10], "bad_count": len(bad)}))
"""


def test_a_concurrent_reader_sees_only_whole_files_with_the_wanted_owner_and_mode(lineage, out, root, versions):
    uid, gid = nobody_ids()
    path = os.path.join(out, "x.pem")
    expected = []
    for number, version in enumerate(versions):
        expected.append(os.path.join(root, f"expected{number}"))
        with open(expected[-1], "wb") as file:
            file.write(version["fullchain"] + version["privkey"])
    settings = dict(owner=NOBODY, group=NOGROUP, mode=0o640)
    assert deliver(lineage, path, **settings).ok
    stop, ready = os.path.join(root, "stop"), os.path.join(root, "ready")
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, path, stop, ready, str(uid), str(gid), str(0o640), *expected],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        def started():
            assert reader.poll() is None, "the reader died"
            return os.path.exists(ready)

        wait.until(started, what="the reader to start")
        for number in range(200):
            lineage.use(2 - number % 2)
            result = deliver(lineage, path, **settings)
            assert (result.ok, result.changed) == (True, True), result.detail
    finally:
        open(stop, "w").close()
        output, _ = reader.communicate(timeout=60)
    report = json.loads(output)
    assert report["bad_count"] == 0, report
    assert report["reads"] > 200 and report["distinct"] == 2, report
    assert leftovers(out) == []


# --- destination traps -------------------------------------------------------------------------


def test_a_destination_that_is_a_symlink_is_refused_and_its_target_untouched(lineage, out, root):
    target = os.path.join(root, "passwd")
    with open(target, "w", encoding="utf-8") as file:
        file.write("root:x:0:0:root:/root:/bin/bash\n")
    path = os.path.join(out, "x.pem")
    os.symlink(target, path)

    result = deliver(lineage, path)

    assert not result.ok and f"{path} is a symbolic link" in result.detail and "rm " in result.detail
    assert read(target) == b"root:x:0:0:root:/root:/bin/bash\n"
    assert os.path.islink(path) and leftovers(out) == []


def test_a_destination_that_is_a_directory_is_refused(lineage, out):
    path = os.path.join(out, "x.pem")
    os.mkdir(path)

    result = deliver(lineage, path)

    assert not result.ok and "is a directory, not a regular file" in result.detail
    assert os.listdir(path) == []


def test_a_group_writable_destination_directory_is_refused(lineage, out):
    os.chmod(out, 0o775)

    result = deliver(lineage, os.path.join(out, "x.pem"))

    assert not result.ok and f"chmod go-w {out}" in result.detail
    assert os.listdir(out) == []


def test_a_destination_directory_owned_by_another_user_is_refused(lineage, out):
    uid, _ = nobody_ids()
    os.chown(out, uid, 0)

    result = deliver(lineage, os.path.join(out, "x.pem"))

    assert not result.ok and f"owned by uid {uid}, not root" in result.detail and f"chown root {out}" in result.detail


def test_a_sticky_world_writable_directory_above_is_refused_and_named(lineage, root):
    shared = os.path.join(root, "shared")
    os.mkdir(shared)
    os.chmod(shared, 0o1777)
    os.mkdir(os.path.join(shared, "app"), 0o755)

    result = deliver(lineage, os.path.join(shared, "app", "x.pem"))

    assert not result.ok and "sticky like /tmp" in result.detail and shared in result.detail


def test_a_symlinked_destination_directory_is_refused(lineage, out, root):
    os.symlink(out, os.path.join(root, "alias"))

    result = deliver(lineage, os.path.join(root, "alias", "x.pem"))

    assert not result.ok and "is a symbolic link; write dest with the real path" in result.detail


def test_destination_problems_of_a_fine_path_are_none(out):
    entry = install.Install(line=1, dest="", content=("cert",))

    assert install.destination_problems(entry, os.path.join(out, "x.pem")) == []
    assert install.destination_problems(entry, "relative/x.pem") != []


def test_a_destination_in_the_config_dir_is_refused(lineage):
    result = deliver(lineage, os.path.join(lineage.config_dir, "x.pem"))

    assert not result.ok and "inside the certbot config dir" in result.detail


def test_a_missing_directory_is_refused_unless_create_dirs(lineage, out):
    path = os.path.join(out, "new", "deeper", "x.pem")

    refused = deliver(lineage, path)
    created = deliver(lineage, path, create_dirs=True)

    assert not refused.ok and "does not exist" in refused.detail and "create-dirs = true" in refused.detail
    assert created.ok, created.detail
    for directory in (os.path.join(out, "new"), os.path.join(out, "new", "deeper")):
        assert attributes(directory) == (0, 0, 0o755)


# --- broken lineages ----------------------------------------------------------------------


def test_a_key_that_does_not_match_leaves_the_old_file(lineage, out, versions):
    path = os.path.join(out, "x.pem")
    assert deliver(lineage, path).ok
    lineage.use(2, "privkey")

    result = deliver(lineage, path)

    assert not result.ok
    assert result.detail == (
        f"live/{NAME}/privkey.pem does not match fullchain.pem: the lineage is broken;"
        f" run certbot renew --force-renewal --cert-name {NAME}"
    )
    assert read(path) == versions[0]["fullchain"] + versions[0]["privkey"]
    assert leftovers(out) == []


def test_a_key_alone_is_checked_against_cert_pem(lineage, out):
    lineage.use(2, "cert")

    result = deliver(lineage, os.path.join(out, "server.key"), content=("privkey",))

    assert not result.ok and "privkey.pem does not match cert.pem" in result.detail


@pytest.mark.parametrize("part, content, message", [
    ("privkey", b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n", "not an unencrypted PEM private key"),
    ("cert", b"hello\n", "is not a list of PEM certificates"),
    ("chain", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "cannot be parsed"),
])
def test_a_part_that_is_not_what_it_claims_is_refused(lineage, out, versions, part, content, message):
    lineage.write_version(3, {**versions[0], part: content})
    lineage.use(3, part)

    result = deliver(lineage, os.path.join(out, "x.pem"), content=("cert", "chain", "privkey"))

    assert not result.ok and message in result.detail and "--force-renewal" in result.detail
    assert os.listdir(out) == []


@pytest.mark.parametrize("target", ["/etc/passwd", "../../../outside.pem"])
def test_a_source_link_leading_out_of_the_config_dir_is_refused(lineage, out, root, versions, target):
    with open(os.path.join(root, "outside.pem"), "wb") as file:
        file.write(versions[0]["privkey"])
    lineage.link("privkey", target)

    result = deliver(lineage, os.path.join(out, "x.pem"))

    assert not result.ok and "cannot read the lineage's privkey.pem" in result.detail
    assert f"live/{NAME}/privkey.pem" in result.detail and "out of" in result.detail
    assert os.listdir(out) == []


# --- crashes and failures ----------------------------------------------------------------------


def test_a_temp_file_left_by_a_crash_does_not_break_the_next_delivery(lineage, out, monkeypatch):
    names = iter(["0" * 16, "1" * 16])
    monkeypatch.setattr(delivery.secrets, "token_hex", lambda size: next(names))
    taken = os.path.join(out, f".x.pem.certrelay-{os.getpid()}-{'0' * 16}")
    stale = os.path.join(out, ".x.pem.certrelay-99999999-abcdef")  # no process has this pid
    for leftover in (taken, stale):
        with open(leftover, "wb") as file:
            file.write(b"partial")

    result = deliver(lineage, os.path.join(out, "x.pem"))

    assert result.ok, result.detail
    assert read(taken) == b"partial"  # our own pid: maybe still being written, so kept
    assert not os.path.exists(stale)


def test_a_failure_while_writing_removes_the_temp_file_and_keeps_the_old_file(lineage, out, versions, monkeypatch):
    path = os.path.join(out, "x.pem")
    assert deliver(lineage, path).ok
    lineage.use(2)

    def failing_fsync(descriptor):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(delivery.os, "fsync", failing_fsync)
    result = deliver(lineage, path)

    assert not result.ok and "Input/output error" in result.detail and "old file is unchanged" in result.detail
    assert read(path) == versions[0]["fullchain"] + versions[0]["privkey"]
    assert leftovers(out) == []
