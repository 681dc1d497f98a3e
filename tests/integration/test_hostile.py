"""Hostile input, as a compromised certbot container could plant it, against the real
`certrelay run` and `certrelay watch`.

Extends test_run.py's test_hostile_queue_entries_are_quarantined_and_valid_ones_still_processed
(one batch of 13 entries, counted) with: each kind alone, and what became of it (kept in
quarantine/, never followed, never opened, never executed); entries planted in claimed/
and quarantine/; spool directories replaced by symlinks; names too long to claim; live
certificates reached through links or special files; content fuzz; the daemon under all
of it. `TRIED` counts the kinds for the README.
"""

import collections
import dataclasses
import hashlib
import json
import os
import pathlib
import re
import signal
import socket
import stat
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from certrelay import spool
from tests import wait
from tests.conftest import Relay

RUN_TIMEOUT = 60  # seconds; a run blocked on a FIFO would hit it
WRITE_UP_ACTIONS = ["reload apache2.service", "restart dovecot.service", "restart exim4.service"]
#: Where a quarantined entry ends up: a safe name, then @ and a unique number.
QUARANTINED_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}@[0-9]+")
TIME = "2026-01-01T00:00:00Z"
MARKER = "pwned"  # what `touch pwned` in a name or a value would create


def notification(name, lineage=None, domains=None, extra=b""):
    """Return the bytes of a notification as the hook writes it (`name` str or bytes)."""
    raw_name = name if isinstance(name, bytes) else name.encode()
    lineage = lineage.encode() if lineage else b"/etc/letsencrypt/live/" + raw_name
    domains = (domains if domains is not None else "example.ch").encode()
    return (
        b"version=1\nname=" + raw_name + b"\nlineage=" + lineage + b"\ndomains=" + domains
        + b"\ntime=" + TIME.encode() + b"\n" + extra
    )


def write_entry(directory, raw_name, data):
    """Write `data` to the entry `raw_name` (bytes) in `directory`; return its path (bytes)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(os.fsencode(directory), raw_name)
    with open(path, "wb") as file:
        file.write(data)
    return path


def digest(path):
    with open(path, "rb") as file:
        return hashlib.sha256(file.read()).hexdigest()


def snapshot(directory):
    """Return {relative path: what it is} for everything under `directory`."""
    found = {}
    for root, directories, files in os.walk(directory):
        for name in directories + files:
            path = os.path.join(root, name)
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                what = ("link", os.readlink(path))
            elif stat.S_ISREG(info.st_mode):
                what = ("file", digest(path), info.st_nlink)
            else:
                what = (stat.S_IFMT(info.st_mode),)
            found[os.path.relpath(path, directory)] = what
    return found


def run(relay, cwd, *arguments):
    """Run `certrelay run` to completion in `cwd`, bounded by RUN_TIMEOUT."""
    cwd.mkdir(exist_ok=True)
    return subprocess.run(
        relay.command("run", *arguments), env=relay.environment(), cwd=cwd, capture_output=True,
        encoding="utf-8", errors="replace", timeout=RUN_TIMEOUT,
    )


def ledger(relay):
    """Return certrelay's ledger: {certificate name: fingerprint last acted on}."""
    try:
        with open(os.path.join(relay.state_dir, "ledger.json"), encoding="utf-8") as file:
            return json.load(file)
    except FileNotFoundError:
        return {}


def assert_no_traceback(output):
    assert "Traceback" not in output, output


# --- The hostile spool entries ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    """One hostile entry. `plant(directory, outside)` creates it in `directory` (queue/ or
    claimed/), using `outside` for anything that lives outside the spool, and returns
    `after(entry)`, which asserts what must hold after the run; `entry` is the path of
    the entry in quarantine/, or None if it is not quarantined. `reason` is a fragment of
    the quarantine message; empty for an entry that is a valid notification and must be
    acted on for `certificate`."""

    id: str
    kind: str
    plant: object
    reason: str = ""
    where: str = "queue"
    certificate: str = None


def symlink(name, target_of):
    """Plant the symlink `name` -> target_of(outside); afterwards it must still point there."""

    def plant(directory, outside):
        target = target_of(outside)
        os.symlink(target, os.path.join(directory, name))
        shadow = digest("/etc/shadow") if os.path.exists("/etc/shadow") else None

        def after(entry):
            assert os.path.islink(entry) and os.readlink(entry) == target
            if shadow:
                assert digest("/etc/shadow") == shadow

        return after

    return plant


def outside_fifo(outside):
    os.mkfifo(outside / "fifo")
    return str(outside / "fifo")


def outside_directory(outside):
    (outside / "directory").mkdir()
    (outside / "directory" / "herzbube.ch").write_bytes(notification("herzbube.ch"))
    return str(outside / "directory")


def outside_notification(outside):
    (outside / "moser-naef.ch").write_bytes(notification("moser-naef.ch"))
    return str(outside / "moser-naef.ch")


def special(name, make, is_kind):
    """Plant a special file with make(path); afterwards it must be the same kind."""

    def plant(directory, outside):
        make(os.path.join(directory, name))

        def after(entry):
            assert is_kind(os.lstat(entry).st_mode)

        return after

    return plant


def make_socket(path):
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)


def make_directory(files):
    def make(path):
        os.mkdir(path)
        for name, data in files.items():
            with open(os.path.join(path, name), "wb") as file:
                file.write(data)

    return make


def make_device(path):
    if os.geteuid() != 0:
        pytest.skip("creating a device node needs root")
    os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # what /dev/zero is


def content(raw_name, data):
    """Plant a regular file; if quarantined, it must still hold the same bytes."""

    def plant(directory, outside):
        write_entry(directory, raw_name, data)

        def after(entry):
            if entry is not None:
                with open(entry, "rb") as file:
                    assert file.read() == data

        return after

    return plant


def sparse(name, size):
    def plant(directory, outside):
        path = os.path.join(directory, name)
        with open(path, "wb") as file:
            file.write(notification(name))
            file.truncate(size)

        def after(entry):
            assert os.path.getsize(entry) == size

        return after

    return plant


def hard_link(name, data):
    """Hard-link `name` to a file outside the spool; the target must never change."""

    def plant(directory, outside):
        target = outside / "precious"
        target.write_bytes(data)
        os.link(target, os.path.join(directory, name))

        def after(entry):
            assert target.read_bytes() == data
            if entry is None:  # acted on and deleted: only the link went away
                assert target.stat().st_nlink == 1
            else:  # quarantined: the link moved, the target stayed
                assert os.path.samefile(entry, target) and target.stat().st_nlink == 2

        return after

    return plant


def padded_to(name, size):
    """A valid notification padded with an unknown key to exactly `size` bytes."""
    base = notification(name, extra=b"padding=")
    return base + b"x" * (size - len(base) - 1) + b"\n"


BAD_NAME = "the name is not [A-Za-z0-9._-]"
NOT_REGULAR = "not a regular file"
BAD_CLAIMED_NAME = "not a name certrelay gives claimed entries"
directory_empty = (make_directory({}), stat.S_ISDIR)
directory_full = (make_directory({"herzbube.ch": notification("herzbube.ch"), "sub": b""}), stat.S_ISDIR)
SHELL_NAMES = [
    ("dollar-paren", b"$(touch pwned)"), ("dollar-paren-ifs", b"$(touch${IFS}pwned)"),
    ("backticks", b"`touch pwned`"), ("semicolon", b"x;touch pwned"), ("pipe", b"x|touch pwned"),
    ("and-and", b"x&&touch pwned"), ("redirect", b"x>pwned"),
]

CASES = [
    # symbolic links: moved as links, never followed
    Case("symlink-to-etc-shadow", "symlink", symlink("shadow.ch", lambda o: "/etc/shadow"), NOT_REGULAR + " (symbolic link)"),
    Case("symlink-to-fifo", "symlink", symlink("fifo-link.ch", outside_fifo), NOT_REGULAR + " (symbolic link)"),
    Case("symlink-dangling", "symlink", symlink("dangling.ch", lambda o: str(o / "nothing")), NOT_REGULAR),
    Case("symlink-to-directory", "symlink", symlink("dir-link.ch", outside_directory), NOT_REGULAR),
    Case("symlink-to-valid-notification-elsewhere", "symlink", symlink("moser-naef.ch", outside_notification), NOT_REGULAR),
    Case("symlink-to-dev-zero", "symlink", symlink("zero.ch", lambda o: "/dev/zero"), NOT_REGULAR),
    Case("symlink-loop", "symlink", symlink("loop.ch", lambda o: "loop.ch"), NOT_REGULAR),
    # files that are not regular files
    Case("fifo", "special file", special("fifo.ch", os.mkfifo, stat.S_ISFIFO), NOT_REGULAR + " (FIFO)"),
    Case("socket", "special file", special("socket.ch", make_socket, stat.S_ISSOCK), NOT_REGULAR + " (socket)"),
    Case("device-node", "special file", special("device.ch", make_device, stat.S_ISCHR), NOT_REGULAR + " (character device)"),
    Case("directory-empty", "directory", special("empty.ch", *directory_empty), NOT_REGULAR + " (directory)"),
    Case("directory-with-a-notification-inside", "directory", special("herzbube.ch.d", *directory_full), NOT_REGULAR + " (directory)"),
    # sizes and content
    Case("65-KiB", "size", content(b"big.ch", notification("big.ch", extra=b"x=" + b"x" * 65 * 1024 + b"\n")), "larger than 65536 bytes"),
    Case("100-MiB-sparse", "size", sparse("sparse.ch", 100 * 1024 * 1024), "larger than 65536 bytes"),
    Case("one-byte-over-64-KiB", "size", content(b"over.ch", padded_to("over.ch", 65537)), "larger than 65536 bytes"),
    Case("every-byte-value", "content", content(b"binary.ch", bytes(range(256))), "not UTF-8"),
    Case("empty", "content", content(b"empty-file.ch", b""), "missing version"),
    Case("nul-bytes-only", "content", content(b"nul.ch", b"\0" * 100), "not a key=value line"),
    Case("nul-in-name", "content", content(b"nulname.ch", notification(b"nulname.ch\0")), "does not match the file name"),
    Case("nul-in-lineage", "content", content(b"nullineage.ch", notification("nullineage.ch", lineage="/x\0/y")), "lineage has a control character"),
    Case("nul-in-domains", "content", content(b"nuldomain.ch", notification("nuldomain.ch", domains="a.ch\0b.ch")), "bad domain"),
    Case("shell-in-domains", "content", content(b"shelldomain.ch", notification("shelldomain.ch", domains="$(touch pwned)")), "bad domain"),
    Case("utf8-bom", "content", content(b"bom.ch", b"\xef\xbb\xbf" + notification("bom.ch")), "missing version"),
    Case("crlf-line-endings", "content", content(b"crlf.ch", notification("crlf.ch").replace(b"\n", b"\r\n")), "unsupported version"),
    Case("key-given-twice", "content", content(b"twice.ch", notification("twice.ch") + b"name=herzbube.ch\n"), "given twice"),
    Case("version-2", "content", content(b"v2.ch", notification("v2.ch").replace(b"version=1", b"version=2")), "unsupported version"),
    Case("time-not-iso", "content", content(b"time.ch", notification("time.ch").replace(TIME.encode(), b"$(date)")), "not ISO 8601"),
    Case("names-another-certificate", "content", content(b"forged2.ch", notification("herzbube.ch")), "does not match the file name"),
    # names
    Case("name-not-utf8", "name", content(b"caf\xe9.ch", notification(b"caf\xe9.ch")), BAD_NAME),
    Case("name-with-trailing-newline", "name", content(b"herzbube.ch\n", notification(b"herzbube.ch\n")), BAD_NAME),
    Case("name-with-carriage-return", "name", content(b"cr\r.ch", notification(b"cr\r.ch")), BAD_NAME),
    Case("name-with-space", "name", content(b"herzbube.ch ", notification(b"herzbube.ch ")), BAD_NAME),
    Case("name-with-at-like-a-claimed-entry", "name", content(b"herzbube.ch@1", notification("herzbube.ch")), BAD_NAME),
    Case("name-a-glob", "name", content(b"*", notification(b"*")), BAD_NAME),
    Case("name-255-bytes-of-utf8", "name", content("é".encode() * 127 + b"x", b"x"), BAD_NAME),
    Case("name-starting-with-dash", "name", content(b"-rf", notification(b"-rf")), BAD_NAME),
    Case("name-double-dash-option", "name", content(b"--help", notification(b"--help")), BAD_NAME),
    Case("name-single-dash", "name", content(b"-", notification(b"-")), BAD_NAME),
    Case("name-hidden-with-valid-content", "name", content(b".herzbube.ch", notification(b".herzbube.ch")), BAD_NAME),
    Case("name-three-dots", "name", content(b"...", notification(b"...")), BAD_NAME),
    *[Case(f"name-shell-{label}", "shell metacharacters in a name", content(raw, notification(raw)), BAD_NAME)
      for label, raw in SHELL_NAMES],
    # hard links to a file outside the spool
    Case("hard-link-outside-invalid-content", "hard link", hard_link("linked.ch", b"host secret\n"), "not a key=value line"),
    # planted straight into claimed/
    Case("without-id", "planted in claimed/", content(b"junk", notification("junk")), BAD_CLAIMED_NAME, "claimed"),
    Case("id-too-long", "planted in claimed/", content(b"long.ch@" + b"9" * 31, notification("long.ch")), BAD_CLAIMED_NAME, "claimed"),
    Case("name-starting-with-dash", "planted in claimed/", content(b"-rf@1", notification("-rf")), BAD_CLAIMED_NAME, "claimed"),
    Case("name-not-utf8", "planted in claimed/", content(b"\xff@1", b"x"), BAD_CLAIMED_NAME, "claimed"),
    Case("symlink-to-etc-shadow", "planted in claimed/", symlink("shadow.ch@1", lambda o: "/etc/shadow"), NOT_REGULAR, "claimed"),
    Case("fifo", "planted in claimed/", special("fifo.ch@1", os.mkfifo, stat.S_ISFIFO), NOT_REGULAR + " (FIFO)", "claimed"),
    Case("directory", "planted in claimed/", special("dir.ch@1", *directory_full), NOT_REGULAR + " (directory)", "claimed"),
    Case("binary", "planted in claimed/", content(b"binary.ch@1", bytes(range(256))), "not UTF-8", "claimed"),
    # valid notifications in odd places: acted on, nothing outside touched
    Case("hard-link-outside-valid-content", "hard link", hard_link("moser-naef.ch", notification("moser-naef.ch")), certificate="moser-naef.ch"),
    Case("exactly-64-KiB", "size", content(b"moser-naef.ch", padded_to("moser-naef.ch", 65536)), certificate="moser-naef.ch"),
    Case("valid-notification", "planted in claimed/", content(b"moser-naef.ch@1", notification("moser-naef.ch")), where="claimed", certificate="moser-naef.ch"),
]
QUARANTINED_CASES = [case for case in CASES if case.reason]

#: Counts per kind of hostile input that this module tries, for the README.
TRIED = collections.Counter(case.kind for case in CASES)


@pytest.mark.parametrize("case", [pytest.param(case, id=f"{case.where}-{case.id}") for case in CASES])
def test_hostile_entry_alone_is_quarantined_intact_and_the_valid_one_beside_it_processed(relay, tmp_path, case):
    relay.publish("herzbube.ch")
    if case.certificate:
        relay.renew(case.certificate)
    outside = tmp_path / "outside"
    outside.mkdir()
    directory = pathlib.Path(relay.spool, case.where)
    directory.mkdir(exist_ok=True)
    after = case.plant(directory, outside)
    cwd = tmp_path / "cwd"

    result = run(relay, cwd)

    assert_no_traceback(result.stderr)
    assert relay.entries("queue") == [] and relay.entries("claimed") == []
    assert sorted(relay.calls()) == WRITE_UP_ACTIONS
    assert not (cwd / MARKER).exists() and not (outside / MARKER).exists()
    quarantined = relay.entries("quarantine")
    if case.reason:
        assert result.returncode == 1
        assert sorted(ledger(relay)) == ["herzbube.ch"]
        assert len(quarantined) == 1 and QUARANTINED_NAME.fullmatch(quarantined[0]), quarantined
        problems = [line for line in result.stderr.splitlines() if "quarantined spool entry" in line]
        assert len(problems) == 1 and problems[0].startswith("error: ") and case.reason in problems[0], result.stderr
        after(os.path.join(relay.spool, "quarantine", quarantined[0]))
    else:
        assert result.returncode == 0, result.stderr
        assert sorted(ledger(relay)) == sorted(["herzbube.ch", case.certificate])
        assert quarantined == []
        after(None)


@pytest.mark.parametrize("length", [235, 236, 255])
def test_a_long_certificate_name_never_jams_the_queue(relay, tmp_path, length):
    # The hook accepts names of up to 255 characters; claimed/ adds "@" and a 19-digit id.
    name = "a" * length
    relay.renew(name)
    write_entry(os.path.join(relay.spool, "queue"), name.encode(), notification(name))
    relay.publish("herzbube.ch")

    first = run(relay, tmp_path / "cwd")

    assert_no_traceback(first.stderr)
    assert first.returncode in (0, 1), first.stderr
    assert "herzbube.ch" in ledger(relay)
    assert relay.entries("queue") == [] and relay.entries("claimed") == []
    acted, quarantined = name in ledger(relay), len(relay.entries("quarantine")) == 1
    assert acted != quarantined
    assert first.returncode == (0 if acted else 1)
    assert run(relay, tmp_path / "cwd").returncode == 0  # nothing left behind to fail on


TRIED["certificate name too long to claim (235, 236, 255)"] += 3


def test_run_treats_entries_planted_in_quarantine_as_inert(relay, tmp_path):
    quarantine = pathlib.Path(relay.spool, "quarantine")
    quarantine.mkdir(parents=True)
    relay.renew("moser-naef.ch")
    (quarantine / "moser-naef.ch@1").write_bytes(notification("moser-naef.ch"))
    os.mkfifo(quarantine / "fifo@2")
    os.symlink("/etc/shadow", quarantine / "shadow@3")
    (quarantine / "directory@4").mkdir()
    write_entry(quarantine, b"\xff\n$(touch pwned)", b"\0")
    before = snapshot(quarantine)
    relay.publish("herzbube.ch")

    result = run(relay, tmp_path / "cwd")

    assert result.returncode == 0, result.stderr
    assert sorted(relay.calls()) == WRITE_UP_ACTIONS
    # moser-naef.ch is seen for the first time: recorded, not acted on (the calls above)
    assert sorted(ledger(relay)) == ["herzbube.ch", "moser-naef.ch"]
    assert snapshot(quarantine) == before
    assert not (tmp_path / "cwd" / MARKER).exists()


TRIED["planted in quarantine/"] += 5


@pytest.mark.parametrize(
    "lineage",
    [
        pytest.param("/etc/letsencrypt/live/moser-naef.ch", id="another-lineage"),
        pytest.param("/etc/letsencrypt/live/../../../etc", id="a-path-out"),
        pytest.param("$(touch pwned)`touch pwned`;touch pwned|touch pwned", id="shell-metacharacters"),
    ],
)
def test_run_fills_lineage_from_the_host_path_never_from_the_notification(relay, tmp_path, lineage):
    program, record = relay.argv_recorder()
    relay.write_rules(f'[[rule]]\nmatch = ["*"]\nrun = [["{program}", "{{name}}", "{{lineage}}"]]\n')
    relay.renew("herzbube.ch")
    write_entry(os.path.join(relay.spool, "queue"), b"herzbube.ch", notification("herzbube.ch", lineage=lineage))
    cwd = tmp_path / "cwd"

    result = run(relay, cwd)

    assert result.returncode == 0, result.stderr
    assert open(record).read().splitlines() == ["herzbube.ch", os.path.join(relay.config_dir, "live", "herzbube.ch")]
    assert not (cwd / MARKER).exists()


TRIED["valid content naming another lineage"] += 3


# --- Spool directories that are not what they seem ----------------------------------------

@pytest.mark.parametrize(
    "replaced",
    [
        pytest.param("queue", id="queue"),
        pytest.param("claimed", id="claimed"),
        pytest.param("quarantine", id="quarantine"),
        pytest.param(".", id="spool-itself"),
    ],
)
def test_run_quarantines_a_spool_directory_replaced_by_a_symlink_without_following_it(relay, tmp_path, replaced):
    # A container that can write the spool can replace its directories by symlinks to
    # any host directory on the same file system; certrelay must not move files into it
    # or out of it (claimed -> /etc would hand /etc/shadow to the container). The link
    # itself is quarantined and a real directory made in its place, so that the
    # level-triggered path unit does not fire again and again.
    host = tmp_path / "host-directory"
    host.mkdir()
    (host / "shadow").write_text("root:$6$secret:19000::::::\n")
    (host / "sudoers").write_text("root ALL=(ALL) ALL\n")
    before = snapshot(host)
    relay.publish("herzbube.ch")
    for name in ("claimed", "quarantine"):
        os.makedirs(os.path.join(relay.spool, name))
    path = os.path.normpath(os.path.join(relay.spool, replaced))
    os.rename(path, tmp_path / "moved-aside")
    os.symlink(host, path)

    result = run(relay, tmp_path / "cwd")

    assert_no_traceback(result.stderr)
    assert snapshot(host) == before
    assert result.returncode == 1, result.stderr
    assert f"error: quarantined the spool directory {path}: it was a symbolic link to '{host}'" in result.stderr
    for name in ("queue", "claimed", "quarantine"):
        assert not os.path.islink(os.path.join(relay.spool, name)) and os.path.isdir(os.path.join(relay.spool, name))
    kept = [entry for entry in relay.entries("quarantine") if entry.startswith(os.path.basename(path) + "@")]
    assert len(kept) == 1 and os.readlink(os.path.join(relay.spool, "quarantine", kept[0])) == str(host)
    if replaced in ("claimed", "quarantine"):  # the queue was still real: its renewal went through
        assert "done: restart dovecot.service (herzbube.ch)" in result.stderr
    assert relay.entries("queue") == []

    again = run(relay, tmp_path / "cwd")

    assert again.returncode == 0, again.stderr
    assert snapshot(host) == before


def test_run_with_queue_that_is_a_file_quarantines_it_and_makes_a_directory(relay, tmp_path):
    os.makedirs(relay.spool)
    pathlib.Path(relay.spool, "queue").write_bytes(b"not a directory\n")

    result = run(relay, tmp_path / "cwd")

    assert result.returncode == 1, result.stderr
    assert_no_traceback(result.stderr)
    assert f"error: quarantined the spool directory {relay.spool}/queue: it was a regular file" in result.stderr
    assert os.path.isdir(os.path.join(relay.spool, "queue"))
    kept = [entry for entry in relay.entries("quarantine") if entry.startswith("queue@")]
    assert pathlib.Path(relay.spool, "quarantine", kept[0]).read_bytes() == b"not a directory\n"


def test_dry_run_with_a_replaced_spool_directory_says_what_it_would_do_and_changes_nothing(relay, tmp_path):
    host = tmp_path / "host-directory"
    host.mkdir()
    os.makedirs(relay.spool)
    os.symlink(host, os.path.join(relay.spool, "queue"))

    result = run(relay, tmp_path / "cwd", "--dry-run")

    assert result.returncode == 1, result.stderr
    assert f"would quarantine the spool directory {relay.spool}/queue: it is a symbolic link" in result.stderr
    assert os.path.islink(os.path.join(relay.spool, "queue"))


TRIED["spool directory replaced (symlink out, file)"] += 6


# --- FIFOs are never opened --------------------------------------------------------------

class FifoWriter:
    """A process blocked opening a FIFO for writing: it gets through (and creates
    `marker`) only if someone opens the FIFO for reading."""

    def __init__(self, relay, fifo, marker):
        self.marker = marker
        self.process = subprocess.Popen(["sh", "-c", 'exec 3>"$1" && : >"$2"', "sh", str(fifo), str(marker)])
        relay.processes.append(self.process)
        wait.until(lambda: self.wait_channel() in ("wait_for_partner", "fifo_open"),
                   what=f"the writer to block opening {fifo}", explain=lambda: f"it waits in {self.wait_channel()}")

    def wait_channel(self):
        with open(f"/proc/{self.process.pid}/wchan", encoding="ascii") as file:
            return file.read()

    def opened(self):
        """Return True unless the writer is still blocked where it started."""
        return self.process.poll() is not None or self.wait_channel() not in ("wait_for_partner", "fifo_open")


@pytest.mark.parametrize("where", ["queue", "claimed"])
def test_run_never_opens_a_fifo_in_the_spool(relay, tmp_path, where):
    directory = pathlib.Path(relay.spool, where)
    directory.mkdir(parents=True)
    fifo = directory / ("fifo.ch" if where == "queue" else "fifo.ch@1")
    os.mkfifo(fifo)
    writer = FifoWriter(relay, fifo, tmp_path / "opened")

    result = run(relay, tmp_path / "cwd")

    assert result.returncode == 1
    assert not writer.opened()


def test_run_never_opens_a_fifo_planted_as_the_live_certificate(relay, tmp_path):
    # Opening is what matters: a device node planted there (containers have CAP_MKNOD)
    # would be opened the same way, and opening some devices acts (/dev/watchdog arms it).
    live = pathlib.Path(relay.config_dir, "live", "forged.ch")
    live.mkdir(parents=True)
    os.mkfifo(live / "cert.pem")
    writer = FifoWriter(relay, live / "cert.pem", tmp_path / "opened")
    relay.publish("forged.ch", renew=False)

    result = run(relay, tmp_path / "cwd")

    assert result.returncode == 1
    assert "its live certificate cannot be read" in result.stderr
    assert not writer.opened()


TRIED["FIFO with a writer waiting (never opened?)"] += 3


# --- Live certificates (adds to test_run's absolute/relative link out, FIFO, missing, huge) --

def lineage_link_out(config, outside):
    (outside / "forged.ch").mkdir()
    (outside / "forged.ch" / "cert.pem").write_text("a readable certificate outside\n")
    (config / "live").mkdir()
    os.symlink(outside / "forged.ch", config / "live" / "forged.ch")


def lineage_relative_link_out(config, outside):
    lineage_link_out(config, outside)
    os.unlink(config / "live" / "forged.ch")
    os.symlink("../../outside/forged.ch", config / "live" / "forged.ch")


def in_lineage(plant):
    def planted(config, outside):
        live = config / "live" / "forged.ch"
        live.mkdir(parents=True)
        plant(live)

    return planted


def device_certificate(live):
    make_device(live / "cert.pem")


def loop_of_two(live):
    os.symlink("other.pem", live / "cert.pem")
    os.symlink("cert.pem", live / "other.pem")


def long_chain(live):
    # 41 links in a row, all inside: more than even the kernel follows (40)
    (live / "real.pem").write_text("certificate\n")
    os.symlink("real.pem", live / "link0")
    for index in range(1, 40):
        os.symlink(f"link{index - 1}", live / f"link{index}")
    os.symlink("link39", live / "cert.pem")


LIVE_CASES = [
    pytest.param(in_lineage(lambda live: os.symlink("/dev/zero", live / "cert.pem")), id="cert-symlink-to-dev-zero"),
    pytest.param(in_lineage(lambda live: os.symlink("../../../../../../../dev/zero", live / "cert.pem")), id="cert-relative-symlink-to-dev-zero"),
    pytest.param(in_lineage(device_certificate), id="cert-a-device-node"),
    pytest.param(in_lineage(lambda live: os.symlink("cert.pem", live / "cert.pem")), id="cert-symlink-to-itself"),
    pytest.param(in_lineage(loop_of_two), id="cert-symlink-loop-of-two"),
    pytest.param(in_lineage(long_chain), id="cert-chain-of-41-symlinks"),
    pytest.param(in_lineage(lambda live: os.symlink(".", live / "cert.pem")), id="cert-symlink-to-its-directory"),
    pytest.param(in_lineage(lambda live: os.mkdir(live / "cert.pem")), id="cert-a-directory"),
    pytest.param(in_lineage(lambda live: os.symlink("cert.pem/x", live / "cert.pem")), id="cert-symlink-through-itself"),
    pytest.param(lineage_link_out, id="lineage-dir-absolute-symlink-out"),
    pytest.param(lineage_relative_link_out, id="lineage-dir-relative-symlink-out"),
]
TRIED["live certificate (link out, loop, device, directory)"] += len(LIVE_CASES)


@pytest.mark.parametrize("plant", LIVE_CASES)
def test_run_drops_a_notification_whose_live_certificate_is_a_trap(relay, tmp_path, plant):
    outside = tmp_path / "outside"
    outside.mkdir()
    plant(pathlib.Path(relay.config_dir), outside)
    relay.publish("forged.ch", renew=False)
    relay.publish("herzbube.ch")

    result = run(relay, tmp_path / "cwd")

    assert_no_traceback(result.stderr)
    assert result.returncode == 1
    assert "dropped the notification for forged.ch: its live certificate cannot be read" in result.stderr
    assert sorted(relay.calls()) == WRITE_UP_ACTIONS
    assert sorted(ledger(relay)) == ["herzbube.ch"]
    assert relay.entries("claimed") == [] and relay.entries("queue") == []


# --- Content fuzz ---------------------------------------------------------------------

VALID_LINES = notification("herzbube.ch", domains="herzbube.ch *.herzbube.ch").decode().splitlines()
KEYS = st.sampled_from([*spool.REQUIRED_KEYS, "extra", "", "Name", "version ", "=", "name=name"])
VALUES = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["1", "herzbube.ch", "/etc/letsencrypt/live/herzbube.ch", "*.herzbube.ch a.ch", TIME,
                     "2026-01-01", "2026-13-01T00:00:00", "0001-01-01T00:00:00+23:59", "\0", "\r", "a.ch\tb.ch"]),
)
LINES = st.builds(lambda key, value: f"{key}={value}", KEYS, VALUES)


@st.composite
def mutated_notifications(draw):
    """A valid notification with a few lines replaced, dropped or added."""
    lines = list(VALID_LINES)
    for _ in range(draw(st.integers(0, 3))):
        index = draw(st.integers(0, len(lines)))
        action = draw(st.sampled_from(["replace", "drop", "insert"]))
        if action == "insert" or index == len(lines):
            lines.insert(index, draw(LINES))
        elif action == "replace":
            lines[index] = draw(LINES)
        else:
            del lines[index]
    separator = draw(st.sampled_from(["\n", "\n", "\r\n", "\n\n"]))
    return separator.join(lines).encode("utf-8", "surrogatepass") + draw(st.sampled_from([b"", b"\n", b"\0", b"\xff"]))


CONTENTS = st.one_of(st.binary(max_size=300), mutated_notifications(), st.lists(LINES, max_size=8).map(
    lambda lines: "\n".join(lines).encode("utf-8", "surrogatepass")))


def parsed(data, name="herzbube.ch"):
    """Return the Notification spool.parse makes of `data`, or None if it refuses it;
    fail on any other exception or on an accepted notification that breaks a promise."""
    try:
        result = spool.parse(data, name, f"{name}@1")
    except spool.InvalidNotification as error:
        assert str(error)
        return None
    assert isinstance(result, spool.Notification)
    assert (result.name, result.entry) == (name, f"{name}@1")
    assert len(data) <= spool.MAX_SIZE and b"version=1" in data
    assert all(spool.DOMAIN.fullmatch(domain) for domain in result.domains)
    assert "\0" not in result.lineage and "\r" not in result.lineage
    return result


@settings(max_examples=300, deadline=None)
@given(data=CONTENTS)
def test_parse_of_any_bytes_gives_a_notification_or_says_why_not(data):
    parsed(data)


TRIED["fuzzed content (in-process parse)"] += 300


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(mutated_notifications(), st.binary(max_size=200)))
def test_run_on_fuzzed_content_processes_or_quarantines_it_as_parse_predicts(tmp_path_factory, data):
    relay = Relay(tmp_path_factory.mktemp("relay"))
    relay.renew("herzbube.ch")
    relay.publish("moser-naef.ch")
    write_entry(os.path.join(relay.spool, "queue"), b"herzbube.ch", data)
    expected = parsed(data)

    result = run(relay, pathlib.Path(relay.root, "cwd"))

    assert_no_traceback(result.stderr)
    assert "moser-naef.ch" in ledger(relay)
    assert relay.entries("queue") == [] and relay.entries("claimed") == []
    if expected is None:
        assert result.returncode == 1
        assert len(relay.entries("quarantine")) == 1
    else:
        assert result.returncode == 0, result.stderr
        assert "herzbube.ch" in ledger(relay)


TRIED["fuzzed content (real run)"] += 6


# --- The daemon survives all of it ------------------------------------------------------------

FAST = "[settings]\nsettle = 0.2\nmax-wait = 2\nretry-min = 0.3\nretry-max = 1\nmin-interval = 0\n\n"
WRITE_UP_RULES = '[[rule]]\nmatch = ["herzbube.ch"]\nrestart = ["dovecot", "exim4"]\n\n[[rule]]\nmatch = ["*"]\nreload = ["apache2"]\n'


def start_watch(relay, log):
    """Start `certrelay watch` (no NOTIFY_SOCKET) logging to `log`; return it once it watches."""
    with open(log, "wb") as output:
        process = subprocess.Popen(
            relay.command("watch"), env=relay.environment(), stdout=output, stderr=subprocess.STDOUT,
        )
    relay.processes.append(process)
    wait_until(lambda: "watching " in log.read_text(errors="replace"), "the daemon to watch", process, log)
    return process


def wait_until(condition, what, process, log):
    """Wait until `condition()` holds (`what` says what it is); fail at once, with the
    daemon's output, if the daemon exits."""
    def output():
        return log.read_text(errors="replace")[-3000:]

    def holds():
        assert process.poll() is None, f"the daemon exited with {process.returncode}: {output()}"
        return condition()

    wait.until(holds, what=what, explain=lambda: f"daemon output: {output()}")


def plant_every_hostile_kind(relay, staging, outside):
    """Plant every quarantined case in `staging`; return how many entries."""
    for case in QUARANTINED_CASES:
        directory = staging / case.where
        directory.mkdir(exist_ok=True)
        case.plant(directory, outside)
    return len(QUARANTINED_CASES)


def plant_names_too_long_to_claim(relay, staging, outside):
    (staging / "queue").mkdir()
    for length in (236, 255):
        name = "b" * length
        relay.renew(name)
        write_entry(staging / "queue", name.encode(), notification(name))
    return None  # each acted on or quarantined: either is right, so no count


@pytest.mark.parametrize(
    "plant",
    [
        pytest.param(plant_every_hostile_kind, id="every-hostile-entry-kind"),
        pytest.param(plant_names_too_long_to_claim, id="names-too-long-to-claim"),
    ],
)
def test_watch_survives_hostile_entries_and_still_processes_a_valid_one(relay, tmp_path, plant):
    relay.write_rules(FAST + WRITE_UP_RULES)
    log = tmp_path / "watch.log"
    process = start_watch(relay, log)
    outside, staging = tmp_path / "outside", tmp_path / "staging"
    outside.mkdir()
    staging.mkdir()
    count = plant(relay, staging, outside)

    # Each entry lands whole (rename), as if the container dropped them one by one.
    for directory in staging.iterdir():
        target = os.fsencode(os.path.join(relay.spool, directory.name))
        os.makedirs(target, exist_ok=True)
        for raw_name in os.listdir(os.fsencode(directory)):
            os.rename(os.path.join(os.fsencode(directory), raw_name), os.path.join(target, raw_name))
    relay.publish("herzbube.ch")

    def settled():
        return (
            "herzbube.ch" in ledger(relay) and relay.entries("queue") == [] and relay.entries("claimed") == []
            and (count is None or len(relay.entries("quarantine")) == count)
        )

    wait_until(settled, "herzbube.ch acted on and the spool settled", process, log)
    assert set(WRITE_UP_ACTIONS) <= set(relay.calls())
    assert process.poll() is None
    output = log.read_text(errors="replace")
    assert_no_traceback(output)
    if count is not None:
        assert output.count("error: quarantined spool entry") == count
        assert sorted(relay.calls()) == WRITE_UP_ACTIONS
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0


TRIED["daemon: every kind at once, then a valid one"] += 1
