"""lineages.Scanner: every lineage under live/, read through a stat-keyed cache."""

import json
import os
import shutil
import subprocess
import sys

from certrelay import certinfo, certificate, lineages
from tests import certs

REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def scan(config_dir, state_dir):
    os.makedirs(state_dir, exist_ok=True)  # a batch holds the lock in it, so it exists
    scanner = lineages.Scanner(str(config_dir), str(state_dir))
    found = scanner.scan()
    scanner.save()
    return found


def test_scan_reads_each_lineage_and_skips_what_is_not_one(tmp_path):
    config, state = tmp_path / "le", tmp_path / "state"
    pem = certs.renew(str(config), "example.org")
    (config / "live" / "README").write_text("certbot's note\n")
    (config / "live" / ".hidden").mkdir()

    [found] = scan(config, state)

    assert found.name == "example.org" and found.error is None
    assert found.fingerprint == certificate.der_fingerprint(pem)
    assert found.domains == ("example.org", "*.example.org")
    assert found.info == certinfo.from_pem(pem)


def test_a_warm_scan_neither_reads_nor_parses_and_does_not_import_cryptography(tmp_path):
    config, state = tmp_path / "le", tmp_path / "state"
    certs.renew(str(config), "example.org")
    first = scan(config, state)
    code = (
        "import sys; from certrelay import lineages;"
        f" [found] = lineages.Scanner({str(config)!r}, {str(state)!r}).scan();"
        " print(found.fingerprint, found.not_after, 'cryptography' in sys.modules)"
    )

    output = subprocess.run([sys.executable, "-c", code], cwd=REPOSITORY, capture_output=True, check=True, text=True)

    assert output.stdout == f"{first[0].fingerprint} {first[0].not_after} False\n"


def test_a_renewal_is_seen_through_the_cache(tmp_path):
    config, state = tmp_path / "le", tmp_path / "state"
    certs.renew(str(config), "example.org")
    [before] = scan(config, state)
    pem = certs.renew(str(config), "example.org")

    [after] = scan(config, state)

    assert after.fingerprint == certificate.der_fingerprint(pem) != before.fingerprint
    assert after.info.sha256 != before.info.sha256


def test_a_corrupt_cache_entry_is_read_again_and_a_gone_lineage_forgotten(tmp_path):
    config, state = tmp_path / "le", tmp_path / "state"
    pem = certs.renew(str(config), "example.org")
    certs.renew(str(config), "gone.org")
    scan(config, state)
    cache_file = state / "lineages.json"
    cache = json.loads(cache_file.read_text())
    cache["example.org"]["info"]["not_after"] = "soon"  # not what to_json writes
    cache_file.write_text(json.dumps(cache))
    shutil.rmtree(config / "live" / "gone.org")

    found = scan(config, state)

    assert [lineage.name for lineage in found] == ["example.org"]
    assert found[0].fingerprint == certificate.der_fingerprint(pem) and isinstance(found[0].not_after, float)
    assert sorted(json.loads(cache_file.read_text())) == ["example.org"]


def test_an_unreadable_certificate_is_a_lineage_with_an_error(tmp_path):
    config, state = tmp_path / "le", tmp_path / "state"
    certs.renew(str(config), "example.org")
    os.unlink(config / "live" / "example.org" / "cert.pem")
    os.symlink("/etc/passwd", config / "live" / "example.org" / "cert.pem")  # leads out of the config dir

    [found] = scan(config, state)

    assert found.fingerprint is None and "leading out of it" in found.error


def test_a_certificate_that_does_not_parse_keeps_its_fingerprint(tmp_path):
    """A PEM block whose DER is no X.509 certificate: only the dates and domains are
    unknown, and the batch must not read it a second time for the fingerprint."""
    config, state = tmp_path / "le", tmp_path / "state"
    certs.renew(str(config), "example.org")
    with open(os.path.realpath(config / "live" / "example.org" / "cert.pem"), "wb") as file:
        file.write(b"-----BEGIN CERTIFICATE-----\nbm90IERFUg==\n-----END CERTIFICATE-----\n")

    [found] = scan(config, state)

    assert found.fingerprint == certificate.sha256(b"not DER")
    assert found.facts is None and found.error


def test_a_file_without_a_pem_certificate_has_no_fingerprint(tmp_path):
    config, state = tmp_path / "le", tmp_path / "state"
    certs.renew(str(config), "example.org")
    with open(os.path.realpath(config / "live" / "example.org" / "cert.pem"), "wb") as file:
        file.write(b"not a certificate\n")

    [found] = scan(config, state)

    assert found.fingerprint is None and found.facts is None and "no PEM certificate" in found.error


def test_a_scanner_kept_across_batches_sees_renewals_and_saves_once(tmp_path):
    """The daemon keeps one Scanner: lineages.json is read once, and each later scan
    still sees a renewal, a new lineage and a removed one."""
    config, state = tmp_path / "le", tmp_path / "state"
    os.makedirs(state)
    certs.renew(str(config), "a.example")
    scanner = lineages.Scanner(str(config), str(state))
    [first] = scanner.scan()
    scanner.save()
    pem = certs.renew(str(config), "a.example")
    certs.renew(str(config), "b.example")

    found = {lineage.name: lineage for lineage in scanner.scan()}
    scanner.save()
    shutil.rmtree(config / "live" / "b.example")
    last = scanner.scan()
    scanner.save()

    assert found["a.example"].fingerprint == certificate.der_fingerprint(pem) != first.fingerprint
    assert sorted(found) == ["a.example", "b.example"] and [lineage.name for lineage in last] == ["a.example"]
    with open(state / "lineages.json", encoding="utf-8") as file:
        assert sorted(json.load(file)) == ["a.example"]


def test_a_scan_reads_ahead_a_bounded_number_and_keeps_the_name_order(tmp_path, monkeypatch):
    """Certificates are read files.READ_AHEAD at a time, then parsed: across the
    bounds every lineage keeps its own certificate, a broken one its own error."""
    from certrelay import files

    monkeypatch.setattr(files, "READ_AHEAD", 2)
    config, state = tmp_path / "le", tmp_path / "state"
    names = [f"n{index}.example" for index in range(5)]
    pems = {name: certs.renew(str(config), name) for name in names}
    os.unlink(config / "live" / "n2.example" / "cert.pem")
    os.symlink("/etc/passwd", config / "live" / "n2.example" / "cert.pem")

    found = scan(config, state)

    assert [lineage.name for lineage in found] == names
    for lineage in found:
        if lineage.name == "n2.example":
            assert lineage.fingerprint is None and "leading out" in lineage.error
        else:
            assert lineage.fingerprint == certificate.der_fingerprint(pems[lineage.name])
            assert lineage.domains == (lineage.name, f"*.{lineage.name}")
