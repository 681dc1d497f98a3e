"""The scale benchmark's floor: the least any program must do with N notifications.

Usage: scale-floor.py CONFIG_DIR. Takes every file in CONFIG_DIR/certrelay/queue as
certrelay does (rename into claimed/, read it, delete it at the end), and reads, hashes
and parses (python3-cryptography: subjectAltName and dates) the live certificate of
each. Nothing is checked, matched, planned or recorded, no link is refused and no
systemctl runs: certrelay's run on the same queue can only take longer.
"""

import binascii
import hashlib
import os
import sys

from cryptography import x509


def parse(pem):
    begin = pem.index(b"-----BEGIN CERTIFICATE-----") + len(b"-----BEGIN CERTIFICATE-----")
    certificate = x509.load_der_x509_certificate(binascii.a2b_base64(pem[begin:pem.index(b"-----END CERTIFICATE-----")]))
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        pass
    suffix = "_utc" if hasattr(certificate, "not_valid_after_utc") else ""  # no warning on cryptography >= 42
    return getattr(certificate, "not_valid_before" + suffix), getattr(certificate, "not_valid_after" + suffix)


def main(config_dir):
    spool = os.path.join(config_dir, "certrelay")
    queue = os.open(os.path.join(spool, "queue"), os.O_RDONLY | os.O_DIRECTORY)
    claimed = os.open(os.path.join(spool, "claimed"), os.O_RDONLY | os.O_DIRECTORY)
    names = os.listdir(queue)
    for name in names:
        os.rename(name, name + "@1", src_dir_fd=queue, dst_dir_fd=claimed)
    for name in names:
        descriptor = os.open(name + "@1", os.O_RDONLY, dir_fd=claimed)
        os.read(descriptor, 65536)
        os.close(descriptor)
        with open(os.path.join(config_dir, "live", name, "cert.pem"), "rb") as file:
            pem = file.read()
        hashlib.sha256(pem).hexdigest()
        parse(pem)
    for name in names:
        os.unlink(name + "@1", dir_fd=claimed)


if __name__ == "__main__":
    main(sys.argv[1])
