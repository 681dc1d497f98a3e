"""Unit tests for certrelay.spool.parse: hostile content is refused."""


import pytest

from certrelay import spool

TIME = "2024-05-01T03:04:05+00:00"


def content(**overrides):
    """Return the bytes of a valid notification for herzbube.ch, with keys replaced.

    A value of None leaves the key out; keys are written in the hook's order.
    """
    values = {
        "version": "1",
        "name": "herzbube.ch",
        "lineage": "/etc/letsencrypt/live/herzbube.ch",
        "domains": "herzbube.ch *.herzbube.ch",
        "time": TIME,
    }
    values.update({key.replace("_", "-"): value for key, value in overrides.items()})
    return "".join(f"{key}={value}\n" for key, value in values.items() if value is not None).encode("utf-8")


def refusal(data, name="herzbube.ch"):
    """Return the message parse refuses `data` with; fail if it accepts it."""
    with pytest.raises(spool.InvalidNotification) as caught:
        spool.parse(data, name)
    return str(caught.value)


# --- parse ----------------------------------------------------------------------------


def test_valid_notification_is_parsed():
    notification = spool.parse(content(), "herzbube.ch", "herzbube.ch@1714532645000000000")

    assert notification == spool.Notification(
        entry="herzbube.ch@1714532645000000000",
        name="herzbube.ch",
        lineage="/etc/letsencrypt/live/herzbube.ch",
        domains=("herzbube.ch", "*.herzbube.ch"),
        time=TIME,
    )


def test_entry_defaults_to_the_name():
    assert spool.parse(content(), "herzbube.ch").entry == "herzbube.ch"


@pytest.mark.parametrize(
    "data",
    [
        content() + b"\n\n",
        b"\n" + content(),
        content().replace(b"\n", b"\n\n"),
        content().rstrip(b"\n"),  # no newline after the last line
    ],
    ids=["trailing", "leading", "between", "no-final-newline"],
)
def test_empty_lines_are_ignored(data):
    notification = spool.parse(data, "herzbube.ch")

    assert notification.domains == ("herzbube.ch", "*.herzbube.ch")
    assert notification.time == TIME


@pytest.mark.parametrize(
    "extra",
    [b"certbot=5.8.0\n", b"future-key=whatever=it takes\n", b"x=\n", b"comment=;rm -rf / $(x)\n"],
)
def test_unknown_keys_are_ignored(extra):
    notification = spool.parse(extra + content() + extra.replace(b"=", b"2=", 1), "herzbube.ch")

    assert notification == spool.parse(content(), "herzbube.ch")


def test_value_may_contain_equals_signs():
    notification = spool.parse(content(lineage="/srv/a=b/live/herzbube.ch"), "herzbube.ch")

    assert notification.lineage == "/srv/a=b/live/herzbube.ch"


@pytest.mark.parametrize(
    "domains, expected",
    [
        ("herzbube.ch", ("herzbube.ch",)),
        ("herzbube.ch  *.herzbube.ch\tmail.ch", ("herzbube.ch", "*.herzbube.ch", "mail.ch")),
        ("xn--grzi-ira.ch _dmarc.herzbube.ch", ("xn--grzi-ira.ch", "_dmarc.herzbube.ch")),
    ],
)
def test_domains_are_split_on_whitespace(domains, expected):
    assert spool.parse(content(domains=domains), "herzbube.ch").domains == expected


@pytest.mark.parametrize("key", spool.REQUIRED_KEYS)
def test_missing_key_is_refused_by_name(key):
    assert refusal(content(**{key: None})) == f"missing {key}"


def test_every_missing_key_is_named():
    assert refusal(b"version=1\n") == "missing name, lineage, domains, time"


@pytest.mark.parametrize("version", ["2", "", "1.0", "01", " 1", "1 "])
def test_version_other_than_1_is_refused(version):
    assert "unsupported version" in refusal(content(version=version))


@pytest.mark.parametrize("inside", ["moser-naef.ch", "herzbube.ch-0001", "", "Herzbube.ch", "herzbube.ch "])
def test_name_inside_that_differs_from_the_file_name_is_refused(inside):
    assert "does not match the file name" in refusal(content(name=inside))


@pytest.mark.parametrize("key", ["version", "name", "domains", "certbot"])
def test_key_given_twice_is_refused_even_if_unknown(key):
    data = b"certbot=5.8.0\n" + content() + f"{key}=again\n".encode()

    assert refusal(data) == f"line 7: key {key!r} given twice"


@pytest.mark.parametrize("line", [b"garbage", b"=herzbube.ch", b"version 1", b"\r"])
def test_line_that_is_not_key_equals_value_is_refused_with_its_number(line):
    data = content().replace(b"lineage=", line + b"\nlineage=")

    assert refusal(data) == "line 3: not a key=value line"


@pytest.mark.parametrize(
    "data",
    [
        content(lineage="/etc/letsencrypt/live/caf\xe9").replace("é".encode(), b"\xe9"),
        b"\xff\xfe" + content(),
        content() + b"x=\xc3\x28\n",
    ],
)
def test_content_that_is_not_utf8_is_refused(data):
    assert refusal(data) == "not UTF-8 text"


def test_content_of_exactly_64_kib_is_accepted():
    data = content()
    data += b"padding=" + b"x" * (spool.MAX_SIZE - len(data) - len(b"padding=\n")) + b"\n"
    assert len(data) == 64 * 1024

    assert spool.parse(data, "herzbube.ch").name == "herzbube.ch"


def test_content_over_64_kib_is_refused():
    data = content()
    data += b"padding=" + b"x" * (spool.MAX_SIZE + 1 - len(data) - len(b"padding=\n")) + b"\n"
    assert len(data) == 64 * 1024 + 1

    assert refusal(data) == "larger than 65536 bytes"


@pytest.mark.parametrize(
    "domains",
    [
        "a;rm -rf /",
        "$(x)",
        "herzbube.ch $(touch /tmp/owned)",
        "`id`",
        "herzbube.ch/../..",
        "herzbube.ch,moser-naef.ch",
        "a|b",
        "caf\u00e9.ch",
        "x" * 254,
    ],
)
def test_bad_domain_is_refused(domains):
    assert "bad domain" in refusal(content(domains=domains))


@pytest.mark.parametrize("domains", ["-rf", "--help", "-.herzbube.ch"])
def test_domain_starting_with_a_dash_is_refused_so_it_cannot_become_an_option(domains):
    # No DNS label starts with '-'; {domains} of a `run` command would pass it as an option.
    assert "bad domain" in refusal(content(domains=domains))


@pytest.mark.parametrize(
    "time", ["yesterday", "", "2024-13-01T00:00:00", "1714532645", "2024-05-01T03:04:05+25:00"]
)
def test_time_that_is_not_iso_8601_is_refused(time):
    assert "is not ISO 8601" in refusal(content(time=time))


@pytest.mark.parametrize("time", ["2024-05-01T03:04:05+00:00", "2024-05-01T03:04:05", "2024-05-01"])
def test_iso_8601_time_is_kept_as_written(time):
    assert spool.parse(content(time=time), "herzbube.ch").time == time


@pytest.mark.parametrize("character", ["\r", "\0"])
def test_lineage_with_a_control_character_is_refused(character):
    assert refusal(content(lineage=f"/etc/letsencrypt/live/herzbube.ch{character}")) == (
        "lineage has a control character"
    )
