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
    write_renewal_conf(config_dir, name)
    return certificate


def write_renewal_conf(config_dir, name, version="5.8.0", extra=""):
    """Write renewal/NAME.conf as certbot `version` does (the lines certrelay reads,
    and a few it must pass over), with `extra` lines at the top level."""
    if len(name) > 250:
        return  # NAME.conf would be too long a file name: certbot cannot keep such a lineage either
    os.makedirs(os.path.join(config_dir, "renewal"), exist_ok=True)
    with open(os.path.join(config_dir, "renewal", f"{name}.conf"), "w", encoding="utf-8") as file:
        file.write(f"# renew_before_expiry = 30 days\nversion = {version}\n{extra}"
                   f"archive_dir = {config_dir}/archive/{name}\ncert = {config_dir}/live/{name}/cert.pem\n\n"
                   "# Options used in the renewal process\n[renewalparams]\nauthenticator = dns-cloudflare\n"
                   "server = https://acme-v02.api.letsencrypt.org/directory\nkey_type = ecdsa\n")


# --- chains: a root, intermediates, and leaves they issue ----------------------------


class Authority:
    """A certificate authority for tests: `pem` its certificate, `key` its private key
    (a cryptography object), `name` its CN. A root is self-signed; an intermediate is
    issued by another Authority."""

    def __init__(self, name, issuer=None, days=3650):
        self.name = name
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        signer = issuer or self
        now = datetime.datetime.now(datetime.timezone.utc)
        certificate = (
            x509.CertificateBuilder().subject_name(subject)
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, signer.name)]))
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            # What Python 3.13's default context (VERIFY_X509_STRICT) demands of a CA.
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.key.public_key()),
                           critical=False)
            .sign(signer.key, hashes.SHA256())
        )
        self.pem = certificate.public_bytes(serialization.Encoding.PEM)

    def issue(self, domains, days=90):
        """Return (certificate PEM, key PEM) of a leaf for `domains` that this authority signed."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domains[0])]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.name)]))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain) for domain in domains]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def renew_with_chain(config_dir, name, intermediate, domains=None):
    """Write a new version of lineage `name` as certbot does, its leaf issued by
    `intermediate` (an Authority): chain.pem is the intermediate, fullchain.pem the leaf
    and the intermediate. Return {"cert", "chain", "fullchain", "privkey"} (PEM bytes)."""
    certificate, key = intermediate.issue(domains or [name])
    parts = {"cert": certificate, "chain": intermediate.pem, "fullchain": certificate + intermediate.pem,
             "privkey": key}
    archive, live = os.path.join(config_dir, "archive", name), os.path.join(config_dir, "live", name)
    os.makedirs(archive, exist_ok=True)
    os.makedirs(live, exist_ok=True)
    version = 1 + sum(entry.startswith("cert") for entry in os.listdir(archive))
    for part, data in parts.items():
        with open(os.path.join(archive, f"{part}{version}.pem"), "wb") as file:
            file.write(data)
        link = os.path.join(live, f"{part}.pem")
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(f"../../archive/{name}/{part}{version}.pem", link)
    os.makedirs(os.path.join(config_dir, "renewal"), exist_ok=True)  # certbot keeps one for every lineage
    with open(os.path.join(config_dir, "renewal", f"{name}.conf"), "w", encoding="utf-8") as file:
        file.write(f"version = 5.8.0\narchive_dir = {archive}\ncert = {live}/cert.pem\n\n"
                   "[renewalparams]\nauthenticator = dns-cloudflare\nkey_type = ecdsa\n")
    return parts
