"""Pins for certrelay.deliver that mutation testing (make mutants, docs/mutants.md)
found missing: whole messages, the second line of defence after destination_problems
(a destination or directory swapped for a link or a FIFO between the check and the
write), the bits a kept mode loses, PKCS#12's encryption, and a temp name that fits.
On the real file system, as root."""

import errno
import os
import shutil
import signal
import stat
import subprocess
import threading
import warnings

import pytest

from certrelay import deliver, install
from tests import certs

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="delivers files with owners: needs root")

NAME = "example.org"
BROKEN = f": the lineage is broken; run certbot renew --force-renewal --cert-name {NAME}"


@pytest.fixture(scope="module")
def authority():
    return certs.Authority("certrelay pins CA")


@pytest.fixture
def lineage(root, authority):
    """(config dir, parts) of lineage NAME below `root`, its leaf issued by `authority`."""
    config_dir = os.path.join(root, "letsencrypt")
    return config_dir, certs.renew_with_chain(config_dir, NAME, authority)


@pytest.fixture
def out(root):
    directory = os.path.join(root, "out")
    os.mkdir(directory, 0o755)
    return directory


def deliver_to(lineage, dest, content=("fullchain", "privkey"), **settings):
    config_dir, _ = lineage
    spec = install.Install(line=1, dest=dest, content=tuple(content), **settings)
    return deliver.deliver(spec, config_dir, NAME, {"name": NAME, "lineage": f"{config_dir}/live/{NAME}",
                                                    "domains": NAME})


def opened(directory):
    return os.open(directory, os.O_RDONLY | os.O_DIRECTORY)


# --- deliver: its results ---------------------------------------------------------------


def test_a_refusal_is_not_ok_and_says_why(lineage):
    config_dir, _ = lineage
    path = os.path.join(config_dir, "inside.pem")

    assert deliver_to(lineage, path) == deliver.Delivered(
        False, f"{path} is inside the certbot config dir {config_dir}; fix dest")


def test_an_os_error_while_delivering_is_reported_not_raised(lineage, out, monkeypatch):
    def failing(directory_descriptor, base):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(deliver, "remove_stale_temp_files", failing)
    path = os.path.join(out, "x.pem")

    assert deliver_to(lineage, path) == deliver.Delivered(False, f"cannot deliver {path}: [Errno 5] Input/output error")


def test_the_second_delivery_is_up_to_date(lineage, out):
    path = os.path.join(out, "x.pem")

    assert deliver_to(lineage, path) == deliver.Delivered(True, f"wrote {path} (0:0 0600)", changed=True)
    assert deliver_to(lineage, path) == deliver.Delivered(True, f"{path} is up to date", changed=False)


def test_every_problem_of_the_destination_is_named_at_once(lineage, out):
    os.chown(out, 1, 0)
    os.chmod(out, 0o775)
    path = os.path.join(out, "x.pem")

    assert deliver_to(lineage, path) == deliver.Delivered(False, (
        f"the directory {out} is owned by uid 1, not root, so that user could redirect what root writes; fix:"
        f" chown root {out}, or deliver elsewhere; the directory {out} is writable by group or others (mode 0775),"
        f" so they could redirect what root writes; fix: chmod go-w {out}"))


# --- the parts of a lineage ---------------------------------------------------------------


@pytest.mark.parametrize(("sources", "message"), [
    ({"cert": b"not a certificate\n"}, f"live/{NAME}/cert.pem is not a list of PEM certificates{BROKEN}"),
    ({"privkey": b"not a key\n"}, f"live/{NAME}/privkey.pem is not an unencrypted PEM private key{BROKEN}"),
    ({"chain": b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"},
     f"live/{NAME}/chain.pem holds a certificate that cannot be parsed (no start line: cadata does not contain a"
     " certificate (_ssl.c:"),
])
def test_a_broken_part_is_named_with_the_fix(sources, message):
    with pytest.raises(deliver.DeliveryError) as raised:
        deliver.check_sources(sources, NAME)

    assert str(raised.value).startswith(message.partition("(_ssl.c:")[0])
    assert str(raised.value).endswith(BROKEN)


def test_a_key_that_pem_cannot_load_is_told_from_one_that_does_not_match(lineage, authority):
    _, parts = lineage
    other = certs.renew_with_chain(os.path.join(os.path.dirname(lineage[0]), "other"), NAME, authority)
    junk = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"

    with pytest.raises(deliver.DeliveryError) as mismatch:
        deliver.check_sources({"fullchain": parts["fullchain"], "privkey": other["privkey"]}, NAME)
    with pytest.raises(deliver.DeliveryError) as unloadable:
        deliver.check_sources({"cert": parts["cert"], "privkey": junk}, NAME)

    assert str(mismatch.value) == f"live/{NAME}/privkey.pem does not match fullchain.pem{BROKEN}"
    assert str(unloadable.value).startswith(f"live/{NAME}/privkey.pem cannot be loaded ([SSL")
    assert str(unloadable.value).endswith(f") with cert.pem{BROKEN}")


def test_the_checks_use_no_deprecated_ssl_default(lineage):
    _, parts = lineage
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deliver.check_sources({"cert": parts["cert"], "chain": parts["chain"], "privkey": parts["privkey"]}, NAME)


# --- PKCS#12 -----------------------------------------------------------------------------


def password_file(root, data):
    path = os.path.join(root, "keystore.pass")
    with open(path, "wb") as file:
        file.write(data)
    os.chmod(path, 0o600)
    return path


@pytest.mark.parametrize(("data", "password"), [
    (b"x" * deliver.MAX_PASSWORD, b"x" * deliver.MAX_PASSWORD),
    (b"secret\r\n", b"secret"),
    (b"secret\n", b"secret"),
    (b"secret", b"secret"),
    (b"\rsecret\r\n", b"\rsecret"),
])
def test_a_password_is_the_file_without_its_line_end(root, data, password):
    assert deliver.read_password(password_file(root, data)) == password


@pytest.mark.parametrize(("data", "message"), [
    (b"x" * (deliver.MAX_PASSWORD + 1), "has more than 4096 bytes; is it the right file?"),
    (b"\n", "is empty; write the keystore password into it"),
])
def test_a_password_file_that_cannot_be_right_is_refused(root, data, message):
    path = password_file(root, data)

    with pytest.raises(deliver.DeliveryError) as raised:
        deliver.read_password(path)

    assert str(raised.value) == f"the password file {path} {message}"


def test_a_password_file_of_a_terabyte_is_refused_without_reading_it(root):
    path = password_file(root, b"")
    os.truncate(path, 2 ** 40)  # sparse: no disk space, but no memory holds it either

    with pytest.raises(deliver.DeliveryError) as raised:
        deliver.read_password(path)

    assert str(raised.value) == f"the password file {path} has more than 4096 bytes; is it the right file?"


@pytest.mark.skipif(not shutil.which("openssl"), reason="needs openssl")
def test_a_keystore_uses_pbes2_aes_256_and_a_sha_256_mac(lineage):
    _, parts = lineage
    keystore = deliver.build_pkcs12(parts, NAME, b"secret")

    shown = subprocess.run(["openssl", "pkcs12", "-info", "-noout", "-passin", "pass:secret"], input=keystore,
                           capture_output=True, check=True).stderr.decode()

    assert "MAC: sha256," in shown
    assert shown.count("PBES2, PBKDF2, AES-256-CBC, Iteration 50000, PRF hmacWithSHA256") == 2, shown


def reissue(authority, key_pem):
    """Return a new leaf certificate (PEM) for NAME with the key `key_pem`, signed by
    `authority`: a renewal that kept its key (certbot --reuse-key)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    key = serialization.load_pem_private_key(key_pem, password=None)
    now = datetime.datetime.now(datetime.timezone.utc)
    leaf = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NAME)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, authority.name)]))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=90))
        .sign(authority.key, hashes.SHA256())
    )
    return leaf.public_bytes(serialization.Encoding.PEM)


def test_keystores_are_the_same_only_with_the_same_key_and_certificates(lineage, authority):
    _, parts = lineage
    leaf = reissue(authority, parts["privkey"])
    other_leaf, other_key = authority.issue([NAME])
    keystore = deliver.build_pkcs12(parts, NAME, b"secret")

    assert deliver.same_pkcs12(keystore, deliver.build_pkcs12(parts, NAME, b"secret"), b"secret")
    assert not deliver.same_pkcs12(keystore, deliver.build_pkcs12({**parts, "cert": leaf}, NAME, b"secret"), b"secret")
    assert not deliver.same_pkcs12(
        keystore, deliver.build_pkcs12({**parts, "cert": other_leaf, "privkey": other_key}, NAME, b"secret"), b"secret")
    assert not deliver.same_pkcs12(b"not a keystore", keystore, b"secret")
    assert not deliver.same_pkcs12(keystore, keystore, b"another password")


# --- directories ------------------------------------------------------------------------


def test_a_directory_that_cannot_be_made_is_named(root):
    below = os.path.join(root, "file")
    open(below, "w").close()

    with pytest.raises(deliver.DeliveryError) as raised:
        deliver.make_directories(os.path.join(below, "sub", "dir"))

    assert str(raised.value) == f"cannot create the directory {below}/sub: Not a directory"


@pytest.mark.parametrize("kind", ["symlink", "file"])
def test_open_directory_never_follows_a_link_nor_opens_a_file(out, kind):
    path = os.path.join(os.path.dirname(out), "swapped")
    if kind == "symlink":
        os.symlink(out, path)
    else:
        open(path, "w").close()

    with pytest.raises(deliver.DeliveryError) as raised:
        deliver.open_directory(path)

    assert str(raised.value) == f"cannot open the directory {path}: Not a directory"


def test_open_directory_refuses_a_directory_that_became_unsafe(out):
    os.chmod(out, 0o777)

    with pytest.raises(deliver.DeliveryError) as raised:
        deliver.open_directory(out)

    assert str(raised.value) == (f"the directory {out} is writable by group or others (mode 0777), so they could"
                                 f" redirect what root writes; fix: chmod go-w {out}")
    os.chmod(out, 0o755)
    os.close(deliver.open_directory(out))


def test_open_directory_names_every_problem_of_a_directory_that_became_unsafe(out):
    os.chown(out, 65534, 0)
    os.chmod(out, 0o775)

    with pytest.raises(deliver.DeliveryError) as raised:
        deliver.open_directory(out)

    assert str(raised.value) == (
        f"the directory {out} is owned by uid 65534, not root, so that user could redirect what root writes;"
        f" fix: chown root {out}, or deliver elsewhere; the directory {out} is writable by group or others"
        f" (mode 0775), so they could redirect what root writes; fix: chmod go-w {out}")


# --- the destination file -----------------------------------------------------------------


@pytest.mark.parametrize(("kind", "word"), [("symlink", "symbolic link"), ("fifo", "FIFO"), ("directory", "directory")])
def test_existing_file_refuses_anything_but_a_regular_file(out, kind, word):
    path = os.path.join(out, "x.pem")
    target = os.path.join(out, "target.pem")
    open(target, "w").close()
    {"symlink": lambda: os.symlink(target, path), "fifo": lambda: os.mkfifo(path),
     "directory": lambda: os.mkdir(path)}[kind]()
    descriptor = opened(out)
    try:
        with pytest.raises(deliver.DeliveryError) as raised:
            deliver.existing_file(descriptor, "x.pem", path)
        assert deliver.existing_file(descriptor, "absent.pem", os.path.join(out, "absent.pem")) is None
        assert deliver.existing_file(descriptor, "target.pem", target).st_ino == os.lstat(target).st_ino
    finally:
        os.close(descriptor)

    assert str(raised.value) == f"{path} is a {word}, not a regular file; remove it or fix dest"


def test_a_destination_swapped_for_a_fifo_after_the_check_is_named_when_refused(out, monkeypatch):
    path = os.path.join(out, "x.pem")
    os.mkfifo(path)
    monkeypatch.setattr(install, "destination_problems", lambda spec, path: [])  # checked before the swap

    with pytest.raises(deliver.DeliveryError) as raised:
        deliver.write(install.Install(line=1, dest=path, content=("cert",)), path, b"data")

    assert str(raised.value) == f"{path} is a FIFO, not a regular file; remove it or fix dest"


def test_unchanged_never_reads_through_a_link(out):
    target = os.path.join(out, "target.pem")
    with open(target, "wb") as file:
        file.write(b"data")
    os.symlink(target, os.path.join(out, "x.pem"))
    spec = install.Install(line=1, dest=os.path.join(out, "x.pem"), content=("cert",))
    descriptor = opened(out)
    try:
        assert deliver.unchanged(spec, descriptor, "target.pem", b"data")
        assert not deliver.unchanged(spec, descriptor, "x.pem", b"data")
    finally:
        os.close(descriptor)


def test_unchanged_never_waits_on_a_fifo(out):
    os.mkfifo(os.path.join(out, "x.pem"))
    spec = install.Install(line=1, dest=os.path.join(out, "x.pem"), content=("cert",))
    descriptor = opened(out)
    answers = []
    reader = threading.Thread(target=lambda: answers.append(deliver.unchanged(spec, descriptor, "x.pem", b"x")),
                              daemon=True)
    reader.start()
    reader.join(timeout=5)
    try:
        assert answers == [False], "unchanged() blocked opening a FIFO"
    finally:
        if not reader.is_alive():
            os.close(descriptor)
        else:  # release the opener, then let the thread end
            os.close(os.open(os.path.join(out, "x.pem"), os.O_WRONLY | os.O_NONBLOCK))


# --- owners and modes -----------------------------------------------------------------------


def a_stat(mode, uid=0, gid=0):
    return os.stat_result((stat.S_IFREG | mode, 0, 0, 1, uid, gid, 0, 0, 0, 0))


@pytest.mark.parametrize(("key", "word"), [("owner", "user"), ("group", "group")])
def test_an_owner_or_group_gone_since_the_rules_loaded_is_named(key, word):
    spec = install.Install(line=1, dest="/srv/x.pem", content=("cert",), **{key: "no-such-account-certrelay"})

    with pytest.raises(deliver.DeliveryError) as raised:
        deliver.wanted_attributes(spec, None)

    assert str(raised.value) == f"unknown {word} 'no-such-account-certrelay'; create it or fix {key!r} in the rule"


def test_owner_and_group_of_the_rule_win_over_the_existing_files():
    spec = install.Install(line=1, dest="/srv/x.pem", content=("cert",), owner="root", group="root", mode=0o644)

    assert deliver.wanted_attributes(spec, a_stat(0o600, uid=65534, gid=65534)) == (0, 0, 0o644, "")


def test_without_settings_a_new_file_is_root_0600_for_a_key_else_0644():
    cert = install.Install(line=1, dest="/srv/x.pem", content=("cert",))
    key = install.Install(line=1, dest="/srv/x.pem", content=("privkey",))

    assert deliver.wanted_attributes(cert, None) == (0, 0, 0o644, "")
    assert deliver.wanted_attributes(key, None) == (0, 0, 0o600, "")
    assert deliver.wanted_attributes(cert, a_stat(0o640, uid=7, gid=8)) == (7, 8, 0o640, "")


@pytest.mark.parametrize(("content", "kept", "mode"), [
    (("cert",), 0o7777, 0o755), (("privkey",), 0o7777, 0o750), (("cert",), 0o4000 | 0o644, 0o644),
    (("cert",), 0o2000 | 0o644, 0o644), (("cert",), 0o1000 | 0o644, 0o644), (("cert",), 0o662, 0o640),
])
def test_a_kept_mode_loses_write_for_others_and_the_special_bits(content, kept, mode):
    spec = install.Install(line=1, dest="/srv/x.pem", content=content)

    assert deliver.wanted_attributes(spec, a_stat(kept)) == (
        0, 0, mode, f"; mode {kept:04o} tightened to {mode:04o}: set mode in the rule to choose")


# --- temp files ---------------------------------------------------------------------------


def test_the_temp_file_is_named_after_its_destination(lineage, out, monkeypatch):
    seen, write_all = [], deliver.write_all

    def watching(descriptor, data):
        seen.extend(name for name in os.listdir(out) if name.startswith("."))
        return write_all(descriptor, data)

    monkeypatch.setattr(deliver, "write_all", watching)
    assert deliver_to(lineage, os.path.join(out, "x.pem")).ok

    assert seen and all(deliver.TEMP_NAME.fullmatch(name).group("dest") == "x.pem" for name in seen), seen


def test_a_temp_name_fits_a_file_name_as_long_as_it_can_be(out):
    # ".BASE.certrelay-PID-" and 16 hex digits: 255 bytes at most
    base = "b" * (255 - len(f"..certrelay-{os.getpid()}-") - 16)
    descriptor = opened(out)
    try:
        name, temp = deliver.create_temp_file(descriptor, base)
        os.close(temp)
        assert len(name) == 255 and deliver.TEMP_NAME.fullmatch(name).group("dest") == base
        with pytest.raises(deliver.DeliveryError) as raised:
            deliver.create_temp_file(descriptor, base + "b")
    finally:
        os.close(descriptor)

    assert str(raised.value) == f"cannot create a temp file next to {base}b: File name too long"


def test_a_temp_file_is_made_readable_by_root_alone(out):
    previous = os.umask(0)  # whatever the umask: the key goes in before the mode is set
    descriptor = opened(out)
    try:
        name, temp = deliver.create_temp_file(descriptor, "x.pem")
        os.close(temp)
        mode = stat.S_IMODE(os.stat(name, dir_fd=descriptor).st_mode)
    finally:
        os.close(descriptor)
        os.umask(previous)

    assert mode == 0o600


def test_a_temp_file_is_never_one_that_exists(out, monkeypatch):
    monkeypatch.setattr(deliver.secrets, "token_hex", lambda size: "0" * 2 * size)
    taken = f".x.pem.certrelay-{os.getpid()}-{'0' * 16}"
    open(os.path.join(out, taken), "w").close()
    descriptor = opened(out)
    try:
        with pytest.raises(deliver.DeliveryError) as raised:
            deliver.create_temp_file(descriptor, "x.pem")
    finally:
        os.close(descriptor)

    assert str(raised.value) == "cannot create a temp file next to x.pem: 8 names were taken"


def test_a_link_named_like_a_stale_temp_file_is_left_alone(out):
    dead = subprocess.Popen(["true"])
    dead.wait()
    target = os.path.join(out, "target")
    open(target, "w").close()
    link, stale = (os.path.join(out, f".x.pem.certrelay-{dead.pid}-{suffix}") for suffix in ("aa", "bb"))
    os.symlink(target, link)
    open(stale, "w").close()
    descriptor = opened(out)
    try:
        deliver.remove_stale_temp_files(descriptor, "x.pem")
    finally:
        os.close(descriptor)

    assert os.path.islink(link) and not os.path.lexists(stale)


def test_asking_whether_a_process_exists_does_not_signal_it():
    # SIGHUP at its default: under nohup the child would ignore it, and signal 1 pass unseen
    child = subprocess.Popen(["sleep", "30"], preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    try:
        assert deliver.process_exists(child.pid)
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(timeout=0.3)
    finally:
        child.kill()
        child.wait()
    assert not deliver.process_exists(child.pid)


def test_a_process_of_another_user_exists():
    """As a user who may not signal pid 1, kill(2) fails with EPERM: it exists."""
    reading, writing = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(reading)
            os.setuid(65534)
            os.write(writing, b"yes" if deliver.process_exists(1) else b"no")
        finally:
            os._exit(0)
    os.close(writing)
    with os.fdopen(reading, "rb") as answer:
        said = answer.read()
    os.waitpid(pid, 0)

    assert said == b"yes"
    assert deliver.process_exists(os.getpid())
