"""Real X.509 certificates laid out as certbot does, for tests (python3-cryptography)."""

import datetime
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def make_certificate(domains, days=90, age_days=0):
    """Return (certificate PEM, key PEM) for `domains`, valid `days` days, issued
    `age_days` ago; self-signed (certrelay compares fingerprints, not chains)."""
    key = ec.generate_private_key(ec.SECP256R1())
    # A CN holds at most 64 characters (cryptography checks it from 4x); the SAN has the name.
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domains[0][:64])])
    start = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=age_days)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain) for domain in domains]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def renew(config_dir, name, domains=None, days=90, age_days=0):
    """Write a new certificate version for lineage `name` as certbot does
    (archive/NAME/*N.pem, live/NAME/*.pem relative links); return its PEM."""
    domains = domains or [name, f"*.{name}"]
    certificate, key = make_certificate(domains, days, age_days)
    archive, live = os.path.join(config_dir, "archive", name), os.path.join(config_dir, "live", name)
    os.makedirs(archive, exist_ok=True)
    os.makedirs(live, exist_ok=True)
    version = 1 + sum(entry.startswith("cert") for entry in os.listdir(archive))
    for part, data in (("cert", certificate), ("chain", certificate), ("fullchain", certificate + certificate),
                       ("privkey", key)):
        with open(os.path.join(archive, f"{part}{version}.pem"), "wb") as file:
            file.write(data)
        link = os.path.join(live, f"{part}.pem")
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(f"../../archive/{name}/{part}{version}.pem", link)
    return certificate
