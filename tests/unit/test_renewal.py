"""renewal.py: when certbot renews a lineage, from renewal/NAME.conf (hostile input)."""

import datetime
import os

import pytest

from certrelay import renewal

DAY = 86400.0
START = datetime.datetime(2026, 1, 31, tzinfo=datetime.timezone.utc).timestamp()


def policy(text):
    return renewal.parse(text.encode(), "renewal/x.conf")


@pytest.mark.parametrize("version, days, renew_after_days", [
    ("5.8.0", 90, 60), ("4.0.0", 90, 60), ("4.0.0", 45, 30), ("5.8.0", 6, 3), ("3.3.0", 90, 60), ("2.1.0", 45, 15),
    ("3.3.0", 20, 0),
], ids=["5.8-90d", "4.0-90d", "4.0-45d", "5.8-6d-half", "3.3-90d", "2.1-45d", "3.3-20d-due-at-issue"])
def test_certbots_default_follows_the_version_that_wrote_the_file(version, days, renew_after_days):
    found = policy(f"version = {version}\narchive_dir = /etc/letsencrypt/archive/x\n[renewalparams]\nkey_type = rsa\n")

    assert found.renew_at(START, START + days * DAY) == pytest.approx(START + renew_after_days * DAY)


def test_a_margin_longer_than_the_lifetime_is_due_at_issue_not_before_it():
    # certbot renews at its first run after issue; an earlier date would be overdue at once
    assert policy("version = 2.1.0\nrenew_before_expiry = 30 days\n").renew_at(START, START + 6 * DAY) == START


def test_without_a_version_the_later_default_never_raises_a_false_alarm():
    assert policy("").renew_at(START, START + 45 * DAY) == START + 30 * DAY  # 4.0's, not 2.x's day 15


@pytest.mark.parametrize("interval, before", [
    ("30 days", 30 * DAY), ("7", 7 * DAY), ("2 weeks", 14 * DAY), ("3 days 12 hours", 3.5 * DAY),
    ("1 month", 28 * DAY), ('"10 days"', 10 * DAY),
])
def test_renew_before_expiry_wins_over_the_default(interval, before):
    found = policy(f"version = 5.8.0\nrenew_before_expiry = {interval}\n")
    end = datetime.datetime(2026, 3, 3, tzinfo=datetime.timezone.utc).timestamp()  # a calendar month before: 3 Feb

    assert found.renew_at(START, end) == end - before


def test_autorenew_false_is_never_due_and_only_in_renewalparams_counts():
    assert policy("version = 5.8.0\n[renewalparams]\nautorenew = False\n").renew_at(START, START + 90 * DAY) is None
    assert policy("autorenew = False\n[renewalparams]\n").autorenew  # top level: not certbot's key
    assert policy("[renewalparams]\nautorenew = True\n[[webroot_map]]\nautorenew = False\n").autorenew


@pytest.mark.parametrize("text, says", [
    ("renew_before_expiry = soon\n", "renewal/x.conf:1: renew_before_expiry = 'soon' is not an interval"),
    ("renew_before_expiry = 30 days and then some\n", "renewal/x.conf:1: renew_before_expiry"),
    ("version = 5.8.0\n[renewalparams]\nautorenew = maybe\n", "renewal/x.conf:3: autorenew = 'maybe' is not True"),
    ("version = five\n", "renewal/x.conf:1: version = 'five' is not a certbot version"),
    ("version = 5.8.0\n$(touch /tmp/pwned)\n", "renewal/x.conf:2: not a `key = value` line"),
])
def test_what_certrelay_cannot_read_is_an_error_naming_the_line(text, says):
    with pytest.raises(renewal.PolicyError) as raised:
        policy(text)

    assert says in str(raised.value)


def test_bytes_that_are_not_utf8_are_an_error():
    with pytest.raises(renewal.PolicyError, match="not UTF-8"):
        renewal.parse(b"version = 5.8.0\n\xff\n", "renewal/x.conf")


def test_read_refuses_a_link_out_of_the_config_dir_and_a_huge_file(tmp_path):
    (tmp_path / "renewal").mkdir()
    os.symlink("/etc/passwd", tmp_path / "renewal" / "out.conf")
    (tmp_path / "renewal" / "huge.conf").write_text("# x\n" * 20000)

    with pytest.raises(renewal.PolicyError, match="leading out|leads out"):
        renewal.read(str(tmp_path), "out")
    with pytest.raises(renewal.PolicyError, match="larger than"):
        renewal.read(str(tmp_path), "huge")
    with pytest.raises(renewal.PolicyError, match="renewal/gone.conf"):
        renewal.read(str(tmp_path), "gone")
