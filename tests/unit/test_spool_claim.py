"""Spool.claim: every queue entry moved into claimed/ and read, whatever its batch."""

import os

from certrelay import files, spool


def notification(name):
    return f"version=1\nname={name}\nlineage=/etc/letsencrypt/live/{name}\ndomains={name}\ntime=2026-11-28T10:00:00Z\n"


def test_claim_reads_ahead_a_bounded_number_and_keeps_each_entry_its_own(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "READ_AHEAD", 2)
    queue = tmp_path / "certrelay" / "queue"
    queue.mkdir(parents=True)
    names = [f"n{index}.example" for index in range(5)]
    for name in names:
        (queue / name).write_text(notification(name))
    (queue / "n2.example").write_text(notification("other.example"))  # its name inside differs
    os.mkfifo(queue / "n3.example.fifo")

    with spool.Spool(str(tmp_path)).opened(create=True) as opened:
        notifications, problems = opened.claim()

    assert sorted(n.name for n in notifications) == ["n0.example", "n1.example", "n3.example", "n4.example"]
    assert all(n.entry.startswith(n.name + "@") and n.domains == (n.name,) for n in notifications)
    assert len(problems) == 2
    assert any("'n2.example'" in problem and "does not match the file name" in problem for problem in problems)
    assert any("'n3.example.fifo'" in problem and "not a regular file" in problem for problem in problems)
