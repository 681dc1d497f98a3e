"""Reading live/NAME/cert.pem without leaving the config dir."""

import os
import subprocess

import pytest

from certrelay import certificate
from tests import certs


@pytest.fixture
def config_dir(tmp_path):
    (tmp_path / "archive" / "x.ch").mkdir(parents=True)
    (tmp_path / "live" / "x.ch").mkdir(parents=True)
    (tmp_path / "archive" / "x.ch" / "cert1.pem").write_bytes(certs.make_certificate(["x.ch"])[0])
    return tmp_path


def link(config_dir, target):
    os.symlink(target, config_dir / "live" / "x.ch" / "cert.pem")


def test_fingerprint_follows_certbots_relative_link_into_archive(config_dir):
    link(config_dir, "../../archive/x.ch/cert1.pem")

    first = certificate.fingerprint(str(config_dir), "x.ch")
    (config_dir / "archive" / "x.ch" / "cert1.pem").write_bytes(certs.make_certificate(["x.ch"])[0])

    assert len(first) == 64
    assert certificate.fingerprint(str(config_dir), "x.ch") != first


def test_the_fingerprint_is_the_one_openssl_prints(config_dir):
    """The SHA-256 of the DER, not of the PEM file's bytes: one hash per certificate
    in the ledger, status, metrics, logs and `openssl x509 -fingerprint -sha256`."""
    link(config_dir, "../../archive/x.ch/cert1.pem")
    (config_dir / "archive" / "x.ch" / "cert1.pem").write_bytes(
        b"text before the block, as some tools write\n" + (config_dir / "archive" / "x.ch" / "cert1.pem").read_bytes())
    printed = subprocess.run(["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in",
                              config_dir / "live" / "x.ch" / "cert.pem"], capture_output=True, text=True, check=True)

    assert certificate.fingerprint(str(config_dir), "x.ch") == printed.stdout.strip().split("=")[1].replace(":", "").lower()


def test_fingerprint_follows_a_linked_live_directory_inside_the_config_dir(config_dir):
    os.rename(config_dir / "live" / "x.ch", config_dir / "live" / "real")
    os.symlink("real", config_dir / "live" / "x.ch")
    link(config_dir, "../../archive/x.ch/cert1.pem")

    assert len(certificate.fingerprint(str(config_dir), "x.ch")) == 64


@pytest.mark.parametrize(
    "target", ["/etc/passwd", "../../../etc/passwd", "../../archive/x.ch/../../../etc/passwd", "loop"],
)
def test_fingerprint_refuses_links_leading_out_or_in_circles(config_dir, target):
    link(config_dir, target)
    if target == "loop":
        os.symlink("cert.pem", config_dir / "live" / "x.ch" / "loop")

    with pytest.raises(certificate.CertificateError):
        certificate.fingerprint(str(config_dir), "x.ch")


def test_fingerprint_refuses_a_live_directory_linked_out_of_the_config_dir(config_dir, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    (outside / "cert.pem").write_text("secret")
    os.rmdir(config_dir / "live" / "x.ch")
    os.symlink(str(outside), config_dir / "live" / "x.ch")

    with pytest.raises(certificate.CertificateError, match="leading out"):
        certificate.fingerprint(str(config_dir), "x.ch")


def test_fingerprint_of_a_fifo_fails_without_blocking(config_dir):
    os.mkfifo(config_dir / "live" / "x.ch" / "cert.pem")

    with pytest.raises(certificate.CertificateError, match="not a regular file"):
        certificate.fingerprint(str(config_dir), "x.ch")


@pytest.mark.parametrize("kind", ["fifo", "file"])
def test_a_non_directory_on_the_way_is_refused_without_blocking(config_dir, kind):
    os.rmdir(config_dir / "live" / "x.ch")
    if kind == "fifo":
        os.mkfifo(config_dir / "live" / "x.ch")
    else:
        (config_dir / "live" / "x.ch").write_text("one")

    with pytest.raises(certificate.CertificateError, match="x.ch is not a directory"):
        certificate.fingerprint(str(config_dir), "x.ch")


def test_a_missing_directory_on_the_way_says_so(config_dir):
    with pytest.raises(certificate.CertificateError, match="cannot open: No such file or directory"):
        certificate.fingerprint(str(config_dir), "y.ch")


def open_descriptors():
    return len(os.listdir("/proc/self/fd"))


def test_a_kept_tree_reads_many_lineages_refuses_the_hostile_ones_and_closes_what_it_kept(config_dir):
    """A scan reads every lineage through one Tree, which keeps live/ and archive/ open."""
    link(config_dir, "../../archive/x.ch/cert1.pem")
    targets = {"out.ch": "../../archive/x.ch/../../../etc/passwd", "abs.ch": "/etc/passwd", "up.ch": "../../.."}
    for name, target in targets.items():
        (config_dir / "live" / name).mkdir()
        os.symlink(target, config_dir / "live" / name / "cert.pem")
    before = open_descriptors()

    pem = (config_dir / "archive" / "x.ch" / "cert1.pem").read_bytes()

    with certificate.Tree(str(config_dir)) as tree:
        assert certificate.live_certificate(str(config_dir), "x.ch", tree) == pem
        for name in targets:
            with pytest.raises(certificate.CertificateError, match="leads out|leading out"):
                certificate.live_certificate(str(config_dir), name, tree)
        assert certificate.live_certificate(str(config_dir), "x.ch", tree) == pem
        assert sorted(tree.below) == ["archive", "live"]
        assert open_descriptors() == before + 3  # the config dir, live/ and archive/

    assert open_descriptors() == before


def test_a_kept_tree_does_not_keep_a_linked_top_directory(config_dir, tmp_path_factory):
    link(config_dir, "../../archive/x.ch/cert1.pem")
    outside = tmp_path_factory.mktemp("outside")
    os.rename(config_dir / "archive", outside / "archive")
    os.symlink(str(outside / "archive"), config_dir / "archive")

    with certificate.Tree(str(config_dir)) as tree:
        for _ in range(2):
            with pytest.raises(certificate.CertificateError, match="leading out"):
                certificate.live_certificate(str(config_dir), "x.ch", tree)
        assert "archive" not in tree.below
