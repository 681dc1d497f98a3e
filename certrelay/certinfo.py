"""What a certificate says (fingerprint, serial, validity, domains).

Parsing X.509 needs python3-cryptography, whose import costs more than the rest of a
`certrelay run`; so the first `from_der` imports it, and lineages.py keeps what
was parsed (`to_json`) in the state dir: a certificate is parsed once in its life.

Works with cryptography 38 (Debian 12) and the newest: the `*_utc` date properties
exist only from 42, and the naive ones warn (DeprecationWarning) from 42 on.
"""

import dataclasses
import datetime
import hashlib

DAY = 86400.0
#: The start of epoch time, aware and naive: subtracting it is the cheapest exact
#: datetime.timestamp() (the C code of timestamp() does the same subtraction).
EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
NAIVE_EPOCH = datetime.datetime(1970, 1, 1)

_x509 = None  # cryptography.x509 once `from_der` imported it


#: What is wrong when cryptography cannot be imported, and the fix.
NO_CRYPTOGRAPHY = (
    "python3-cryptography (the cryptography package) is not installed, so certificate dates and domains"
    " cannot be read (no expiry alarms; rules select lineages by name only): apt-get install"
    " python3-cryptography, or in a venv: pip install cryptography"
)


class CertificateParseError(ValueError):
    """The bytes are not a certificate that can be read; the message says why."""


class CryptographyMissing(CertificateParseError):
    """No certificate can be read: cryptography cannot be imported (NO_CRYPTOGRAPHY)."""


@dataclasses.dataclass(frozen=True)
class CertInfo:
    """The facts of one certificate that certrelay reports on.

    `sha256`: hex SHA-256 of the DER; `serial`: uppercase hex as `openssl x509 -serial`
    prints it; `not_before`, `not_after`: epoch seconds (UTC); `domains`: the DNS names
    of the subjectAltName, else the subject's CN, else empty.
    """

    sha256: str
    serial: str
    not_before: float
    not_after: float
    domains: tuple = ()

    @property
    def lifetime(self):
        """Seconds from not_before to not_after."""
        return self.not_after - self.not_before

    def left(self, now):
        """Seconds from `now` (epoch) to not_after; negative once expired."""
        return self.not_after - now

    def days_left(self, now):
        """`left(now)` in days (float)."""
        return self.left(now) / DAY

    def fraction_left(self, now):
        """The part of the lifetime still left at `now`: 1 at not_before, 0 at
        not_after, negative once expired (0 for a certificate without a lifetime)."""
        if self.lifetime <= 0:
            return 0.0
        return self.left(now) / self.lifetime

    def expired(self, now):
        """True after not_after (which RFC 5280 counts as still valid)."""
        return now > self.not_after

    def to_json(self):
        """Return a JSON-able dict; `from_json` reads it back."""
        return {
            "sha256": self.sha256,
            "serial": self.serial,
            "not_before": self.not_before,
            "not_after": self.not_after,
            "domains": list(self.domains),
        }

    @classmethod
    def from_json(cls, data):
        """Return the CertInfo in a dict written by `to_json`; raise ValueError if
        anything is missing or of the wrong type."""
        try:
            info = cls(
                sha256=data["sha256"],
                serial=data["serial"],
                not_before=float(data["not_before"]),
                not_after=float(data["not_after"]),
                domains=tuple(data["domains"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"not a certificate entry: {error!r}") from None
        strings = (info.sha256, info.serial, *info.domains)
        if not all(isinstance(value, str) for value in strings) or isinstance(data["domains"], str):
            raise ValueError("not a certificate entry: a field is not text")
        return info


def der_from_pem(data):
    """Return the DER bytes of the first certificate in PEM `data` (bytes or str):
    certificate.pem_to_der, raising CertificateParseError."""
    from certrelay import certificate

    try:
        return certificate.pem_to_der(data)
    except certificate.CertificateError as error:
        raise CertificateParseError(str(error)) from None


def from_pem(data):
    """Return the CertInfo of the first certificate in PEM `data` (bytes or str).

    Raise CertificateParseError if there is none or it does not parse.
    """
    return from_der(der_from_pem(data))


def cryptography_x509():
    """Return the module cryptography.x509, imported on first use (see the module
    docstring); raise CryptographyMissing if python3-cryptography is missing."""
    global _x509
    if _x509 is None:
        try:
            from cryptography import x509
        except ImportError:
            raise CryptographyMissing(NO_CRYPTOGRAPHY) from None
        _x509 = x509
    return _x509


def cryptography_missing():
    """Return NO_CRYPTOGRAPHY if cryptography cannot be imported, else None."""
    try:
        cryptography_x509()
    except CryptographyMissing as error:
        return str(error)
    return None


def from_der(der):
    """Parse the DER bytes of an X.509 certificate; return its CertInfo.

    Raise CertificateParseError if they are not a certificate cryptography can read.
    """
    x509 = cryptography_x509()
    try:
        certificate = x509.load_der_x509_certificate(bytes(der))
        return CertInfo(
            sha256=hashlib.sha256(der).hexdigest(),
            serial=openssl_serial(certificate.serial_number),
            not_before=epoch(certificate, "not_valid_before"),
            not_after=epoch(certificate, "not_valid_after"),
            domains=certificate_domains(certificate, x509),
        )
    # ValueError also comes later than the load: cryptography parses some fields lazily
    except (ValueError, x509.InvalidVersion, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as error:
        raise CertificateParseError(f"not a readable X.509 certificate: {error}") from None


def openssl_serial(number):
    """Return `number` as `openssl x509 -serial` prints it: uppercase hex, an even
    number of digits."""
    digits = f"{abs(number):X}"
    if len(digits) % 2:
        digits = "0" + digits
    return "-" + digits if number < 0 else digits


def epoch(certificate, attribute):
    """Return the date `attribute` ("not_valid_before" or "not_valid_after") of a
    cryptography certificate as epoch seconds, without a DeprecationWarning on any
    version: `ATTRIBUTE_utc` is aware (cryptography >= 42), `ATTRIBUTE` naive UTC."""
    aware = getattr(certificate, attribute + "_utc", None)
    if aware is not None:
        return (aware - EPOCH).total_seconds()
    return (getattr(certificate, attribute) - NAIVE_EPOCH).total_seconds()


def certificate_domains(certificate, x509):
    """Return the subjectAltName DNS names of a cryptography certificate, or else its
    subject CNs, as a tuple."""
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = extension.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    if not names:
        names = [
            attribute.value if isinstance(attribute.value, str) else attribute.value.decode("utf-8", "replace")
            for attribute in certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        ]
    return tuple(names)

