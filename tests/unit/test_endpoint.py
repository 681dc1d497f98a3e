"""Parsing endpoints (`smtp://mail.example.ch`) and choosing the SNI to send."""

import hypothesis
import hypothesis.strategies as st
import pytest

from certrelay import endpoint as endpoint_module, probe
from certrelay.endpoint import Endpoint, EndpointError, parse_endpoint, server_name

DEFAULT_PORTS = {
    "https": 443, "smtps": 465, "imaps": 993, "pop3s": 995, "ldaps": 636, "smtp": 25,
    "submission": 587, "imap": 143, "pop3": 110, "sieve": 4190, "ftp": 21, "xmpp": 5222,
    "ldap": 389, "postgres": 5432,
}


def test_every_scheme_is_known_with_its_default_port_and_mode():
    assert {scheme: port for scheme, (port, _) in endpoint_module.SCHEMES.items()} == {"tls": None, **DEFAULT_PORTS}
    direct = {scheme for scheme, (_, mode) in endpoint_module.SCHEMES.items() if mode == "tls"}
    assert direct == {"tls", "https", "smtps", "imaps", "pop3s", "ldaps"}
    assert set(probe.STARTTLS) == set(endpoint_module.SCHEMES) - direct


@pytest.mark.parametrize("scheme", DEFAULT_PORTS)
def test_each_scheme_has_its_default_port_and_takes_another(scheme):
    assert parse_endpoint(f"{scheme}://mail.example.ch") == Endpoint(
        f"{scheme}://mail.example.ch", scheme, "mail.example.ch", DEFAULT_PORTS[scheme], None
    )
    assert parse_endpoint(f"{scheme}://mail.example.ch:10025").port == 10025


@pytest.mark.parametrize(
    "text, host, port, sni",
    [
        ("tls://example.ch:8443", "example.ch", 8443, None),
        ("SMTP://Mail.Example.CH.:25/", "mail.example.ch", 25, None),
        ("imaps://192.0.2.7", "192.0.2.7", 993, None),
        ("imaps://[2001:DB8::1]", "2001:db8::1", 993, None),
        ("tls://[::1]:65535", "::1", 65535, None),
        ("tls://[fe80::1%25eth0]:1", "fe80::1%eth0", 1, None),
        ("https://192.0.2.7?sni=www.example.ch", "192.0.2.7", 443, "www.example.ch"),
        ("https://[::1]:8443?sni=WWW.Example.CH.", "::1", 8443, "www.example.ch"),
        ("\tsmtp://localhost \n", "localhost", 25, None),  # stripped: only inner whitespace is an error
    ],
)
def test_hosts_ports_and_sni(text, host, port, sni):
    endpoint = parse_endpoint(text)

    assert (endpoint.host, endpoint.port, endpoint.sni) == (host, port, sni)
    assert endpoint.url == text.strip()


@pytest.mark.parametrize(
    "text, message",
    [
        ("mail.example.ch", "write SCHEME://HOST[:PORT], e.g. smtp://mail.example.ch"),
        ("gopher://example.ch", "unknown scheme 'gopher'; known: tls, https, smtps"),
        ("smtp://", "missing host: write smtp://HOST[:PORT]"),
        ("smtp://:25", "missing host"),
        ("smtp://-mail.example.ch", "'-mail.example.ch' is neither a host name nor an IPv4 address"),
        ("smtp://mail_1.example.ch", "is neither a host name"),
        ("smtp://192.0.2", "'192.0.2' is neither a host name nor an IPv4 address"),
        ("smtp://" + "a" * 64 + ".ch", "is neither a host name"),
        ("smtp://" + "a." * 127 + "ch", "is neither a host name"),
        ("smtp://::1", "write an IPv6 address in brackets: smtp://[2001:db8::1]:PORT"),
        ("smtp://[::1", "missing ']' after the IPv6 address"),
        ("smtp://[::1]25", "unexpected '25' after ']': write [IPV6]:PORT"),
        ("smtp://[192.0.2.7]", "[192.0.2.7] is not an IPv6 address; write names and IPv4"),
        ("smtp://[mail.example.ch]", "is not an IPv6 address"),
        ("tls://example.ch", "tls:// has no default port: write tls://HOST:PORT"),
        ("smtp://example.ch:0", "bad port '0': write a number from 1 to 65535"),
        ("smtp://example.ch:65536", "bad port '65536'"),
        ("smtp://example.ch:", "bad port ''"),
        ("smtp://example.ch:-1", "bad port '-1'"),
        ("smtp://example.ch:smtp", "bad port 'smtp'"),
        ("smtp://example.ch:２５", "bad port '２５'"),
        ("smtp://user@example.ch", "no user or password: certrelay never logs in"),
        ("smtp://user:secret@example.ch", "no user or password"),
        ("https://example.ch/index.html", "a path means nothing here: write https://HOST[:PORT], without /index"),
        ("https://example.ch#top", "a #fragment means nothing here; remove it"),
        ("https://example.ch?", "the only option is ?sni=NAME, given once; not ''"),
        ("https://example.ch?verify=no", "the only option is ?sni=NAME"),
        ("https://example.ch?sni=a.ch&port=1", "the only option is ?sni=NAME"),
        ("https://example.ch?sni=a.ch&sni=b.ch", "given once"),
        ("https://example.ch?sni", "the only option is ?sni=NAME"),
        ("https://example.ch?sni=", "sni='' is not a DNS name; write ?sni=www.example.ch"),
        ("https://example.ch?sni=*.example.ch", "sni='*.example.ch' is not a DNS name"),
        ("https://example.ch?sni=192.0.2.7", "sni= takes a DNS name, not an IP address"),
        ("https://example.ch?sni=::1", "sni= takes a DNS name, not an IP address"),
        ("smtp://mail example.ch", "contains spaces or control characters"),
        ("smtp://mail.\nexample.ch", "contains spaces or control characters"),
    ],
)
def test_errors_say_what_is_wrong_and_how_to_write_it(text, message):
    with pytest.raises(EndpointError) as caught:
        parse_endpoint(text)

    assert str(caught.value).startswith(repr(text.strip()) + ": ")
    assert message in str(caught.value)


def test_a_non_string_is_an_endpoint_error():
    with pytest.raises(EndpointError, match="an endpoint is a string like"):
        parse_endpoint(25)


@hypothesis.given(st.text(max_size=60) | st.from_regex(r"[a-z]{2,10}://\S{0,40}", fullmatch=True))
def test_any_text_parses_or_raises_endpoint_error(text):
    try:
        endpoint = parse_endpoint(text)
    except EndpointError:
        return
    assert 1 <= endpoint.port <= 65535
    assert endpoint.scheme in endpoint_module.SCHEMES


@pytest.mark.parametrize(
    "text, domains, expected",
    [
        ("https://192.0.2.7?sni=www.example.ch", ["example.ch"], "www.example.ch"),
        ("https://mail.example.ch?sni=www.example.ch", ["example.ch"], "www.example.ch"),
        ("smtp://mail.example.ch", ["example.ch", "*.example.ch"], "mail.example.ch"),
        ("smtp://mail.example.ch", [], "mail.example.ch"),
        ("smtp://192.0.2.7", ["example.ch", "*.example.ch"], "example.ch"),
        ("smtp://[2001:db8::1]", ("www.example.ch",), "www.example.ch"),
        ("smtp://192.0.2.7", ["*.example.ch", "example.ch"], "certrelay-probe.example.ch"),
        ("smtp://192.0.2.7", [], None),
        ("smtp://[::1]", iter([]), None),
    ],
)
def test_server_name(text, domains, expected):
    assert server_name(parse_endpoint(text), domains) == expected


def test_server_name_refuses_one_string_for_domains():
    with pytest.raises(TypeError):
        server_name(parse_endpoint("smtp://192.0.2.7"), "example.ch")
