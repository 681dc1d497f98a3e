"""Pins for certrelay.verify that mutation testing (make mutants, docs/mutants.md) found
missing, for its pure parts: the hint for an unreachable endpoint, how certificates
are named in a stale-chain message, and what a certificate's subject is called."""

import datetime
import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certrelay import endpoint as endpoint_module, probe, verify


def der_of(subject, issuer=None):
    """Return the DER of a certificate with `subject` (a list of (oid, value)), signed
    by itself unless `issuer` names another."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(oid, value) for oid, value in subject])
    now = datetime.datetime.now(datetime.timezone.utc)
    built = (
        x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256())
    )
    return built.public_bytes(serialization.Encoding.DER)


def unreachable(url, failure):
    return probe.Served(endpoint_module.parse_endpoint(url), None, None, "it failed", failure=failure)


@pytest.mark.parametrize(("url", "failure", "hint"), [
    ("smtp://127.0.0.1:25", "tls", "the TLS handshake failed: does this port speak smtp:// (STARTTLS), and has the"
                                   " service a certificate and key for this name?"),
    ("https://127.0.0.1:443", "tls", "the TLS handshake failed: does this port speak https:// (TLS from the first"
                                     " byte), and has the service a certificate and key for this name?"),
    ("imap://127.0.0.1:143", "silent", "the service accepted the connection, then said nothing in time: is it"
                                       " overloaded or hung, and does it speak imap:// on this port?"),
    ("https://127.0.0.1:443", None, verify.HINTS["refused"]),
    ("https://127.0.0.1:443", "a failure no version knew", verify.HINTS["refused"]),
])
def test_the_hint_fits_the_failure_and_the_protocol(url, failure, hint):
    assert verify.hint(unreachable(url, failure)) == hint


def test_certificates_are_named_by_subject_and_a_short_fingerprint():
    first, second = der_of([(NameOID.COMMON_NAME, "R11")]), der_of([(NameOID.COMMON_NAME, "E6")])
    short = [hashlib.sha256(der).hexdigest()[:12] for der in (first, second)]

    assert verify.certificates([first, second]) == f"CN=R11 (sha256 {short[0]}), CN=E6 (sha256 {short[1]})"
    assert verify.certificates([]) == "none"


def test_a_subject_is_its_common_name_else_the_whole_name_else_said_to_be_missing():
    other = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Some Root")])

    assert verify._facts(der_of([(NameOID.COMMON_NAME, "R11")])) == ("CN=R11", True)
    assert verify._facts(der_of([(NameOID.COMMON_NAME, "R11")], issuer=other)) == ("CN=R11", False)
    assert verify._facts(der_of([(NameOID.ORGANIZATION_NAME, "Example"), (NameOID.COUNTRY_NAME, "CH")])) == (
        "C=CH,O=Example", True)
    assert verify._facts(der_of([], issuer=other)) == ("no subject", False)
    assert verify._facts(b"not DER") == ("unparsable", False)
