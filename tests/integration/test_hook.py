"""The deploy hook certrelay/certrelay-hook, run as a real process by real POSIX shells.

certbot runs the hook with `/bin/sh -c PATH`: BusyBox ash in the official images, dash
on Debian. Every behaviour is checked under each shell installed here.
"""

import datetime
import errno
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

HOOK = Path(__file__).resolve().parents[2] / "certrelay" / "certrelay-hook"
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
SHELLS = {
    "dash": ("dash",),
    "posh": ("posh",),
    "mksh": ("mksh",),
    "yash": ("yash",),
    "busybox-ash": ("busybox", "sh"),
}
KEYS = ["version", "name", "lineage", "domains", "time"]
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
TIME_PATTERN = re.compile(r"\A\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z\Z")

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chroot, mount)")


@pytest.fixture(params=sorted(SHELLS))
def shell(request):
    """Return the argv prefix that runs a script with one of the shells."""
    command = SHELLS[request.param]
    if shutil.which(command[0]) is None:
        pytest.skip(f"{command[0]} is not installed")
    return command


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


def run_hook(shell, workdir, environment, *arguments, **options):
    """Run the hook with `shell` in `workdir` with only PATH and `environment` set;
    return the CompletedProcess (text)."""
    return subprocess.run(
        [*shell, str(HOOK), *arguments], env={"PATH": PATH, **environment}, cwd=workdir,
        capture_output=True, text=True, timeout=30, **options,
    )


def entries(directory):
    """Return the sorted names in `directory`, hidden ones included; [] if it is missing."""
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def now():
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


def read_notification(path):
    """Given a queue file, return its key=value lines as a dict, asserting the keys and
    their order."""
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    pairs = [line.split("=", 1) for line in text.splitlines()]
    assert [pair[0] for pair in pairs] == KEYS
    return dict(pairs)


def assert_published(spool, name, lineage, domains, since):
    """Assert that `spool` holds exactly one pending notification, for `name`, with
    these values and a time from `since` on, and no temporary file."""
    assert entries(spool / "queue") == [name]
    assert entries(spool / "tmp") == []
    notification = read_notification(spool / "queue" / name)
    assert notification == {
        "version": "1", "name": name, "lineage": lineage, "domains": domains, "time": notification["time"],
    }
    assert TIME_PATTERN.match(notification["time"])
    published = datetime.datetime.strptime(notification["time"], TIME_FORMAT).replace(tzinfo=datetime.timezone.utc)
    # The shells' `date` reads time(2), the kernel's coarse clock, which may still show
    # the second before the one Python's clock_gettime read for `since`.
    assert since - datetime.timedelta(seconds=1) <= published <= now()


def test_hook_is_an_executable_sh_script():
    assert os.access(HOOK, os.X_OK)
    assert HOOK.read_text(encoding="utf-8").startswith("#!/bin/sh\n")


def test_hook_passes_shellcheck_as_posix_sh():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    result = subprocess.run(["shellcheck", "-s", "sh", str(HOOK)], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_hook_publishes_notification_silently(shell, config_dir, workdir):
    # A file the wildcard domain would match if the hook let the shell glob it.
    (workdir / "www.herzbube.ch").touch()
    lineage = f"{config_dir}/live/herzbube.ch"
    since = now()
    result = run_hook(shell, workdir, {
        "RENEWED_LINEAGE": lineage,
        "RENEWED_DOMAINS": "  herzbube.ch\t*.herzbube.ch    www.herzbube.ch \t",
    })
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    domains = "herzbube.ch *.herzbube.ch www.herzbube.ch"
    assert_published(config_dir / "certrelay", "herzbube.ch", lineage, domains, since)
    assert entries(workdir) == ["www.herzbube.ch"]


def test_hook_publishes_readable_file_under_strict_umask(shell, config_dir, workdir):
    result = run_hook(shell, workdir, {"RENEWED_LINEAGE": f"{config_dir}/live/x"}, umask=0o077)
    assert result.returncode == 0, result.stderr
    spool = config_dir / "certrelay"
    expected = {spool: 0o755, spool / "queue": 0o755, spool / "tmp": 0o755, spool / "queue" / "x": 0o644}
    assert {path: path.stat().st_mode & 0o777 for path in expected} == expected


@needs_root
def test_hook_publishes_in_chroot_holding_only_busybox(tmp_path):
    busybox = shutil.which("busybox", path=PATH)
    if busybox is None:
        pytest.skip("busybox-static is not installed")
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    shutil.copy(busybox, root / "bin" / "busybox")
    chroot = shutil.which("chroot", path=PATH)
    subprocess.run([chroot, str(root), "/bin/busybox", "--install", "-s", "/bin"], check=True, timeout=30)
    # The premise: nothing in the root but BusyBox and its applet links.
    assert entries(root) == ["bin"]
    assert [path.name for path in (root / "bin").iterdir() if not path.is_symlink()] == ["busybox"]
    shutil.copy(HOOK, root / "hook")

    since = now()
    result = subprocess.run(
        [chroot, str(root), "/bin/sh", "/hook"],
        env={"RENEWED_LINEAGE": "/etc/letsencrypt/live/x", "RENEWED_DOMAINS": "x *.x"},
        capture_output=True, text=True, timeout=30,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert_published(root / "etc" / "letsencrypt" / "certrelay", "x", "/etc/letsencrypt/live/x", "x *.x", since)


def test_hook_second_renewal_replaces_pending_notification(shell, config_dir, workdir):
    lineage = f"{config_dir}/live/herzbube.ch"
    first = run_hook(shell, workdir, {"RENEWED_LINEAGE": lineage, "RENEWED_DOMAINS": "old.herzbube.ch"})
    assert first.returncode == 0, first.stderr
    since = now()
    second = run_hook(shell, workdir, {"RENEWED_LINEAGE": lineage, "RENEWED_DOMAINS": "new.herzbube.ch"})
    assert (second.returncode, second.stdout, second.stderr) == (0, "", "")
    assert_published(config_dir / "certrelay", "herzbube.ch", lineage, "new.herzbube.ch", since)


# (lineage, extra environment, arguments, spool, name, published lineage); paths are
# relative to tmp_path.
ACCEPTED = {
    "trailing-slash": ("letsencrypt/live/x/", {}, (), "letsencrypt/certrelay", "x", "letsencrypt/live/x"),
    "other-config-dir": (
        "srv/certbot/config/live/x", {}, (), "srv/certbot/config/certrelay", "x", "srv/certbot/config/live/x",
    ),
    "config-dir-named-live": ("live/live/x", {}, (), "live/certrelay", "x", "live/live/x"),
    "spool-override": ("letsencrypt/live/x", {"CERTRELAY_SPOOL": "spool"}, (), "spool", "x", "letsencrypt/live/x"),
    "empty-spool-override": (
        "letsencrypt/live/x", {"CERTRELAY_SPOOL": ""}, (), "letsencrypt/certrelay", "x", "letsencrypt/live/x",
    ),
    "unknown-arguments": (
        "letsencrypt/live/x", {}, ("--foo", "bar", "-x", "", "*"), "letsencrypt/certrelay", "x", "letsencrypt/live/x",
    ),
    "every-allowed-character": (
        "letsencrypt/live/Herz-bube_2.ch-0001", {}, (), "letsencrypt/certrelay", "Herz-bube_2.ch-0001",
        "letsencrypt/live/Herz-bube_2.ch-0001",
    ),
    "name-of-235-characters": (
        "letsencrypt/live/" + "n" * 235, {}, (), "letsencrypt/certrelay", "n" * 235, "letsencrypt/live/" + "n" * 235,
    ),
}


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_hook_accepts_lineage_variant(shell, tmp_path, workdir, case):
    lineage, environment, arguments, spool, name, published = ACCEPTED[case]
    environment = {key: str(tmp_path / value) if value else value for key, value in environment.items()}
    since = now()
    result = run_hook(
        shell, workdir, {"RENEWED_LINEAGE": f"{tmp_path}/{lineage}", "RENEWED_DOMAINS": "x", **environment}, *arguments,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert_published(tmp_path / spool, name, f"{tmp_path}/{published}", "x", since)
    if environment.get("CERTRELAY_SPOOL"):
        assert not (tmp_path / "letsencrypt" / "certrelay").exists()


def test_hook_without_path_falls_back_to_standard_path(shell, config_dir, workdir):
    # yash has no built-in PATH: without the hook's default it finds no mkdir.
    result = subprocess.run(
        [shutil.which(shell[0], path=PATH), *shell[1:], str(HOOK)],
        env={"RENEWED_LINEAGE": f"{config_dir}/live/x"}, cwd=workdir, capture_output=True, text=True, timeout=30,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert entries(config_dir / "certrelay" / "queue") == ["x"]


# (environment, what stderr must mention); "{config}" stands for the config dir.
REJECTED = {
    "unset-lineage": ({}, "RENEWED_LINEAGE is not set"),
    "empty-lineage": ({"RENEWED_LINEAGE": ""}, "RENEWED_LINEAGE is not set or empty"),
    "lineage-without-live-dir": ({"RENEWED_LINEAGE": "{config}/archive/x"}, "not of the form CONFIG_DIR/live/NAME"),
    "lineage-of-live-dir": ({"RENEWED_LINEAGE": "{config}/live/"}, "not of the form CONFIG_DIR/live/NAME"),
    "lineage-below-name": ({"RENEWED_LINEAGE": "{config}/live/x/cert.pem"}, "not of the form CONFIG_DIR/live/NAME"),
    "relative-lineage": ({"RENEWED_LINEAGE": "letsencrypt/live/x"}, "absolute CONFIG_DIR"),
    "lineage-with-empty-config-dir": ({"RENEWED_LINEAGE": "/live/x"}, "absolute CONFIG_DIR"),
    "empty-name": ({"RENEWED_LINEAGE": "{config}/live//"}, "empty certificate NAME"),
    "name-with-space": ({"RENEWED_LINEAGE": "{config}/live/herz bube"}, "outside [A-Za-z0-9._-]"),
    "name-with-glob": ({"RENEWED_LINEAGE": "{config}/live/*"}, "outside [A-Za-z0-9._-]"),
    "non-ascii-name": (
        {"RENEWED_LINEAGE": "{config}/live/h\u00e9rzbube", "LC_ALL": "C.UTF-8"}, "outside [A-Za-z0-9._-]",
    ),
    "hidden-name": ({"RENEWED_LINEAGE": "{config}/live/.x"}, "starts with '.'"),
    "dot-dot-name": ({"RENEWED_LINEAGE": "{config}/live/.."}, "starts with '.'"),
    "option-like-name": ({"RENEWED_LINEAGE": "{config}/live/-rf"}, "starts with '-'"),
    "name-of-236-characters": ({"RENEWED_LINEAGE": "{config}/live/" + "n" * 236}, "more than 235"),
    "newline-in-lineage": ({"RENEWED_LINEAGE": "{config}/live/x\ny"}, "RENEWED_LINEAGE contains a newline"),
    "carriage-return-in-lineage": (
        {"RENEWED_LINEAGE": "{config}/live/x\r"}, "RENEWED_LINEAGE contains a newline or carriage return",
    ),
    "newline-in-domains": (
        {"RENEWED_LINEAGE": "{config}/live/x", "RENEWED_DOMAINS": "x\ny"}, "RENEWED_DOMAINS contains a newline",
    ),
}


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_hook_with_bad_input_fails_and_publishes_nothing(shell, tmp_path, config_dir, workdir, case):
    environment, message = REJECTED[case]
    environment = {key: value.replace("{config}", str(config_dir)) for key, value in environment.items()}
    result = run_hook(shell, workdir, environment)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("certrelay-hook: ")
    assert message in result.stderr
    # Nothing written anywhere: no spool, nothing in the working directory.
    assert entries(tmp_path) == ["cwd"]
    assert entries(workdir) == []


def test_hook_refuses_queue_entry_that_is_a_directory(shell, config_dir, workdir):
    blocker = config_dir / "certrelay" / "queue" / "x"
    blocker.mkdir(parents=True)
    (blocker / "keep").write_text("keep\n")
    result = run_hook(shell, workdir, {"RENEWED_LINEAGE": f"{config_dir}/live/x"})
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == f"certrelay-hook: {blocker} is a directory: remove it, the queue must only hold files\n"
    assert entries(blocker) == ["keep"]
    assert (blocker / "keep").read_text() == "keep\n"
    assert entries(config_dir / "certrelay" / "tmp") == []


def test_hook_with_unusable_spool_fails_with_status_1(shell, config_dir, tmp_path, workdir):
    (tmp_path / "file").write_text("")
    spool = tmp_path / "file" / "spool"
    result = run_hook(shell, workdir, {"RENEWED_LINEAGE": f"{config_dir}/live/x", "CERTRELAY_SPOOL": str(spool)})
    assert result.returncode == 1
    assert result.stdout == ""
    assert f"certrelay-hook: cannot create {spool}/queue" in result.stderr


@pytest.fixture
def full_spool(tmp_path):
    """Return a spool on a tmpfs filled to the last byte, holding a pending notification
    queue/x; unmount it afterwards."""
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
        (spool / "queue").mkdir(parents=True)
        (spool / "tmp").mkdir()
        (spool / "queue" / "x").write_text("pending\n")
        with open(mount_point / "filler", "wb", buffering=0) as filler:
            with pytest.raises(OSError) as full:
                while True:
                    filler.write(b"\0" * 1024)
            assert full.value.errno == errno.ENOSPC
        yield spool
    finally:
        subprocess.run(["umount", str(mount_point)], check=True, timeout=30)


@needs_root
def test_hook_on_full_file_system_fails_and_keeps_pending_notification(shell, config_dir, workdir, full_spool):
    result = run_hook(shell, workdir, {"RENEWED_LINEAGE": f"{config_dir}/live/x", "CERTRELAY_SPOOL": str(full_spool)})
    assert result.returncode == 1
    assert result.stdout == ""
    assert re.search(
        rf"^certrelay-hook: cannot write {re.escape(str(full_spool))}/tmp/x\.\d+: is the file system full\?$",
        result.stderr, re.MULTILINE,
    )
    assert entries(full_spool / "tmp") == []
    assert entries(full_spool / "queue") == ["x"]
    assert (full_spool / "queue" / "x").read_text() == "pending\n"


# System calls that create, change or remove a file system entry, that flush data to
# disk, and that move the working directory (to resolve relative paths: GNU mkdir -p
# uses chdir).
TRACED_CALLS = (
    "open,openat,creat,truncate,mkdir,mkdirat,mknod,mknodat,rename,renameat,renameat2,link,linkat,symlink,"
    "symlinkat,unlink,unlinkat,rmdir,chdir,fchdir,sync,syncfs,fsync,fdatasync"
)
RENAME_CALLS = {"rename", "renameat", "renameat2"}
FLUSH_CALLS = {"sync", "syncfs", "fsync", "fdatasync"}
TRACE_LINE = re.compile(r"\A(?P<time>\d+\.\d+) (?P<call>\w+)\((?P<arguments>.*)\)\s+=\s+(?P<result>-?\d+)")
TRACE_PATH = re.compile(r'(?:(?:AT_FDCWD|\d+)<(?P<base>[^>]*)>, )?"(?P<path>[^"]*)"')
FD_PATH = re.compile(r"\A\d+<(?P<path>[^>]*)>")


def traced_events(trace_file, cwd):
    """Given one process's `strace -ttt -y` output and its starting directory, return its
    successful calls that write or flush, as (time, call, absolute paths) tuples."""
    events = []
    for line in trace_file.read_text().splitlines():
        match = TRACE_LINE.match(line)
        if match is None or match["result"].startswith("-"):
            continue
        call, arguments = match["call"], match["arguments"]
        if call == "fchdir" or call in FLUSH_CALLS - {"sync"}:
            paths = [FD_PATH.match(arguments)["path"]]
        else:
            paths = [
                os.path.normpath(os.path.join(found["base"] or cwd, found["path"]))
                for found in TRACE_PATH.finditer(arguments)
            ]
        if call in ("chdir", "fchdir"):
            cwd = paths[0]
        elif call not in ("open", "openat") or re.search(r"O_WRONLY|O_RDWR|O_CREAT|O_TRUNC", arguments):
            events.append((float(match["time"]), call, paths))
    return events


@pytest.fixture
def traced_run(shell, config_dir, tmp_path, workdir):
    """Run the hook for lineage x under strace (the config dir exists, as it does for
    certbot); return the spool and the events of all its processes, in time order."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed")
    trace_dir = tmp_path / "trace"
    trace_dir.mkdir()
    (config_dir / "live" / "x").mkdir(parents=True)
    result = subprocess.run(
        [strace, "-f", "-ff", "-qq", "-ttt", "-y", "-e", f"trace={TRACED_CALLS}", "-o", str(trace_dir / "trace"),
         *shell, str(HOOK)],
        env={"PATH": PATH, "RENEWED_LINEAGE": f"{config_dir}/live/x"},
        cwd=workdir, capture_output=True, text=True, timeout=60,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    events = sorted(event for trace in trace_dir.iterdir() for event in traced_events(trace, str(workdir)))
    return config_dir / "certrelay", events


def test_hook_writes_only_inside_its_spool(traced_run):
    spool, events = traced_run
    written = [path for _, call, paths in events if call not in FLUSH_CALLS for path in paths]
    assert str(spool / "queue" / "x") in written  # not vacuous: the writes were seen
    outside = [path for path in written if path != str(spool) and not path.startswith(f"{spool}/")]
    assert outside == []


def test_hook_flushes_temporary_file_then_renames_it_into_queue(traced_run):
    spool, events = traced_run
    queue_file = str(spool / "queue" / "x")
    touching_queue_file = [(time, call, paths) for time, call, paths in events if queue_file in paths]
    # The queue file appears by one rename and is never written in place.
    assert len(touching_queue_file) == 1, touching_queue_file
    renamed_at, call, paths = touching_queue_file[0]
    assert call in RENAME_CALLS and paths[1] == queue_file
    source = paths[0]
    assert os.path.dirname(source) == str(spool / "tmp")
    flushes = [time for time, call, paths in events if call in FLUSH_CALLS and paths in ([], [source])]
    assert flushes and min(flushes) < renamed_at


def test_hook_makes_the_rename_durable_by_syncing_the_queue_directory(traced_run):
    spool, events = traced_run
    queue, queue_file = str(spool / "queue"), str(spool / "queue" / "x")
    renamed_at = next(time for time, call, paths in events if call in RENAME_CALLS and paths[-1] == queue_file)
    # A sync of the queue directory itself, or a global sync(), after the rename.
    flushes = [(call, paths) for time, call, paths in events if call in FLUSH_CALLS and time > renamed_at]
    assert any(paths in ([queue], []) for _, paths in flushes), flushes
