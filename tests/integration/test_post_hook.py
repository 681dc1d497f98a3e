"""The post hook certrelay/certrelay-post-hook, run as a real process by real POSIX shells.

certbot runs it as `/bin/sh -c CONFIG_DIR/renewal-hooks/post/NAME` at the end of a
renewal attempt: BusyBox ash in the official images, dash on Debian. The hook finds
CONFIG_DIR in its own path, so the tests run a copy installed in a config dir, as
certbot would, under each shell installed here. The shells, the time helpers and the
system call tracing come from the deploy hook's tests (test_hook.py). The last test
runs real certbot against Pebble (tests/acme.py).
"""

import datetime
import errno
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import acme
from tests.integration.test_hook import (  # noqa: F401 (shell is a fixture)
    FLUSH_CALLS, PATH, RENAME_CALLS, TIME_FORMAT, TIME_PATTERN, TRACED_CALLS, entries, needs_root, now, shell,
    traced_events,
)

HOOK = Path(__file__).resolve().parents[2] / "certrelay" / "certrelay-post-hook"
HOOK_NAME = "certrelay-post-hook"
KEYS = ["version", "time", "domains", "renewed", "failed"]
#: The most bytes of one list; longer ones are cut to whole words.
MAX_LIST = 16384
#: What a value of the record may hold at all.
SAFE_VALUE = re.compile(r"\A[A-Za-z0-9.*_ -]*\Z")


@pytest.fixture
def config_dir(tmp_path):
    """Return a certbot config dir (not /etc/letsencrypt: as with --config-dir)."""
    return tmp_path / "letsencrypt"


@pytest.fixture
def workdir(tmp_path):
    """Return an empty directory to run the hook in."""
    directory = tmp_path / "cwd"
    directory.mkdir()
    return directory


def install_post_hook(config_dir, name=HOOK_NAME):
    """Copy the hook into config_dir/renewal-hooks/post/ as an executable; return its path."""
    post = Path(config_dir) / "renewal-hooks" / "post"
    post.mkdir(parents=True, exist_ok=True)
    target = post / name
    shutil.copyfile(HOOK, target)
    target.chmod(0o755)
    return target


@pytest.fixture
def hook(config_dir):
    """Return the path of the hook installed in config_dir, as certbot runs it."""
    return install_post_hook(config_dir)


def run_post_hook(shell, hook, workdir, environment, *arguments, **options):
    """Run the hook at `hook` with `shell` in `workdir` with only PATH and `environment`
    set; return the CompletedProcess (text)."""
    return subprocess.run(
        [*shell, str(hook), *arguments], env={"PATH": PATH, **environment}, cwd=workdir,
        capture_output=True, text=True, timeout=30, **options,
    )


def read_attempt(path):
    """Given an attempt record, return its key=value lines as a dict, asserting that it
    holds exactly the five keys, in order, and only safe values."""
    data = path.read_bytes()
    assert data.endswith(b"\n")
    pairs = [line.split("=", 1) for line in data.decode("ascii").split("\n")[:-1]]
    assert [pair[0] for pair in pairs] == KEYS
    attempt = dict(pairs)
    for key in ("renewed", "failed"):
        assert SAFE_VALUE.match(attempt[key]), attempt[key][:200]
        assert len(attempt[key]) <= MAX_LIST
    return attempt


def assert_recorded(spool, domains, renewed, failed, since):
    """Assert that `spool` holds the attempt record, a regular file with these values
    and a time from `since` on, and no temporary file."""
    assert entries(spool / "tmp") == []
    record = spool / "attempt"
    assert record.is_file() and not record.is_symlink()
    attempt = read_attempt(record)
    assert attempt == {
        "version": "1", "time": attempt["time"], "domains": domains, "renewed": renewed, "failed": failed,
    }
    assert TIME_PATTERN.match(attempt["time"])
    recorded = datetime.datetime.strptime(attempt["time"], TIME_FORMAT).replace(tzinfo=datetime.timezone.utc)
    # The shells' `date` reads time(2), the kernel's coarse clock, which may still show
    # the second before the one Python's clock_gettime read for `since`.
    assert since - datetime.timedelta(seconds=1) <= recorded <= now()


def test_post_hook_is_an_executable_sh_script():
    assert os.access(HOOK, os.X_OK)
    assert HOOK.read_text(encoding="utf-8").startswith("#!/bin/sh\n")


def test_post_hook_passes_shellcheck_as_posix_sh():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    result = subprocess.run(["shellcheck", "-s", "sh", str(HOOK)], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_post_hook_header_names_the_certbot_version_that_passes_the_domains():
    header = HOOK.read_text(encoding="utf-8").split("\n\n", 1)[0]
    assert "certbot 2.7.0 added the two variables" in header
    assert "environment variables for\n#   consumption by post renewal hooks" in header


def test_post_hook_records_attempt_silently(shell, config_dir, hook, workdir):
    # A file the wildcard domain would match if the hook let the shell glob it.
    (workdir / "www.herzbube.ch").touch()
    since = now()
    result = run_post_hook(shell, hook, workdir, {
        "RENEWED_DOMAINS": "  herzbube.ch\t*.herzbube.ch    www.herzbube.ch \t",
        "FAILED_DOMAINS": "mail.example.org  *.example.org ",
    })
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    spool = config_dir / "certrelay"
    assert entries(spool) == ["attempt", "tmp"]
    assert_recorded(
        spool, "known", "herzbube.ch *.herzbube.ch www.herzbube.ch", "mail.example.org *.example.org", since,
    )
    assert entries(workdir) == ["www.herzbube.ch"]


def test_post_hook_record_has_exactly_the_five_lines(shell, config_dir, hook, workdir):
    result = run_post_hook(shell, hook, workdir, {"RENEWED_DOMAINS": "a.example b.example", "FAILED_DOMAINS": ""})
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    text = (config_dir / "certrelay" / "attempt").read_text(encoding="ascii")
    assert re.fullmatch(
        r"version=1\ntime=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\ndomains=known\nrenewed=a\.example b\.example\nfailed=\n",
        text,
    ), text


def test_post_hook_records_the_time_in_utc(shell, config_dir, hook, workdir):
    # Five hours west of Greenwich: a local time would be off by that much.
    since = now()
    result = run_post_hook(shell, hook, workdir, {"TZ": "EST5", "FAILED_DOMAINS": ""})
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert_recorded(config_dir / "certrelay", "known", "", "", since)


def test_post_hook_records_readable_file_under_strict_umask(shell, config_dir, hook, workdir):
    result = run_post_hook(shell, hook, workdir, {"FAILED_DOMAINS": "x"}, umask=0o077)
    assert result.returncode == 0, result.stderr
    spool = config_dir / "certrelay"
    expected = {spool: 0o755, spool / "tmp": 0o755, spool / "attempt": 0o644}
    assert {path: path.stat().st_mode & 0o777 for path in expected} == expected


# (environment, domains, renewed, failed): what certbot passes, what the record says.
VARIANTS = {
    # certbot < 2.7.0 passes neither.
    "older-certbot": ({}, "unknown", "", ""),
    # ... but leaves the last deploy hook's RENEWED_DOMAINS in its environment: one
    # lineage's domains, not the attempt's, so not recorded.
    "older-certbot-after-a-deploy-hook": ({"RENEWED_DOMAINS": "x.example"}, "unknown", "", ""),
    "all-renewed": ({"RENEWED_DOMAINS": "x.example", "FAILED_DOMAINS": ""}, "known", "x.example", ""),
    "all-failed": ({"RENEWED_DOMAINS": "", "FAILED_DOMAINS": "x.example"}, "known", "", "x.example"),
    # certbot 2.7.0 to 4.1.x after a failed renewal, or a failed certonly.
    "both-empty": ({"RENEWED_DOMAINS": "", "FAILED_DOMAINS": ""}, "known", "", ""),
    "failed-without-renewed": ({"FAILED_DOMAINS": "y.example"}, "known", "", "y.example"),
    "blank-lists": ({"RENEWED_DOMAINS": " \t ", "FAILED_DOMAINS": "\t"}, "known", "", ""),
    "every-allowed-character": (
        {"RENEWED_DOMAINS": "Herz-bube_2.ch *.0-9.example", "FAILED_DOMAINS": "-x"},
        "known", "Herz-bube_2.ch *.0-9.example", "-x",
    ),
}


@pytest.mark.parametrize("case", sorted(VARIANTS))
def test_post_hook_records_what_certbot_passed(shell, config_dir, hook, workdir, case):
    environment, domains, renewed, failed = VARIANTS[case]
    since = now()
    result = run_post_hook(shell, hook, workdir, environment)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert_recorded(config_dir / "certrelay", domains, renewed, failed, since)


# (value, recorded): the same for RENEWED_DOMAINS and FAILED_DOMAINS.
HOSTILE = {
    "newline": ("a.example\nfailed=evil.example\nversion=2", "a.example failedevil.example version2"),
    "carriage-return": ("a.example\r\nb.example\r", "a.example b.example"),
    "vertical-tab-and-form-feed": ("a.example\vb.example\fc.example", "a.example b.example c.example"),
    "equals": ("a=b.example ==", "ab.example"),
    "command-substitution": ("$(touch pwned) `touch pwned` ${PATH} $PATH", "touch pwned touch pwned PATH PATH"),
    "shell-syntax": ("a;b|c&d<e>f'g\"h\\i#j~k", "abcdefghijk"),
    "glob": ("* ? [a-z] *.example", "* a-z *.example"),
    "control-characters": ("a\x01b\x7fc\x1b[31md", "abc31md"),
    "option-like": ("-n -e --help", "-n -e --help"),
    "only-dropped-characters": ("$()= ;\n|", ""),
    "exactly-the-cap": ("a" * MAX_LIST, "a" * MAX_LIST),
    "one-word-over-the-cap": ("a" * (MAX_LIST + 1), ""),
    "cut-between-two-words": ("b" * MAX_LIST + " c", "b" * MAX_LIST),
    "cut-inside-a-word": ("b" * (MAX_LIST - 4) + " cccccccc", "b" * (MAX_LIST - 4)),
    "cap-counts-after-collapsing": ("  d" * (MAX_LIST // 2), " ".join(["d"] * (MAX_LIST // 2))),
    "100k-characters-of-domains": ("example.org " * 8334, " ".join(["example.org"] * (MAX_LIST // 12))),
    "100k-characters-in-one-word": ("x" * 100_000, ""),
    "100k-characters-to-drop": ("=\n" * 50_000 + "ok.example", "ok.example"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_post_hook_writes_hostile_values_as_safe_characters_within_the_cap(shell, config_dir, hook, workdir, case):
    value, recorded = HOSTILE[case]
    since = now()
    result = run_post_hook(shell, hook, workdir, {"RENEWED_DOMAINS": value, "FAILED_DOMAINS": value})
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert_recorded(config_dir / "certrelay", "known", recorded, recorded, since)
    # Nothing the values said was run.
    assert entries(workdir) == []


def test_post_hook_caps_each_list_on_its_own(shell, config_dir, hook, workdir):
    since = now()
    result = run_post_hook(shell, hook, workdir, {
        "RENEWED_DOMAINS": "r.example " * 10_000, "FAILED_DOMAINS": "f.example " * 10_000,
    })
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    words = MAX_LIST // len("r.example ")
    assert_recorded(
        config_dir / "certrelay", "known", " ".join(["r.example"] * words), " ".join(["f.example"] * words), since,
    )


def test_post_hook_drops_characters_that_are_not_ascii(shell, config_dir, hook, workdir):
    # UTF-8, then a byte that is not UTF-8 (a surrogate escape becomes that byte). yash
    # cannot see a variable that is not text in its locale: to it that one is unset
    # (the first is seen, in C.UTF-8).
    since = now()
    result = run_post_hook(shell, hook, workdir, {
        "LC_ALL": "C.UTF-8",
        "RENEWED_DOMAINS": "h\u00e9rzbube.ch b\u00fccher.example \u2028 ok.example",
        "FAILED_DOMAINS": "",
    })
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert_recorded(config_dir / "certrelay", "known", "hrzbube.ch bcher.example ok.example", "", since)

    result = run_post_hook(shell, hook, workdir, {"RENEWED_DOMAINS": "a\udcffb.example", "FAILED_DOMAINS": ""})
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    attempt = read_attempt(config_dir / "certrelay" / "attempt")
    assert attempt["renewed"] in (("ab.example", "") if shell == ("yash",) else ("ab.example",))


def test_post_hook_newest_attempt_replaces_the_one_before(shell, config_dir, hook, workdir):
    first = run_post_hook(shell, hook, workdir, {"RENEWED_DOMAINS": "old.example", "FAILED_DOMAINS": ""})
    assert first.returncode == 0, first.stderr
    since = now()
    second = run_post_hook(shell, hook, workdir, {"RENEWED_DOMAINS": "", "FAILED_DOMAINS": "new.example"})
    assert (second.returncode, second.stdout, second.stderr) == (0, "", "")
    assert entries(config_dir / "certrelay") == ["attempt", "tmp"]
    assert_recorded(config_dir / "certrelay", "known", "", "new.example", since)


def test_post_hook_ignores_arguments(shell, config_dir, hook, workdir):
    since = now()
    result = run_post_hook(shell, hook, workdir, {"FAILED_DOMAINS": "x"}, "--foo", "bar", "-x", "", "*")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert_recorded(config_dir / "certrelay", "known", "", "x", since)


def test_post_hook_under_another_name_and_config_dir(shell, tmp_path, workdir):
    # certbot runs every executable in the directory; a config dir named like its parts.
    config_dir = tmp_path / "srv" / "renewal-hooks" / "post" / "config"
    hook = install_post_hook(config_dir, "50-certrelay")
    since = now()
    result = run_post_hook(shell, hook, workdir, {"FAILED_DOMAINS": "x"})
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert_recorded(config_dir / "certrelay", "known", "", "x", since)


def test_post_hook_installed_as_a_link_uses_the_links_config_dir(shell, config_dir, workdir):
    # The admin may link to the shipped hook: $0 is then the link's path.
    post = config_dir / "renewal-hooks" / "post"
    post.mkdir(parents=True)
    (post / HOOK_NAME).symlink_to(HOOK)
    since = now()
    result = run_post_hook(shell, post / HOOK_NAME, workdir, {"FAILED_DOMAINS": "x"})
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert_recorded(config_dir / "certrelay", "known", "", "x", since)
    assert not (HOOK.parent / "certrelay").exists()


# (value of CERTRELAY_SPOOL relative to tmp_path, or "" for an empty one; where the record
# goes, relative to tmp_path)
SPOOLS = {"override": ("spool", "spool"), "empty-override": ("", "letsencrypt/certrelay")}


@pytest.mark.parametrize("case", sorted(SPOOLS))
def test_post_hook_spool_override(shell, tmp_path, hook, workdir, case):
    value, spool = SPOOLS[case]
    since = now()
    result = run_post_hook(
        shell, hook, workdir, {"CERTRELAY_SPOOL": str(tmp_path / value) if value else "", "FAILED_DOMAINS": "x"},
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert_recorded(tmp_path / spool, "known", "", "x", since)
    if value:
        assert not (tmp_path / "letsencrypt" / "certrelay").exists()


def test_post_hook_spool_override_needs_no_config_dir(shell, tmp_path, workdir):
    # Run from the source tree, where its path says nothing of a config dir.
    since = now()
    result = run_post_hook(shell, HOOK, workdir, {"CERTRELAY_SPOOL": str(tmp_path / "spool"), "FAILED_DOMAINS": ""})
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert_recorded(tmp_path / "spool", "known", "", "", since)


def test_post_hook_without_path_falls_back_to_standard_path(shell, config_dir, hook, workdir):
    # yash has no built-in PATH: without the hook's default it finds no mkdir.
    result = subprocess.run(
        [shutil.which(shell[0], path=PATH), *shell[1:], str(hook)],
        env={"FAILED_DOMAINS": "x"}, cwd=workdir, capture_output=True, text=True, timeout=30,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert read_attempt(config_dir / "certrelay" / "attempt")["failed"] == "x"


# (the path the shell gets, "{config}" standing for the config dir, or None for the
# source tree's hook; the directory to run it in, relative to tmp_path; what stderr says)
MISPLACED = {
    "source-tree": (None, ".", "not as CONFIG_DIR/renewal-hooks/post/NAME"),
    "deploy-hook-directory": (
        "{config}/renewal-hooks/deploy/" + HOOK_NAME, ".", "not as CONFIG_DIR/renewal-hooks/post/NAME",
    ),
    "bare-name": (HOOK_NAME, "letsencrypt/renewal-hooks/post", "not as CONFIG_DIR/renewal-hooks/post/NAME"),
    "dot-slash": ("./" + HOOK_NAME, "letsencrypt/renewal-hooks/post", "not as CONFIG_DIR/renewal-hooks/post/NAME"),
    "relative-config-dir": (
        "letsencrypt/renewal-hooks/post/" + HOOK_NAME, ".", "whose CONFIG_DIR is not an absolute path",
    ),
}


@pytest.mark.parametrize("case", sorted(MISPLACED))
def test_post_hook_run_from_elsewhere_fails_and_records_nothing(shell, tmp_path, config_dir, hook, case):
    path, directory, message = MISPLACED[case]
    (config_dir / "renewal-hooks" / "deploy").mkdir()
    shutil.copy(hook, config_dir / "renewal-hooks" / "deploy" / HOOK_NAME)
    path = path.replace("{config}", str(config_dir)) if path else HOOK
    result = run_post_hook(shell, path, tmp_path / directory, {"FAILED_DOMAINS": "x"})
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("certrelay-post-hook: ")
    assert message in result.stderr
    assert "or set CERTRELAY_SPOOL" in result.stderr
    # Nothing written anywhere: no spool, not beside the hook, not in the working directory.
    assert entries(tmp_path) == ["letsencrypt"]
    assert entries(config_dir) == ["renewal-hooks"]
    assert not (HOOK.parent / "certrelay").exists()


def test_post_hook_with_unusable_spool_fails_with_status_1(shell, tmp_path, hook, workdir):
    (tmp_path / "file").write_text("")
    spool = tmp_path / "file" / "spool"
    result = run_post_hook(shell, hook, workdir, {"CERTRELAY_SPOOL": str(spool), "FAILED_DOMAINS": "x"})
    assert result.returncode == 1
    assert result.stdout == ""
    assert f"certrelay-post-hook: cannot create {spool}/tmp: check that {spool} is writable" in result.stderr


@pytest.fixture
def read_only_spool(tmp_path):
    """Return a spool holding tmp/ and an earlier record `attempt` ("earlier\\n") that
    the hook cannot write to: on a tmpfs mounted read-only as root (root may write to
    any mode), else a tmp/ of mode 0555."""
    mount_point = tmp_path / "read-only"
    mount_point.mkdir()
    spool = mount_point / "spool"
    if os.geteuid() != 0:
        (spool / "tmp").mkdir(parents=True)
        (spool / "attempt").write_text("earlier\n")
        (spool / "tmp").chmod(0o555)
        spool.chmod(0o555)
        try:
            yield spool
        finally:
            spool.chmod(0o755)
            (spool / "tmp").chmod(0o755)
        return
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(mount_point)],
        capture_output=True, text=True, timeout=30,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        (spool / "tmp").mkdir(parents=True)
        (spool / "attempt").write_text("earlier\n")
        subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], check=True, timeout=30)
        yield spool
    finally:
        subprocess.run(["umount", str(mount_point)], check=True, timeout=30)


def test_post_hook_with_read_only_spool_says_why_and_keeps_the_record(shell, hook, workdir, read_only_spool):
    result = run_post_hook(shell, hook, workdir, {"CERTRELAY_SPOOL": str(read_only_spool), "FAILED_DOMAINS": "x"})
    assert result.returncode == 1
    assert result.stdout == ""
    assert re.search(
        rf"^certrelay-post-hook: cannot write {re.escape(str(read_only_spool))}/tmp/attempt\.\d+:"
        r" is the file system full or read-only\?$",
        result.stderr, re.MULTILINE,
    ), result.stderr
    assert entries(read_only_spool) == ["attempt", "tmp"]
    assert entries(read_only_spool / "tmp") == []
    assert (read_only_spool / "attempt").read_text() == "earlier\n"


@pytest.fixture
def full_spool(tmp_path):
    """Return a spool holding tmp/ on a tmpfs filled to the last byte; unmount it
    afterwards."""
    mount_point = tmp_path / "full"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(mount_point)],
        capture_output=True, text=True, timeout=30,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        spool = mount_point / "spool"
        (spool / "tmp").mkdir(parents=True)
        with open(mount_point / "filler", "wb", buffering=0) as filler:
            with pytest.raises(OSError) as full:
                while True:
                    filler.write(b"\0" * 1024)
            assert full.value.errno == errno.ENOSPC
        yield spool
    finally:
        subprocess.run(["umount", str(mount_point)], check=True, timeout=30)


@needs_root
def test_post_hook_on_full_file_system_fails_and_leaves_no_partial_file(shell, hook, workdir, full_spool):
    result = run_post_hook(shell, hook, workdir, {"CERTRELAY_SPOOL": str(full_spool), "FAILED_DOMAINS": "x"})
    assert result.returncode == 1
    assert result.stdout == ""
    assert re.search(
        rf"^certrelay-post-hook: cannot write {re.escape(str(full_spool))}/tmp/attempt\.\d+:"
        r" is the file system full or read-only\?$",
        result.stderr, re.MULTILINE,
    ), result.stderr
    assert entries(full_spool) == ["tmp"]
    assert entries(full_spool / "tmp") == []


def test_post_hook_refuses_record_that_is_a_directory(shell, config_dir, hook, workdir):
    blocker = config_dir / "certrelay" / "attempt"
    blocker.mkdir(parents=True)
    (blocker / "keep").write_text("keep\n")
    result = run_post_hook(shell, hook, workdir, {"FAILED_DOMAINS": "x"})
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"certrelay-post-hook: {blocker} is a directory: remove it, the attempt record must be a file\n"
    )
    assert entries(blocker) == ["keep"]
    assert entries(config_dir / "certrelay" / "tmp") == []


# What a link planted at SPOOL/attempt points to, relative to tmp_path: a file, a
# directory, nothing.
LINKED = {"file": "outside/file", "directory": "outside", "dangling": "outside/missing"}


@pytest.mark.parametrize("case", sorted(LINKED))
def test_post_hook_replaces_a_link_at_the_record_and_writes_nothing_outside(shell, tmp_path, config_dir, hook,
                                                                            workdir, case):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "file").write_text("outside\n")
    spool = config_dir / "certrelay"
    spool.mkdir()
    (spool / "attempt").symlink_to(tmp_path / LINKED[case])
    since = now()
    result = run_post_hook(shell, hook, workdir, {"FAILED_DOMAINS": "x"})
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert_recorded(spool, "known", "", "x", since)
    assert entries(outside) == ["file"]
    assert (outside / "file").read_text() == "outside\n"


def busybox_root(tmp_path):
    """Return a root directory holding nothing but a static BusyBox and its applet links
    in bin/ (as test_hook.py's chroot test makes it); skip without busybox-static."""
    busybox = shutil.which("busybox", path=PATH)
    if busybox is None:
        pytest.skip("busybox-static is not installed")
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    shutil.copy(busybox, root / "bin" / "busybox")
    subprocess.run([shutil.which("chroot", path=PATH), str(root), "/bin/busybox", "--install", "-s", "/bin"],
                   check=True, timeout=30)
    # The premise: nothing in the root but BusyBox and its applet links.
    assert entries(root) == ["bin"]
    assert [path.name for path in (root / "bin").iterdir() if not path.is_symlink()] == ["busybox"]
    return root


@needs_root
def test_post_hook_records_in_chroot_holding_only_busybox(tmp_path):
    root = busybox_root(tmp_path)
    install_post_hook(root / "etc" / "letsencrypt")
    since = now()
    # As certbot runs it: `/bin/sh -c PATH`, the hook started by its #! line.
    certbot_runs = [
        shutil.which("chroot", path=PATH), str(root),
        "/bin/sh", "-c", f"/etc/letsencrypt/renewal-hooks/post/{HOOK_NAME}",
    ]
    result = subprocess.run(
        certbot_runs, env={"RENEWED_DOMAINS": "x *.x", "FAILED_DOMAINS": "y\n=z"},
        capture_output=True, text=True, timeout=30,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    spool = root / "etc" / "letsencrypt" / "certrelay"
    assert entries(spool) == ["attempt", "tmp"]
    assert_recorded(spool, "known", "x *.x", "y z", since)

    # The 100k-character values, cut with BusyBox's own tr and cut.
    result = subprocess.run(
        certbot_runs,
        env={"RENEWED_DOMAINS": "example.org " * 8334, "FAILED_DOMAINS": "x" * 100_000},
        capture_output=True, text=True, timeout=30,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert_recorded(spool, "known", " ".join(["example.org"] * (MAX_LIST // 12)), "", since)


@pytest.fixture
def traced_run(shell, config_dir, hook, tmp_path, workdir):
    """Run the hook under strace; return the spool and the events of all its processes,
    in time order."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed")
    trace_dir = tmp_path / "trace"
    trace_dir.mkdir()
    result = subprocess.run(
        [strace, "-f", "-ff", "-qq", "-ttt", "-y", "-e", f"trace={TRACED_CALLS}", "-o", str(trace_dir / "trace"),
         *shell, str(hook)],
        env={"PATH": PATH, "RENEWED_DOMAINS": "x.example", "FAILED_DOMAINS": "y.example"},
        cwd=workdir, capture_output=True, text=True, timeout=60,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    events = sorted(event for trace in trace_dir.iterdir() for event in traced_events(trace, str(workdir)))
    return config_dir / "certrelay", events


def test_post_hook_writes_only_inside_its_spool(traced_run):
    spool, events = traced_run
    written = [path for _, call, paths in events if call not in FLUSH_CALLS for path in paths]
    assert str(spool / "attempt") in written  # not vacuous: the writes were seen
    outside = [path for path in written if path != str(spool) and not path.startswith(f"{spool}/")]
    assert outside == []


def test_post_hook_flushes_temporary_file_then_renames_it_over_the_record(traced_run):
    spool, events = traced_run
    record = str(spool / "attempt")
    touching_record = [(time, call, paths) for time, call, paths in events if record in paths]
    # The record appears by one rename and is never written in place.
    assert len(touching_record) == 1, touching_record
    renamed_at, call, paths = touching_record[0]
    assert call in RENAME_CALLS and paths[1] == record
    source = paths[0]
    assert re.fullmatch(re.escape(str(spool / "tmp")) + r"/attempt\.\d+", source)
    flushes = [time for time, call, paths in events if call in FLUSH_CALLS and paths in ([], [source])]
    assert flushes and min(flushes) < renamed_at


def test_post_hook_makes_the_rename_durable_by_syncing_the_spool(traced_run):
    spool, events = traced_run
    record = str(spool / "attempt")
    renamed_at = next(time for time, call, paths in events if call in RENAME_CALLS and paths[-1] == record)
    # A sync of the spool directory itself, or a global sync(), after the rename.
    flushes = [(call, paths) for time, call, paths in events if call in FLUSH_CALLS and time > renamed_at]
    assert any(paths in ([str(spool)], []) for _, paths in flushes), flushes


@pytest.mark.skipif(acme.skip_reason() is not None, reason=acme.skip_reason() or "")
def test_certbot_renew_with_one_failed_lineage_records_both_lists(tmp_path):
    # Real certbot from PyPI against Pebble, BusyBox as /bin/sh (tests/acme.py).
    config = tmp_path / "letsencrypt"
    with acme.acme_server(tmp_path / "acme") as server:
        server.certonly(config, ["example.test", "*.example.test"])
        server.certonly(config, ["mail.example.test"])
        # Installed after the certonly runs: certbot >= 3.2.0 runs post hooks for those too.
        install_post_hook(config)
        since = now()
        result = server.renew(config, fail_domains=["mail.example.test"])
    assert result.returncode == 1, result.stdout + result.stderr
    assert "acme auth hook: refusing mail.example.test" in result.stderr, result.stdout + result.stderr
    # certbot reports a post hook's stderr; ours had nothing to say.
    assert "Hook 'post-hook'" not in result.stdout + result.stderr
    assert_recorded(config / "certrelay", "known", "example.test *.example.test", "mail.example.test", since)
