"""What a certificate says, its cache, thresholds and durations (certrelay.certinfo)."""

import datetime
import hashlib
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import types
import warnings

import pytest

from certrelay import certinfo, durations
from certrelay.certinfo import CertInfo, CertificateParseError
from certrelay.durations import Threshold

REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOW = 1764300000  # 2025-11-28 03:20:00 UTC
DAY = 86400


def make_certificate(not_before, not_after, domains=("example.org", "*.example.org"), common_name=None, serial=0xABCDE):
    """Return (PEM bytes, DER bytes) of a self-signed certificate; `domains` go in the
    subjectAltName (none: no extension), `common_name` in the subject."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name or domains[0])])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(datetime.datetime.fromtimestamp(not_before, datetime.timezone.utc))
        .not_valid_after(datetime.datetime.fromtimestamp(not_after, datetime.timezone.utc))
    )
    if domains:
        names = [x509.DNSName(domain) for domain in domains]
        names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))  # not a domain
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    certificate = builder.sign(key, hashes.SHA256())
    return (
        certificate.public_bytes(serialization.Encoding.PEM),
        certificate.public_bytes(serialization.Encoding.DER),
    )


@pytest.fixture(scope="module")
def ninety_days():
    """90 days long, 5 left."""
    return make_certificate(NOW - 85 * DAY, NOW + 5 * DAY)


@pytest.fixture(scope="module")
def six_days():
    """6 days long (Let's Encrypt's short-lived profile), 4 left."""
    return make_certificate(NOW - 2 * DAY, NOW + 4 * DAY, domains=("short.example.org",), serial=1)


@pytest.fixture(scope="module")
def expired():
    return make_certificate(NOW - 91 * DAY, NOW - DAY, domains=("old.example.org",))


@pytest.fixture(scope="module")
def common_name_only():
    return make_certificate(NOW - DAY, NOW + 89 * DAY, domains=(), common_name="cn.example.org")


def info(days_total=90, days_left=5):
    """A CertInfo with that lifetime and that much left at NOW."""
    return CertInfo("0" * 64, "01", NOW - (days_total - days_left) * DAY, NOW + days_left * DAY, ("x.org",))


# --- parsing ----------------------------------------------------------------------


def test_from_pem_reads_the_fields(ninety_days):
    pem, der = ninety_days

    parsed = certinfo.from_pem(pem)

    assert parsed == CertInfo(
        sha256=hashlib.sha256(der).hexdigest(),
        serial="0ABCDE",
        not_before=float(NOW - 85 * DAY),
        not_after=float(NOW + 5 * DAY),
        domains=("example.org", "*.example.org"),
    )
    assert parsed.lifetime == 90 * DAY
    assert parsed.left(NOW) == 5 * DAY
    assert parsed.days_left(NOW) == 5.0
    assert parsed.fraction_left(NOW) == pytest.approx(5 / 90)


@pytest.mark.skipif(not shutil.which("openssl"), reason="needs openssl")
def test_serial_and_fingerprint_match_openssl(ninety_days, six_days):
    for pem, _ in (ninety_days, six_days):
        output = subprocess.run(
            ["openssl", "x509", "-noout", "-serial", "-fingerprint", "-sha256"],
            input=pem, capture_output=True, check=True,
        ).stdout.decode()
        parsed = certinfo.from_pem(pem)
        assert f"serial={parsed.serial}\n" in output
        assert parsed.sha256.upper() in output.replace(":", "")


def test_a_short_lived_certificate(six_days):
    parsed = certinfo.from_pem(six_days[0])

    assert parsed.lifetime == 6 * DAY
    assert parsed.days_left(NOW) == 4.0
    assert parsed.fraction_left(NOW) == pytest.approx(4 / 6)
    assert parsed.serial == "01"
    assert parsed.domains == ("short.example.org",)


def test_an_expired_certificate_has_negative_time_left(expired):
    parsed = certinfo.from_pem(expired[0])

    assert parsed.expired(NOW)
    assert parsed.left(NOW) == -DAY
    assert parsed.days_left(NOW) == -1.0
    assert parsed.fraction_left(NOW) == pytest.approx(-1 / 90)


def test_without_subject_alt_name_the_domain_is_the_common_name(common_name_only):
    assert certinfo.from_pem(common_name_only[0]).domains == ("cn.example.org",)


def test_from_der_and_from_pem_agree_and_pem_may_be_text(ninety_days):
    pem, der = ninety_days

    assert certinfo.from_der(der) == certinfo.from_pem(pem) == certinfo.from_pem(pem.decode("ascii"))


def test_from_pem_reads_the_first_certificate_of_a_chain_with_a_key_before_it(ninety_days, six_days):
    data = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n" + six_days[0] + ninety_days[0]

    assert certinfo.from_pem(data).serial == "01"


def test_parsing_warns_about_nothing(ninety_days):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cryptography >= 42 warns on naive dates
        certinfo.from_der(ninety_days[1])


def test_epoch_reads_the_naive_dates_of_cryptography_38():
    old_style = types.SimpleNamespace(not_valid_after=datetime.datetime(2025, 11, 28, 3, 20))

    assert certinfo.epoch(old_style, "not_valid_after") == NOW


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "no PEM certificate"),
        (b"just text", "no PEM certificate"),
        (b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n", "base64"),
        (b"-----BEGIN CERTIFICATE-----\n\n-----END CERTIFICATE-----\n", "empty"),
        (b"-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n", "not a readable X.509"),
    ],
)
def test_what_is_not_a_certificate_raises_certificate_parse_error(data, message):
    with pytest.raises(CertificateParseError, match=message):
        certinfo.from_pem(data)


def reference_der_from_pem(data):
    """The regular-expression reading der_from_pem replaced: what it must still do."""
    import base64
    import re

    found = re.search(rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", data, re.DOTALL)
    if not found:
        return "no PEM certificate (-----BEGIN CERTIFICATE-----) found"
    try:
        der = base64.b64decode(re.sub(rb"\s+", b"", found.group(1)), validate=True)
    except ValueError as error:
        return f"the PEM certificate is not valid base64: {error}"
    return der or "the PEM certificate block is empty"


@pytest.mark.parametrize("body", [
    b"\naGVs\r\nbG8=\n", b" aGVs\tbG8=\x0b\x0c", b"\naGVsbG8\n", b"\naGVs=bG8=\n", b"\n=aGVsbG8\n",
    b"\naGVsbG8=a\n", b"\naGVs\xa0bG8=\n", b"\naGVs-bG8=\n", b"\n\n", b"",
])
@pytest.mark.parametrize("before, after", [
    (b"", b""), (b"key\n", b"\n-----END CERTIFICATE-----\n"), (b"-----BEGIN CERTIFICATE-----\n", b""),
])
def test_der_from_pem_reads_as_the_regular_expression_did(before, body, after):
    data = before + b"-----BEGIN CERTIFICATE-----" + body + b"-----END CERTIFICATE-----" + after
    for pem in (data, data.replace(b"-----END CERTIFICATE-----", b"", 1)):
        expected = reference_der_from_pem(pem)
        try:
            result = certinfo.der_from_pem(pem)
        except CertificateParseError as error:
            result = str(error)
        assert result == expected


def test_truncated_der_raises_certificate_parse_error(ninety_days):
    with pytest.raises(CertificateParseError):
        certinfo.from_der(ninety_days[1][:100])


def test_an_unknown_x509_version_raises_certificate_parse_error(ninety_days):
    version_3 = b"\xa0\x03\x02\x01\x02"  # [0] EXPLICIT INTEGER 2, in the TBSCertificate
    assert version_3 in ninety_days[1]

    with pytest.raises(CertificateParseError, match="not a readable X.509 certificate"):
        certinfo.from_der(ninety_days[1].replace(version_3, b"\xa0\x03\x02\x01\x07", 1))


def test_json_round_trip(ninety_days):
    parsed = certinfo.from_pem(ninety_days[0])

    assert CertInfo.from_json(json.loads(json.dumps(parsed.to_json()))) == parsed


@pytest.mark.parametrize(
    "data", [{}, {"sha256": "a", "serial": "01", "not_before": "x", "not_after": 1, "domains": []},
             {"sha256": 1, "serial": "01", "not_before": 0, "not_after": 1, "domains": []},
             {"sha256": "a", "serial": "01", "not_before": 0, "not_after": 1, "domains": "abc"}, []],
)
def test_from_json_refuses_what_it_did_not_write(data):
    with pytest.raises(ValueError):
        CertInfo.from_json(data)


@pytest.mark.parametrize("module", ["certinfo", "metrics", "report"])
def test_importing_does_not_import_cryptography(module):
    code = f"import sys, certrelay.{module}; print('cryptography' in sys.modules)"
    output = subprocess.run([sys.executable, "-c", code], cwd=REPOSITORY, capture_output=True, check=True, text=True)

    assert output.stdout == "False\n"


# --- levels -----------------------------------------------------------------------

FIFTH, TENTH = Threshold(fraction=0.2), Threshold(fraction=0.1)
EIGHTEEN_DAYS, NINE_DAYS = Threshold(duration=18 * DAY), Threshold(duration=9 * DAY)


@pytest.mark.parametrize("warning, critical", [(FIFTH, TENTH), (EIGHTEEN_DAYS, NINE_DAYS)])
@pytest.mark.parametrize(
    "seconds_left, expected",
    [
        (30 * DAY, "ok"),
        (18 * DAY + 1, "ok"),
        (18 * DAY, "ok"),  # at the threshold: not yet below it
        (18 * DAY - 1, "warning"),
        (9 * DAY + 1, "warning"),
        (9 * DAY, "warning"),
        (9 * DAY - 1, "critical"),
        (1, "critical"),
        (-1, "critical"),
    ],
)
def test_level_at_and_around_the_thresholds_of_a_90_day_certificate(warning, critical, seconds_left, expected):
    certificate = CertInfo("0" * 64, "01", NOW + seconds_left - 90 * DAY, NOW + seconds_left)

    assert durations.level(certificate, NOW, warning, critical) == expected
    assert (NOW <= durations.ok_until(certificate, warning, critical)) == (expected == "ok")


def test_fractions_scale_with_the_lifetime_and_durations_do_not(six_days):
    short = certinfo.from_pem(six_days[0])  # 4 of 6 days left

    assert durations.level(short, NOW, FIFTH, TENTH) == "ok"
    assert durations.level(short, NOW, EIGHTEEN_DAYS, NINE_DAYS) == "critical"
    assert durations.level(short, NOW + 3 * DAY, FIFTH, TENTH) == "warning"  # 1 day: 1/6 left
    assert durations.level(short, NOW + 3.5 * DAY, FIFTH, TENTH) == "critical"  # 1/12 left
    # A fraction against a duration: whichever leaves "ok" first counts.
    assert durations.ok_until(short, FIFTH, NINE_DAYS) == short.not_after - 9 * DAY
    assert durations.ok_until(short, EIGHTEEN_DAYS, TENTH) == short.not_after - 18 * DAY


def test_expired_is_critical_even_with_zero_thresholds(expired):
    zero = Threshold(duration=0.0)

    assert durations.level(certinfo.from_pem(expired[0]), NOW, zero, zero) == "critical"
    assert durations.level(info(days_left=1), NOW, zero, zero) == "ok"


def test_the_real_certificates_levels(ninety_days, expired):
    assert durations.level(certinfo.from_pem(ninety_days[0]), NOW, FIFTH, TENTH) == "critical"
    assert durations.level(certinfo.from_pem(ninety_days[0]), NOW - 5 * DAY, FIFTH, TENTH) == "warning"
    assert durations.level(certinfo.from_pem(expired[0]), NOW, FIFTH, TENTH) == "critical"


# --- thresholds -------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, seconds",
    [
        (0.2, 0.2 * 90 * DAY), (0.5, 45 * DAY), (0.001, 0.001 * 90 * DAY),
        ("18d", 18 * DAY), ("1w 2d", 9 * DAY), ("36h", 1.5 * DAY),
    ],
)
def test_parse_threshold(value, seconds):
    assert durations.parse_threshold(value).seconds(90 * DAY) == pytest.approx(seconds)


def test_threshold_kinds_and_text():
    assert durations.parse_threshold(0.2) == Threshold(fraction=0.2)
    assert durations.parse_threshold("18d") == Threshold(duration=18 * DAY)
    assert str(Threshold(fraction=0.2)) == "0.2 of the lifetime"
    assert str(Threshold(duration=18 * DAY)) == "18d"


@pytest.mark.parametrize(
    "value, message",
    [
        (0, "between 0 and 1"), (1, "between 0 and 1"), (1.5, "between 0 and 1"), (-0.1, "between 0 and 1"),
        (True, "fraction"), ("0.2", "no unit"), ("20", "no unit"), ("20x", "unknown unit 'x'"), ("", "empty"),
        (None, "duration"),
    ],
)
def test_parse_threshold_refuses(value, message):
    with pytest.raises(ValueError, match=message):
        durations.parse_threshold(value)


# --- durations --------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, seconds",
    [
        (0, 0.0), (90, 90.0), (1.5, 1.5), ("90", 90.0), ("2.5", 2.5),
        ("90s", 90.0), ("1sec", 1.0), ("1second", 1.0), ("2seconds", 2.0),
        ("15min", 900.0), ("15m", 900.0), ("1minute", 60.0), ("2minutes", 120.0),
        ("1h", 3600.0), ("1hr", 3600.0), ("1hour", 3600.0), ("2hours", 7200.0), ("1.5h", 5400.0), (".5h", 1800.0),
        ("20d", 20 * DAY), ("1day", DAY), ("2days", 2 * DAY),
        ("2w", 14 * DAY), ("1week", 7 * DAY), ("2weeks", 14 * DAY),
        ("1M", 30.44 * DAY), ("1month", 30.44 * DAY), ("2months", 60.88 * DAY),
        ("1y", 365.25 * DAY), ("1year", 365.25 * DAY), ("2years", 730.5 * DAY),
        ("500ms", 0.5), ("1msec", 0.001), ("250us", 0.00025), ("1usec", 0.000001), ("1μs", 0.000001),
        ("1h 30min", 5400.0), ("1h30min", 5400.0), ("  1d  12h ", 1.5 * DAY), ("5 min", 300.0),
        ("1w2d3h4m5s", 788645.0),
    ],
)
def test_parse_duration(value, seconds):
    assert durations.parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value, message",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("1x", "unknown unit 'x' in '1x'"),
        ("1h 30", "no unit in '30'"),
        ("5 parsecs", "unknown unit 'parsecs'"),
        ("-5s", "cannot read '-5s'"),
        ("abc", "cannot read 'abc'"),
        ("1h abc", "cannot read 'abc'"),
        ("1H", "unknown unit 'H'"),
        (-1, "non-negative"),
        (float("nan"), "non-negative"),
        (float("inf"), "non-negative"),
        (True, "expected a number"),
        (None, "expected a number"),
        ([1], "expected a number"),
    ],
)
def test_parse_duration_refuses_naming_the_bad_part(value, message):
    with pytest.raises(ValueError, match=message) as raised:
        durations.parse_duration(value)
    if isinstance(value, str) and value.strip():
        assert "min" in str(raised.value) and "M/month" in str(raised.value)  # the units accepted


def test_missing_cryptography_is_a_parse_error_that_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cryptography", None)  # import fails as if not installed
    monkeypatch.setattr(certinfo, "_x509", None)  # forget an import done by an earlier test

    with pytest.raises(CertificateParseError, match="apt-get install python3-cryptography"):
        certinfo.from_der(b"\x30\x00")
