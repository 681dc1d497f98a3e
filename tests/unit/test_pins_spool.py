"""Pins for certrelay.spool that mutation testing (make mutants, docs/mutants.md) found
missing, in-process (test_hostile.py checks the same through `certrelay run`, but is
too slow to run for every mutant): a spool directory replaced by a link or a file, the
name an invalid entry gets in quarantine/, what is pending, and whole messages."""

import os
import stat

import pytest

from certrelay import spool

NOTIFICATION = "version=1\nname={name}\nlineage=/etc/letsencrypt/live/{name}\ndomains={name}\ntime=2026-11-28T10:00:00Z\n"


@pytest.fixture
def config_dir(tmp_path):
    root = tmp_path / "certrelay"
    for directory in ("queue", "claimed", "quarantine", "tmp"):
        (root / directory).mkdir(parents=True)
    return str(tmp_path)


def publish(config_dir, name, directory="queue", text=None):
    with open(os.path.join(config_dir, "certrelay", directory, name), "w", encoding="utf-8") as file:
        file.write(NOTIFICATION.format(name=name) if text is None else text)


def quarantined(config_dir):
    return sorted(os.listdir(os.path.join(config_dir, "certrelay", "quarantine")))


def claim(config_dir):
    with spool.Spool(config_dir).opened(create=True) as opened:
        return opened.claim()


# --- spool directories that are not directories -------------------------------------------


@pytest.mark.parametrize("directory", ["queue", "claimed"])
def test_a_spool_directory_replaced_by_a_link_is_quarantined_unfollowed(config_dir, tmp_path, directory):
    path = os.path.join(config_dir, "certrelay", directory)
    os.rmdir(path)
    host = tmp_path / "host"
    host.mkdir()
    (host / "secret").write_text("x")
    os.symlink(host, path)

    notifications, problems = claim(config_dir)

    [kept] = quarantined(config_dir)
    assert kept.startswith(f"{directory}@") and os.path.islink(os.path.join(config_dir, "certrelay", "quarantine", kept))
    assert os.path.isdir(path) and not os.path.islink(path) and os.listdir(path) == []
    assert notifications == [] and os.listdir(host) == ["secret"]
    assert problems == [
        f"quarantined the spool directory {path}: it was a symbolic link to {str(host)!r}, not a directory (nothing"
        f" was followed or moved through it); kept as {os.path.join(config_dir, 'certrelay', 'quarantine', kept)},"
        " and an empty directory made in its place"
    ]


def test_without_create_a_replaced_spool_directory_is_only_reported(config_dir):
    path = os.path.join(config_dir, "certrelay", "queue")
    os.rmdir(path)
    with open(path, "w") as file:
        file.write("x")

    with spool.Spool(config_dir).opened() as opened:
        notifications, problems = opened.peek()

    assert notifications == [] and quarantined(config_dir) == []
    assert problems == [f"would quarantine the spool directory {path}: it is a regular file, not a directory"]


def test_spool_directories_are_made_0755_even_with_umask_0(tmp_path):
    previous = os.umask(0)
    try:
        with spool.Spool(str(tmp_path)).opened(create=True):
            pass
    finally:
        os.umask(previous)

    root = tmp_path / "certrelay"
    assert {name: oct(stat.S_IMODE(os.stat(root / name).st_mode)) for name in os.listdir(root)} == {
        "queue": "0o755", "claimed": "0o755", "quarantine": "0o755"}
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o755


def test_a_spool_directory_another_process_makes_at_the_same_moment_is_opened(tmp_path, monkeypatch):
    make = os.mkdir

    def racing(name, mode=0o777, *, dir_fd=None):
        make(name, mode, dir_fd=dir_fd)  # the other process, between our open and our mkdir
        make(name, mode, dir_fd=dir_fd)  # ours: FileExistsError

    monkeypatch.setattr(os, "mkdir", racing)
    with spool.Spool(str(tmp_path)).opened(create=True) as opened:
        assert opened.claim() == ([], [])

    assert sorted(os.listdir(tmp_path / "certrelay")) == ["claimed", "quarantine", "queue"]


def test_describe_entry_says_what_an_entry_is(tmp_path):
    target = "/" + "t" * 300
    os.symlink(target, tmp_path / "link")
    os.mkfifo(tmp_path / "fifo")
    parent = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert spool.describe_entry(parent, "link") == f"a symbolic link to {target[:200]!r}"
        assert spool.describe_entry(parent, "fifo") == "a FIFO"
        assert spool.describe_entry(parent, "missing") == "unreadable (No such file or directory)"
    finally:
        os.close(parent)


# --- pending and claimed names ----------------------------------------------------------------


def test_pending_names_are_the_visible_queue_entries_open_or_not(config_dir):
    for name in ("b.ch", "a.ch", ".a.ch.hook-tmp"):
        publish(config_dir, name)
    publish(config_dir, "x.ch@1", directory="claimed")
    os.mknod(os.path.join(config_dir, "certrelay", "queue", os.fsdecode(b"c\xff")))
    unopened = spool.Spool(config_dir)

    with spool.Spool(config_dir).opened() as opened:
        assert opened.pending_names() == ["a.ch", "b.ch", "c\udcff"]
        assert opened.claimed_entries() == ["x.ch@1"]
    assert unopened.pending_names() == ["a.ch", "b.ch", "c\udcff"]
    assert unopened.claimed_entries() == ["x.ch@1"]


# --- quarantine -------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "safe"), [
    ("Bad Name!", "Bad_Name_"),
    ("X Y", "X_Y"),
    ("..Evil..", "Evil.."),
    ("...", "entry"),
    ("-" + "A" * 150, "-" + "A" * 99),
])
def test_an_invalid_queue_entry_is_quarantined_under_a_safe_name(config_dir, name, safe):
    publish(config_dir, name)

    notifications, problems = claim(config_dir)

    [kept] = quarantined(config_dir)
    assert notifications == [] and kept.partition("@")[0] == safe
    shown = repr(name)[:120]
    assert problems == [
        f"quarantined spool entry {shown}: {spool.BAD_NAME}; kept as"
        f" {os.path.join(config_dir, 'certrelay', 'quarantine', kept)}"
    ]


def test_entries_quarantined_within_one_tick_of_the_clock_keep_names_of_their_own(config_dir, monkeypatch):
    """A coarse clock: "a b" and "a!b" both become a_b@ID; the second must not replace the first."""
    monkeypatch.setattr(spool.time, "time_ns", lambda: 1796000000000000000)
    publish(config_dir, "a b")
    publish(config_dir, "a!b")

    _, problems = claim(config_dir)

    assert len(problems) == 2
    assert quarantined(config_dir) == ["a_b@1796000000000000000", "a_b@1796000000000000001"]


def test_an_invalid_claimed_entry_is_named_as_the_queue_entry_it_was(config_dir):
    publish(config_dir, "x.ch@y@12", directory="claimed")

    _, problems = claim(config_dir)

    [kept] = quarantined(config_dir)
    assert kept.partition("@")[0] == "x.ch"
    assert problems == [
        "quarantined spool entry 'x.ch': not a name certrelay gives claimed entries; kept as"
        f" {os.path.join(config_dir, 'certrelay', 'quarantine', kept)}"
    ]


def test_peek_says_what_it_would_quarantine(config_dir):
    name = "-" + "x" * 200
    publish(config_dir, name)
    publish(config_dir, "ok.ch")

    with spool.Spool(config_dir).opened() as opened:
        notifications, problems = opened.peek()

    queue = os.path.join(config_dir, "certrelay", "queue")
    assert [n.name for n in notifications] == ["ok.ch"]
    assert problems == [f"would quarantine spool entry {repr(name)[:120]} in {queue}: {spool.BAD_NAME}"]
    assert quarantined(config_dir) == []


# --- parse: what a refusal shows ------------------------------------------------------------


def content(**overrides):
    values = {"version": "1", "name": "a.ch", "lineage": "/etc/letsencrypt/live/a.ch", "domains": "a.ch",
              "time": "2024-05-01T03:04:05+00:00", **overrides}
    return "".join(f"{key}={value}\n" for key, value in values.items()).encode()


@pytest.mark.parametrize(("overrides", "message"), [
    ({"version": "9" * 50}, f"unsupported version {'9' * 20!r}"),
    ({"name": "b" * 200}, f"name {'b' * 80!r} does not match the file name"),
    ({"domains": "a.ch -" + "d" * 200}, f"bad domain {('-' + 'd' * 200)[:80]!r}"),
    ({"time": "t" * 100}, f"time {'t' * 40!r} is not ISO 8601"),
])
def test_a_refusal_shows_a_bounded_part_of_the_value(overrides, message):
    with pytest.raises(spool.InvalidNotification) as raised:
        spool.parse(content(**overrides), "a.ch")

    assert str(raised.value) == message


def test_a_lineage_path_may_hold_any_printable_character():
    assert spool.parse(content(lineage="/srv/XX/live/a.ch"), "a.ch").lineage == "/srv/XX/live/a.ch"


# --- temporary files of killed hooks ------------------------------------------------------------


def test_stale_temporary_files_are_those_older_than_the_limit(config_dir, monkeypatch):
    tmp = os.path.join(config_dir, "certrelay", "tmp")
    now = 2_000_000_000.0
    for name, age in (("old", 101), ("limit", 100), ("new", 99)):
        open(os.path.join(tmp, name), "w").close()
        os.utime(os.path.join(tmp, name), (now - age, now - age))
    os.mkdir(os.path.join(tmp, "old-directory"))
    os.utime(os.path.join(tmp, "old-directory"), (now - 1000, now - 1000))
    monkeypatch.setattr(spool.time, "time", lambda: now)

    assert spool.Spool(config_dir).remove_stale_temporary(max_age=100) == ["old"]
    assert sorted(os.listdir(tmp)) == ["limit", "new", "old-directory"]


def test_a_temporary_file_that_vanishes_meanwhile_is_passed_over(config_dir, monkeypatch):
    tmp = os.path.join(config_dir, "certrelay", "tmp")
    open(os.path.join(tmp, "old"), "w").close()
    os.utime(os.path.join(tmp, "old"), (1, 1))
    listdir = os.listdir
    monkeypatch.setattr(spool.os, "listdir", lambda directory: ["vanished"] + listdir(directory))

    assert spool.Spool(config_dir).remove_stale_temporary() == ["old"]


def test_stale_temporary_files_are_never_looked_for_through_a_link_nor_made(config_dir, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "tmp").mkdir(parents=True)
    (elsewhere / "tmp" / "old").write_text("x")
    os.utime(elsewhere / "tmp" / "old", (1, 1))
    root = os.path.join(config_dir, "certrelay")
    os.rmdir(os.path.join(root, "tmp"))

    assert spool.Spool(config_dir).remove_stale_temporary() == []
    assert not os.path.exists(os.path.join(root, "tmp"))
    os.rename(root, tmp_path / "aside")
    os.symlink(elsewhere, root)

    assert spool.Spool(config_dir).remove_stale_temporary() == []
    assert (elsewhere / "tmp" / "old").exists()
