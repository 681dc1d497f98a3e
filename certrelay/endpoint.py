"""Endpoints as the rules write them: `SCHEME://HOST[:PORT][?sni=NAME]`, and the name a
probe sends as SNI. Light on purpose: every run that validates rules with `verify`
parses them, and only a run that probes loads probe.py (sockets, TLS, threads).
"""

import dataclasses
import ipaddress
import re
import urllib.parse

#: scheme -> (default port, or None when the port must be given; "tls" or "starttls")
SCHEMES = {
    "tls": (None, "tls"),
    "https": (443, "tls"),
    "smtps": (465, "tls"),
    "imaps": (993, "tls"),
    "pop3s": (995, "tls"),
    "ldaps": (636, "tls"),
    "smtp": (25, "starttls"),
    "submission": (587, "starttls"),
    "imap": (143, "starttls"),
    "pop3": (110, "starttls"),
    "sieve": (4190, "starttls"),
    "ftp": (21, "starttls"),
    "xmpp": (5222, "starttls"),
    "ldap": (389, "starttls"),
    "postgres": (5432, "starttls"),
}
WILDCARD_LABEL = "certrelay-probe"  # stands for "*" when a wildcard domain becomes the SNI
LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
EXAMPLES = "e.g. smtp://mail.example.ch, imaps://[2001:db8::1] or tls://example.ch:8443?sni=www.example.ch"


class EndpointError(ValueError):
    """An endpoint that cannot be parsed; the message says what is wrong and how to write it."""


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """Where to probe: `url` as written in the rules, and its parts.

    `host` is a lower-case name, an IPv4 address or an IPv6 address without brackets;
    `sni` is the name given with `?sni=NAME`, else None.
    """

    url: str
    scheme: str
    host: str
    port: int
    sni: str | None = None


def parse_endpoint(text):
    """Parse `SCHEME://HOST[:PORT][?sni=NAME]` (a str) into an Endpoint.

    Raise EndpointError for an unknown scheme, a missing or invalid host, a bad port, a
    `tls://` without port, a path, user, password, fragment or query key other than
    `sni`, or an `sni` that is not a DNS name.
    """
    if not isinstance(text, str):
        raise EndpointError(f"an endpoint is a string like {EXAMPLES}, not {type(text).__name__}")
    url = text.strip()

    def fail(problem):
        raise EndpointError(f"{url!r}: {problem}")

    if not url.isprintable() or any(character.isspace() for character in url):
        fail("contains spaces or control characters")
    scheme, separator, rest = url.partition("://")
    scheme = scheme.lower()
    if not separator:
        fail(f"write SCHEME://HOST[:PORT], {EXAMPLES}")
    if scheme not in SCHEMES:
        fail(f"unknown scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    rest, hash_mark, _ = rest.partition("#")
    if hash_mark:
        fail("a #fragment means nothing here; remove it")
    rest, question_mark, query = rest.partition("?")
    location, _, path = rest.partition("/")
    if path:
        fail(f"a path means nothing here: write {scheme}://HOST[:PORT], without /{path}")
    if "@" in location:
        fail("no user or password: certrelay never logs in; write only HOST[:PORT]")
    host, port = split_location(location, scheme, fail)
    sni = parse_query(query, fail) if question_mark else None
    return Endpoint(url, scheme, host, port, sni)


def split_location(location, scheme, fail):
    """Return (host, port) from `HOST[:PORT]` or `[IPV6][:PORT]`; call fail(problem) if invalid."""
    if location.startswith("["):
        address, bracket, after = location[1:].partition("]")
        if not bracket:
            fail("missing ']' after the IPv6 address")
        if after and not after.startswith(":"):
            fail(f"unexpected {after!r} after ']': write [IPV6]:PORT")
        host = ip_address(address.replace("%25", "%", 1))
        if not isinstance(host, ipaddress.IPv6Address):
            fail(f"[{address}] is not an IPv6 address; write names and IPv4 addresses without brackets")
        host, port_text = str(host), after[1:] if after else None
    else:
        if location.count(":") > 1:
            fail(f"write an IPv6 address in brackets: {scheme}://[2001:db8::1]:PORT")
        host, colon, port_text = location.partition(":")
        port_text = port_text if colon else None
        if not host:
            fail(f"missing host: write {scheme}://HOST[:PORT]")
        address = ip_address(host)
        if address is not None:
            host = str(address)
        else:
            host = dns_name(host) or fail(f"{host!r} is neither a host name nor an IPv4 address")
    if port_text is None:
        port = SCHEMES[scheme][0] or fail(f"{scheme}:// has no default port: write {scheme}://HOST:PORT")
    elif not (port_text.isascii() and port_text.isdigit() and 1 <= int(port_text) <= 65535):
        fail(f"bad port {port_text!r}: write a number from 1 to 65535")
    else:
        port = int(port_text)
    return host, port


def parse_query(query, fail):
    """Return the NAME of a query `sni=NAME`; call fail(problem) for anything else."""
    fields = urllib.parse.parse_qsl(query, keep_blank_values=True)
    keys = [key for key, _ in fields]
    if keys != ["sni"] or not query.startswith("sni="):
        fail(f"the only option is ?sni=NAME, given once; not {query!r}")
    if ip_address(fields[0][1]) is not None:
        fail("sni= takes a DNS name, not an IP address (clients send no IP addresses as SNI)")
    return dns_name(fields[0][1]) or fail(f"sni={fields[0][1]!r} is not a DNS name; write ?sni=www.example.ch")


def dns_name(text):
    """Return `text` lower-cased, without a trailing dot, if it is a DNS host name, else None."""
    name = text.lower().removesuffix(".")
    labels = name.split(".")
    if len(name) > 253 or not all(LABEL.fullmatch(label) for label in labels) or labels[-1].isdigit():
        return None  # an all-digit last label would be read as a short-hand IPv4 address
    return name


def ip_address(text):
    """Return `text` as an ipaddress object, or None if it is not an IP address."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def server_name(endpoint, domains):
    """Return the SNI to send to `endpoint` (an Endpoint), or None for none.

    `endpoint.sni` if given; else the host if it is a name; else the first of the
    certificate's `domains` (a sequence of str), a leading `*.` replaced by a label it
    covers; None if there are no domains.

    For `xmpp` the SNI is also the domain the stream is addressed to (RFC 7590), which
    is the certificate's, not the server's host name (a domain's SRV record may point
    at any host) and never an IP address: `endpoint.sni` if given; else the host if
    it is one of the certificate's domains; else its first domain without a wildcard;
    else the host if it is a name; else None (the probe then says to write ?sni=).
    """
    if isinstance(domains, str):
        raise TypeError("domains is a sequence of names, not one string")
    if endpoint.sni:
        return endpoint.sni
    host_is_name = ip_address(endpoint.host) is None
    if endpoint.scheme == "xmpp":
        plain = [domain.lower().removesuffix(".") for domain in domains if not domain.startswith("*.")]
        if host_is_name and endpoint.host in plain:
            return endpoint.host
        return plain[0] if plain else endpoint.host if host_is_name else None
    if host_is_name:
        return endpoint.host
    for domain in domains:
        return WILDCARD_LABEL + domain[1:] if domain.startswith("*.") else domain
    return None
