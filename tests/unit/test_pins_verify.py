"""Pins for certrelay.verify that mutation testing (make mutants, docs/mutants.md) found
missing, for its pure parts: the hint for an unreachable endpoint, how certificates
are named in a stale-chain message, and what a certificate's subject is called."""

import datetime
import hashlib
import logging
import os
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certrelay import certificate, endpoint as endpoint_module, execute, plan, probe, rules, verify


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
    # the common name alone, though the subject has more (an intermediate's usually has)
    assert verify._facts(der_of([(NameOID.COUNTRY_NAME, "US"), (NameOID.ORGANIZATION_NAME, "Let's Encrypt"),
                                 (NameOID.COMMON_NAME, "R11")], issuer=other)) == ("CN=R11", False)
    assert verify._facts(der_of([], issuer=other)) == ("no subject", False)
    assert verify._facts(b"not DER") == ("unparsable", False)


# --- reading chain.pem, summaries, stale chains, expiry -------------------------------------------


def pem(der):
    return ssl.DER_cert_to_PEM_cert(der).encode()


def test_pem_certificates_are_the_blocks_in_order_and_an_unfinished_one_is_passed_over():
    first, second = der_of([(NameOID.COMMON_NAME, "one")]), der_of([(NameOID.COMMON_NAME, "two")])

    assert verify.pem_certificates(b"junk\n" + pem(first) + b"between\n" + pem(second)) == [first, second]
    assert verify.pem_certificates(pem(first) + b"-----BEGIN CERTIFICATE-----\nAAAA\n") == [first]
    assert verify.pem_certificates(b"") == []


def test_a_summary_is_the_serial_and_the_day_of_expiry():
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a.ch")])
    built = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(0x1234).not_valid_before(datetime.datetime(2020, 1, 1))
        .not_valid_after(datetime.datetime(2031, 5, 17, 12)).sign(key, hashes.SHA256())
    )

    assert verify.summary(built.public_bytes(serialization.Encoding.DER)) == "serial 1234, expires 2031-05-17"


@pytest.fixture
def lineage(tmp_path):
    """(config dir, parts of lineage a.ch issued by the intermediate R11, the DER of R11's certificate)."""
    from tests import certs

    intermediate = certs.Authority("R11", certs.Authority("Root X1"))
    parts = certs.renew_with_chain(str(tmp_path), "a.ch", intermediate)
    return str(tmp_path), parts, ssl.PEM_cert_to_DER_cert(intermediate.pem.decode())


def test_the_leaf_itself_is_never_an_intermediate_sent_or_wanted(lineage):
    config_dir, parts, r11 = lineage
    leaf = ssl.PEM_cert_to_DER_cert(parts["cert"].decode())
    endpoint = endpoint_module.parse_endpoint("tls://127.0.0.1:1")

    sent_again = probe.Served(endpoint, None, leaf, None, chain=(leaf, r11))
    assert verify.Fingerprints(config_dir).stale_chain("a.ch", sent_again) is None
    with open(os.path.join(config_dir, "live", "a.ch", "chain.pem"), "wb") as file:
        file.write(parts["cert"] + parts["chain"])
    in_chain_pem = probe.Served(endpoint, None, leaf, None, chain=(r11,))
    assert verify.Fingerprints(config_dir).stale_chain("a.ch", in_chain_pem) is None


def test_a_lineage_without_chain_pem_is_not_compared_and_says_why_in_the_debug_log(lineage, caplog):
    config_dir, parts, _ = lineage
    os.unlink(os.path.join(config_dir, "live", "a.ch", "chain.pem"))
    with pytest.raises(certificate.CertificateError) as raised:
        certificate.read_beneath(config_dir, "live/a.ch/chain.pem", certificate.MAX_CERTIFICATE)
    caplog.set_level(logging.DEBUG, logger="certrelay.verify")

    assert verify.Fingerprints(config_dir).live_chain("a.ch") is None

    assert [record.getMessage() for record in caplog.records] == [
        f"not comparing the chains served for a.ch: {raised.value}"]


def test_an_expiry_alarm_only_for_a_certificate_close_to_expiry(lineage, tmp_path, caplog):
    from tests import certs

    settings = rules.parse(b'[[rule]]\nmatch = ["*"]\nreload = ["x"]\n', "rules.toml").settings
    check = plan.Check("a.ch", endpoint_module.parse_endpoint("tls://127.0.0.1:1"), None, (), True, frozenset())
    fresh, _ = certs.make_certificate(["a.ch"])
    old, _ = certs.make_certificate(["a.ch"], days=90, age_days=88)
    caplog.set_level(logging.DEBUG, logger="certrelay.verify")

    for pem_data in (fresh, old):
        der = ssl.PEM_cert_to_DER_cert(pem_data.decode())
        verify.expiry_alarm(verify.Verdict(check, "current", probe.Served(check.endpoint, None, der, None)), settings)

    [alarm] = [record.getMessage() for record in caplog.records]
    assert alarm.startswith("tls://127.0.0.1:1 serves a certificate that expires in 2.0 days (critical)")


def test_after_a_batch_each_verdict_is_logged_once(lineage, monkeypatch, caplog):
    config_dir, parts, r11 = lineage
    leaf = ssl.PEM_cert_to_DER_cert(parts["cert"].decode())
    check = plan.Check("a.ch", endpoint_module.parse_endpoint("tls://127.0.0.1:1"), None, (), True, frozenset())
    monkeypatch.setattr(probe, "fetch_many", lambda targets, timeout: [
        probe.Served(check.endpoint, None, leaf, None, chain=(r11,)) for _ in targets])
    settings = rules.parse(b'[[rule]]\nmatch = ["*"]\nreload = ["x"]\n', "rules.toml").settings
    caplog.set_level(logging.INFO, logger="certrelay.verify")

    verdicts, restarted = verify.verify_and_escalate([check], config_dir, settings, {})

    assert [verdict.outcome for verdict in verdicts] == ["current"] and restarted == {}
    assert [record.getMessage() for record in caplog.records] == [f"verified: {verdicts[0].describe()}"]


@pytest.fixture
def escalation(lineage, monkeypatch, caplog):
    """run(done_verbs, restart): verify_and_escalate of a.ch, whose rule reloads x.service, at
    an endpoint that sends the leaf without its intermediate until x.service restarts
    (`restart`: the execute.Result of that restart).
    Return (verdicts, restarted, systemctl calls, log lines)."""
    config_dir, parts, r11 = lineage
    leaf = ssl.PEM_cert_to_DER_cert(parts["cert"].decode())
    check = plan.Check("a.ch", endpoint_module.parse_endpoint("tls://127.0.0.1:1"), None, (("reload", "x.service"),),
                       True, frozenset())
    calls, result = [], []

    def systemctl(verb, unit, timeout):
        calls.append((verb, unit, timeout))
        return result[0]

    monkeypatch.setattr(verify.execute, "systemctl", systemctl)
    monkeypatch.setattr(probe, "fetch_many", lambda targets, timeout: [
        probe.Served(check.endpoint, None, leaf, None, chain=(r11,) if calls else ()) for _ in targets])
    parsed = rules.parse(b'[[rule]]\nmatch = ["*"]\nreload = ["x"]\n', "rules.toml").settings
    settings = {**parsed, "verify-timeout": 0}  # one probe round each
    caplog.set_level(logging.INFO, logger="certrelay.verify")

    def run(done_verbs, restart=execute.Result(True)):
        result.append(restart)
        verdicts, restarted = verify.verify_and_escalate([check], config_dir, settings, done_verbs)
        return verdicts, restarted, calls, [record.getMessage() for record in caplog.records]

    return run


@pytest.mark.parametrize("done_verbs", [{}, {"x.service": "reload"}], ids=["reloaded-earlier", "reloaded-now"])
def test_a_stale_chain_after_a_reload_is_escalated_to_one_restart_within_the_timeout(escalation, lineage, done_verbs):
    r11 = lineage[2]
    verdicts, restarted, calls, said = escalation(done_verbs)

    assert [verdict.outcome for verdict in verdicts] == ["current"]
    assert restarted == {"x.service": execute.Result(True)} and calls == [("restart", "x.service", 120.0)]  # "timeout"
    assert said[0].startswith("tls://127.0.0.1:1 serves the current certificate of a.ch (serial ")
    assert said[0].endswith(" with a stale chain (intermediates served: none; chain.pem: CN=R11 (sha256 "
                            f"{hashlib.sha256(r11).hexdigest()[:12]})): reload or restart x.service so"
                            " that it reads chain.pem or fullchain.pem again, not a copy of an old one [x.service]"
                            " after a reload: escalating to a restart")
    assert said[1:] == ["done: restart x.service (a.ch)", f"verified: {verdicts[0].describe()}"]


def test_a_unit_restarted_in_this_batch_is_not_restarted_again(escalation):
    verdicts, restarted, calls, said = escalation({"x.service": "restart"})

    assert [verdict.outcome for verdict in verdicts] == ["chain"] and restarted == {} and calls == []


def test_after_a_batch_a_served_certificate_close_to_expiry_is_alarmed(tmp_path, monkeypatch, caplog):
    from tests import certs

    der = ssl.PEM_cert_to_DER_cert(certs.renew(str(tmp_path), "b.ch", days=90, age_days=88).decode())
    check = plan.Check("b.ch", endpoint_module.parse_endpoint("tls://127.0.0.1:1"), None, (), True, frozenset())
    monkeypatch.setattr(probe, "fetch_many", lambda targets, timeout: [
        probe.Served(check.endpoint, None, der, None) for _ in targets])
    settings = rules.parse(b'[[rule]]\nmatch = ["*"]\nreload = ["x"]\n', "rules.toml").settings
    caplog.set_level(logging.INFO, logger="certrelay.verify")

    verdicts, _ = verify.verify_and_escalate([check], str(tmp_path), settings, {})

    assert [verdict.outcome for verdict in verdicts] == ["current"]
    assert caplog.records[-1].getMessage().startswith(
        "tls://127.0.0.1:1 serves a certificate that expires in 2.0 days (critical)")


def test_a_failed_escalation_restart_is_an_error_naming_unit_lineage_and_why(escalation, caplog):
    failed = execute.Result(False, "exit status 1")

    verdicts, restarted, calls, said = escalation({}, failed)

    assert restarted == {"x.service": failed}
    error = [record for record in caplog.records if record.levelno == logging.ERROR][0]
    assert error.getMessage() == "failed: restart x.service (a.ch): exit status 1"


def test_checks_not_escalated_keep_their_verdict_beside_one_that_was(escalation, lineage, monkeypatch):
    _, parts, r11 = lineage
    leaf = ssl.PEM_cert_to_DER_cert(parts["cert"].decode())
    other = plan.Check("a.ch", endpoint_module.parse_endpoint("tls://127.0.0.1:2"), None, (), True, frozenset())
    fetch = probe.fetch_many

    def fetch_many(targets, timeout):  # 127.0.0.1:2 serves leaf and chain: current from the start
        return [probe.Served(endpoint, None, leaf, None, chain=(r11,)) if endpoint.port == 2 else served
                for (endpoint, _), served in zip(targets, fetch(targets, timeout))]

    monkeypatch.setattr(probe, "fetch_many", fetch_many)
    real = verify.verify_and_escalate
    monkeypatch.setattr(verify, "verify_and_escalate", lambda checks, *rest: real([*checks, other], *rest))

    verdicts, restarted, calls, _ = escalation({})

    assert [(verdict.check.endpoint.port, verdict.outcome) for verdict in verdicts] == [(1, "current"), (2, "current")]
    assert list(restarted) == ["x.service"]


def describe(lineage, outcome, units=(), server_name=None, **fields):
    _, parts, _ = lineage
    leaf = ssl.PEM_cert_to_DER_cert(parts["cert"].decode())
    check = plan.Check("a.ch", endpoint_module.parse_endpoint("tls://127.0.0.1:1"), server_name, units, True,
                       frozenset())
    return verify.Verdict(check, outcome, probe.Served(check.endpoint, None, leaf, None), **fields).describe(), \
        verify.summary(leaf)


def test_a_verdict_names_sni_and_units_only_when_there_are_some(lineage):
    line, served = describe(lineage, "current")
    assert line == f"tls://127.0.0.1:1 serves the current certificate of a.ch ({served})"

    line, _ = describe(lineage, "current", (("reload", "a.service"), ("restart", "b.service")), "www.a.ch")
    assert line == f"tls://127.0.0.1:1 (SNI www.a.ch) serves the current certificate of a.ch ({served}) [a.service, b.service]"


def test_a_stale_chain_without_units_says_to_reload_the_service(lineage):
    r11 = lineage[2]
    line, served = describe(lineage, "chain", chain=((), (r11,)))

    assert line == (f"tls://127.0.0.1:1 serves the current certificate of a.ch ({served}) with a stale chain"
                    f" (intermediates served: none; chain.pem: {verify.certificates([r11])}): reload or restart the"
                    " service so that it reads chain.pem or fullchain.pem again, not a copy of an old one")


def test_an_old_certificate_without_the_live_ones_summary_says_just_that(lineage):
    line, served = describe(lineage, "old")

    start = f"tls://127.0.0.1:1 still serves an OLD certificate of a.ch ({served}), not the live one"
    assert line.startswith(start) and line[len(start):][:2] in ("", ": ")  # no summary of the live one


def test_a_verdict_logged_without_settings_is_one_line_and_no_expiry_check(lineage, caplog):
    _, parts, _ = lineage
    leaf = ssl.PEM_cert_to_DER_cert(parts["cert"].decode())
    check = plan.Check("a.ch", endpoint_module.parse_endpoint("tls://127.0.0.1:1"), None, (), True, frozenset())
    verdict = verify.Verdict(check, "current", probe.Served(check.endpoint, None, leaf, None))
    caplog.set_level(logging.DEBUG, logger="certrelay.verify")

    verify.log(verdict)

    assert [record.getMessage() for record in caplog.records] == [f"verified: {verdict.describe()}"]


def test_a_live_certificate_that_cannot_be_read_is_an_error_naming_lineage_and_why(tmp_path, caplog):
    with pytest.raises(certificate.CertificateError) as raised:
        certificate.live_certificate(str(tmp_path), "gone.ch")
    caplog.set_level(logging.DEBUG, logger="certrelay.verify")

    assert verify.Fingerprints(str(tmp_path)).live_der("gone.ch") == (None, None)

    assert [record.getMessage() for record in caplog.records] == [
        f"cannot verify gone.ch: its live certificate cannot be read: {raised.value}"]


@pytest.fixture
def rounds(lineage, monkeypatch):
    """A fake clock that only sleep() moves, and an endpoint at 127.0.0.1:1 that sends
    a.ch's intermediate from round `current_from` on (never if None). Return
    (the check, set current_from, the timeout of each probe round, the sleeps)."""
    _, parts, r11 = lineage
    leaf = ssl.PEM_cert_to_DER_cert(parts["cert"].decode())
    check = plan.Check("a.ch", endpoint_module.parse_endpoint("tls://127.0.0.1:1"), None, (), True, frozenset())
    clock, timeouts, sleeps, current_from = [1000.0], [], [], [None]

    def fetch_many(targets, timeout):
        timeouts.append(timeout)
        good = current_from[0] is not None and len(timeouts) >= current_from[0]
        return [probe.Served(check.endpoint, None, leaf, None, chain=(r11,) if good else ()) for _ in targets]

    def sleep(seconds):
        sleeps.append(seconds)
        clock[0] += seconds

    monkeypatch.setattr(probe, "fetch_many", fetch_many)
    monkeypatch.setattr(verify.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(verify.time, "sleep", sleep)
    return check, current_from, timeouts, sleeps


def test_verify_by_default_probes_again_until_current_and_logs_each_verdict(lineage, rounds, caplog):
    check, current_from, timeouts, sleeps = rounds
    current_from[0] = 3
    caplog.set_level(logging.INFO, logger="certrelay.verify")

    [verdict] = verify.verify([check], lineage[0], 30)

    assert verdict.outcome == "current"
    assert timeouts == [verify.ATTEMPT_TIMEOUT] * 3 and sleeps == [0.5, 1.0]  # pauses doubling, none after
    assert [record.getMessage() for record in caplog.records] == [f"verified: {verdict.describe()}"]


def test_verify_probes_until_the_deadline_each_round_at_least_a_second_or_once(lineage, rounds):
    check, _, timeouts, sleeps = rounds

    [verdict] = verify.verify([check], lineage[0], 2, quiet=True)

    assert verdict.outcome == "chain"
    assert timeouts == [2.0, 1.5, 1.0] and sleeps == [0.5, 1.0]  # the third round ends past the deadline

    del timeouts[:], sleeps[:]
    verify.verify([check], lineage[0], 1.5, quiet=True)  # a round due exactly at the deadline is not begun
    assert timeouts == [1.5, 1.0] and sleeps == [0.5]

    del timeouts[:], sleeps[:]
    assert verify.verify([check], lineage[0], 2, quiet=True, once=True)[0].outcome == "chain"
    assert timeouts == [2.0] and sleeps == []


def test_an_endpoint_serving_another_certificate_is_told_the_live_ones_serial_and_expiry(lineage, monkeypatch):
    from tests import certs

    config_dir, parts, _ = lineage
    stranger = ssl.PEM_cert_to_DER_cert(certs.make_certificate(["a.ch"])[0].decode())
    check = plan.Check("a.ch", endpoint_module.parse_endpoint("tls://127.0.0.1:1"), None, (), True, frozenset())
    monkeypatch.setattr(probe, "fetch_many", lambda targets, timeout: [
        probe.Served(check.endpoint, None, stranger, None) for _ in targets])

    [verdict] = verify.verify([check], config_dir, 30, quiet=True, once=True)

    assert verdict.outcome == "other" and verdict.owner is None
    assert verdict.live == verify.summary(ssl.PEM_cert_to_DER_cert(parts["cert"].decode()))


def test_an_endpoint_of_a_lineage_whose_live_certificate_cannot_be_read_is_still_judged(lineage, monkeypatch):
    config_dir, parts, _ = lineage
    served = ssl.PEM_cert_to_DER_cert(parts["cert"].decode())  # a.ch's, at gone.ch's endpoint
    check = plan.Check("gone.ch", endpoint_module.parse_endpoint("tls://127.0.0.1:1"), None, (), True, frozenset())
    monkeypatch.setattr(probe, "fetch_many", lambda targets, timeout: [
        probe.Served(check.endpoint, None, served, None) for _ in targets])

    [verdict] = verify.verify([check], config_dir, 30, quiet=True, once=True)

    assert (verdict.outcome, verdict.expected, verdict.owner, verdict.live) == ("other", None, "a.ch", None)
