"""The daemon's event handling, in-process: the inotify events that are hard to cause."""

import logging
import types

import pytest

from certrelay import cli, rules
from certrelay import watch
from tests.writeup import WRITE_UP_RULES


@pytest.fixture
def watcher(tmp_path, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    return watch.Watcher(str(tmp_path), str(tmp_path / "rules.toml"), str(tmp_path / "state"),
                         rules.parse(WRITE_UP_RULES.encode()))


def event(mask, name="", path=None):
    """An inotify event in the queue (the watched spool directory with `path`)."""
    return types.SimpleNamespace(mask=mask, name=name, path=path)


def test_queue_overflow_schedules_a_full_rescan(watcher):
    watcher.handle_event(event(watch.pyinotify.IN_Q_OVERFLOW))

    assert watcher.batch_due is not None


def test_hidden_names_are_ignored_and_visible_ones_schedule_a_batch(watcher):
    watcher.handle_event(event(watch.pyinotify.IN_MOVED_TO, ".herzbube.ch.tmp"))
    assert watcher.batch_due is None

    watcher.handle_event(event(watch.pyinotify.IN_MOVED_TO, "herzbube.ch"))
    assert watcher.batch_due is not None


def test_in_the_spool_directory_only_the_attempt_record_schedules_a_batch(watcher):
    watcher.handle_event(event(watch.pyinotify.IN_MOVED_TO, "claimed", path=watcher.spool_root))
    watcher.handle_event(event(watch.pyinotify.IN_IGNORED, path=watcher.spool_root))
    assert (watcher.batch_due, watcher.rewatch_due) == (None, None)

    watcher.handle_event(event(watch.pyinotify.IN_MOVED_TO, "attempt", path=watcher.spool_root))
    assert watcher.batch_due is not None


def test_a_lost_watch_is_renewed_at_once(watcher):
    watcher.handle_event(event(watch.pyinotify.IN_IGNORED))

    assert watcher.rewatch_due is not None


def test_settle_window_never_passes_max_wait(watcher, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(watch.time, "monotonic", lambda: clock[0])
    settings = watcher.rules.settings
    for _ in range(100):
        watcher.handle_event(event(watch.pyinotify.IN_CLOSE_WRITE, "herzbube.ch"))
        clock[0] += settings["settle"] / 2

    assert watcher.batch_due == 1000.0 + settings["max-wait"]


def test_pyinotify_log_lines_come_out_once(capsys):
    cli.setup_logging(quiet=False, verbose=False)
    watch.quiet_pyinotify()

    logging.getLogger("pyinotify").warning("watch lost")

    assert capsys.readouterr().err == "warning: watch lost\n"
