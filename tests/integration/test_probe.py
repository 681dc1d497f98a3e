"""probe.fetch() against in-process servers: real sockets, real TLS, one scripted
dialogue per protocol, on 127.0.0.1 and ::1 only."""

import collections
import datetime
import hashlib
import select
import socket
import ssl
import threading
import time
import types

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certrelay import endpoint as endpoint_module, probe

TIMEOUT = 1.0  # seconds, for probes meant to time out
GENEROUS = 10.0  # seconds, for probes meant to succeed: never reached
DRIP = 0.25  # seconds between two lines of a server that drips: less than TIMEOUT; and
# GENEROUS / DRIP lines are fewer than probe.MAX_LINES, so a drip ends before that limit
LDAP_STARTTLS_OID = b"1.3.6.1.4.1.1466.20037"


class Certificate(collections.namedtuple("Certificate", "der certfile keyfile")):
    def context(self):
        """A new server-side TLS context serving this certificate."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.certfile, self.keyfile)
        return context


def make_certificate(directory, name):
    """A self-signed ECDSA certificate for `name`, written as PEM files to `directory`."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = directory / f"{name}.pem", directory / f"{name}.key"
    certfile.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
    return Certificate(certificate.public_bytes(serialization.Encoding.DER), str(certfile), str(keyfile))


@pytest.fixture(scope="session")
def certificates(tmp_path_factory):
    directory = tmp_path_factory.mktemp("certificates")
    return {name: make_certificate(directory, name) for name in ("default.test", "other.test")}


class Peer:
    """The server's end of one connection, for a handler to script its side."""

    def __init__(self, connection, server):
        self.connection = connection
        self.server = server
        self.buffer = b""

    def send(self, data):
        self.connection.sendall(data.encode() if isinstance(data, str) else data)

    def read_until(self, marker):
        while marker not in self.buffer:
            chunk = self.connection.recv(4096)
            if not chunk:
                raise EOFError(f"the client closed the connection after {self.buffer!r}")
            self.buffer += chunk
        data, _, self.buffer = self.buffer.partition(marker)
        return data + marker

    def line(self):
        return self.read_until(b"\n").rstrip(b"\r\n").decode()

    def read(self, count):
        while len(self.buffer) < count:
            self.buffer += self.connection.recv(4096) or b"EOF"
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def quiet(self, seconds):
        """Return whether the client sends nothing (and does not close) for `seconds`."""
        return not select.select([self.connection], [], [], seconds)[0]

    def closed(self, seconds=GENEROUS):
        """Drop what the client sends until it closes the connection; return True when
        it does, False if it is still connected after `seconds` (a deadline)."""
        deadline = time.monotonic() + seconds
        try:
            while select.select([self.connection], [], [], max(0.0, deadline - time.monotonic()))[0]:
                if not self.connection.recv(4096):
                    return True
        except ConnectionResetError:
            return True
        return False

    def finish_tls(self):
        """Do the server's side of the handshake, then note what the client sends over TLS
        before it closes (its goodbye) as server.notes["after"]."""
        assert not self.buffer, "the client talked before the handshake"
        self.connection = self.server.context.wrap_socket(self.connection, server_side=True)
        self.server.notes["after"] = self.rest()

    def rest(self):
        """Return what the client sends until it closes."""
        data = b""
        try:
            while chunk := self.connection.recv(4096):
                data += chunk
        except (ConnectionResetError, ssl.SSLEOFError):
            pass
        return data

    def hang(self):
        self.server.stopping.wait(GENEROUS)


class Server:
    """A TCP server on its own thread, running `handler(peer)` for one connection at a time."""

    def __init__(self, handler, context, host="127.0.0.1"):
        self.handler, self.context = handler, context
        self.listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.listener.bind((host, 0))
        self.listener.listen(16)
        self.listener.settimeout(0.05)  # to notice `stopping`
        self.port = self.listener.getsockname()[1]
        self.stopping = threading.Event()
        self.notes = {}
        self.errors = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stopping.is_set():
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                continue
            connection.settimeout(GENEROUS)
            peer = Peer(connection, self)
            try:
                self.handler(peer)
            except Exception as error:
                self.errors.append(error)
            finally:
                peer.connection.close()
                connection.close()

    def stop(self):
        """Stop serving, once the connection at hand is done; raise a handler's error."""
        self.stopping.set()
        self.thread.join(GENEROUS)
        self.listener.close()
        assert not self.thread.is_alive()
        if self.errors:
            raise self.errors[0]


@pytest.fixture
def serve(certificates):
    """serve(handler, context=None, host="127.0.0.1") starts a Server (by default with the
    default.test certificate); every server is stopped when the test ends."""
    servers = []

    def start(handler, context=None, host="127.0.0.1"):
        servers.append(Server(handler, context or certificates["default.test"].context(), host))
        return servers[-1]

    yield start
    for server in servers:
        server.stopping.set()
    for server in servers:
        server.stop()


def endpoint(scheme, server, host="127.0.0.1"):
    return endpoint_module.parse_endpoint(f"{scheme}://{host}:{server.port}")


def fetch(scheme, server, server_name="mail.test", timeout=GENEROUS):
    return probe.fetch(endpoint(scheme, server), server_name, timeout)


# One handler per protocol, each speaking its server side up to the handshake.


def smtp_server(peer, banner=("220 mail.test ESMTP",), capabilities=("PIPELINING", "STARTTLS", "8BITMIME")):
    peer.send("".join(line + "\r\n" for line in banner))
    assert peer.line() == "EHLO certrelay.invalid"
    lines = ["mail.test", *capabilities]
    peer.send("".join(f"250-{line}\r\n" for line in lines[:-1]) + f"250 {lines[-1]}\r\n")
    assert peer.line() == "STARTTLS"
    peer.send("220 2.0.0 Ready to start TLS\r\n")
    peer.finish_tls()


def imap_server(peer):
    peer.send("* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] ready\r\n")
    assert peer.line() == "a STARTTLS"
    peer.send("* CAPABILITY IMAP4rev1 STARTTLS\r\na OK Begin TLS negotiation now\r\n")
    peer.finish_tls()


def pop3_server(peer):
    peer.send("+OK Dovecot ready.\r\n")
    assert peer.line() == "STLS"
    peer.send("+OK Begin TLS negotiation now.\r\n")
    peer.finish_tls()


def sieve_server(peer):
    peer.send('"IMPLEMENTATION" "Dovecot Pigeonhole"\r\n"SIEVE" "fileinto reject"\r\n"STARTTLS"\r\n'
              '"VERSION" "1.0"\r\nOK "Dovecot ready."\r\n')
    assert peer.line() == "STARTTLS"
    peer.send('OK "Begin TLS negotiation now."\r\n')
    peer.finish_tls()


def ftp_server(peer):
    peer.send("220-Welcome\r\n  to this FTP server\r\n220 ready\r\n")
    assert peer.line() == "AUTH TLS"
    peer.send("234 AUTH TLS successful\r\n")
    peer.finish_tls()


def xmpp_server(peer):
    peer.server.notes["header"] = peer.read_until(b"'>")
    peer.send("<?xml version='1.0'?><stream:stream from='xmpp.test' id='x1' version='1.0'"
              " xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>")
    peer.send("<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls>"
              "<mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>SCRAM-SHA-1</mechanism>"
              "</mechanisms></stream:features>")
    assert peer.read_until(b"/>") == b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
    peer.send("<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    peer.finish_tls()


def ldap_response(result_code, diagnostic=b"", long_form=False):
    """An ExtendedResponse to message 1 with the responseName; `long_form` lengths are
    4 bytes, as OpenLDAP writes them."""
    def length(content):
        return (b"\x84" + len(content).to_bytes(4, "big")) if long_form else bytes([len(content)])

    body = (b"\x0a\x01" + bytes([result_code]) + b"\x04\x00" + b"\x04" + length(diagnostic) + diagnostic
            + b"\x8a" + length(LDAP_STARTTLS_OID) + LDAP_STARTTLS_OID)
    message = b"\x02\x01\x01" + b"\x78" + length(body) + body
    return b"\x30" + length(message) + message


# LDAPMessage { messageID 1, [APPLICATION 23] ExtendedRequest { [0] requestName } }
LDAP_REQUEST = b"\x30\x1d\x02\x01\x01\x77\x18\x80\x16" + LDAP_STARTTLS_OID
LDAP_UNBIND = b"\x30\x05\x02\x01\x02\x42\x00"  # message 2, [APPLICATION 2] NULL


def ldap_server(peer):
    assert peer.read(len(LDAP_REQUEST)) == LDAP_REQUEST
    peer.send(ldap_response(0, long_form=True))
    peer.finish_tls()


def postgres_server(peer):
    assert peer.read(8) == bytes.fromhex("0000000804d2162f")
    peer.send(b"S")
    peer.finish_tls()


def tls_server(peer):
    peer.finish_tls()


@pytest.mark.parametrize(
    "scheme, handler, goodbye",
    [
        ("tls", tls_server, b""),
        ("imaps", tls_server, b""),
        ("smtp", smtp_server, b"QUIT\r\n"),
        ("submission", smtp_server, b"QUIT\r\n"),
        ("imap", imap_server, b"a LOGOUT\r\n"),
        ("pop3", pop3_server, b"QUIT\r\n"),
        ("sieve", sieve_server, b"LOGOUT\r\n"),
        ("ftp", ftp_server, b"QUIT\r\n"),
        ("xmpp", xmpp_server, b"<?xml version='1.0'?><stream:stream to=\"mail.test\" version='1.0'"
                              b" xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'></stream:stream>"),
        ("ldap", ldap_server, LDAP_UNBIND),
        ("postgres", postgres_server, b""),
    ],
)
def test_fetch_returns_the_served_certificate_and_says_goodbye(serve, certificates, scheme, handler, goodbye):
    server = serve(handler)

    served = fetch(scheme, server)
    server.stop()

    assert served.error is None
    assert served.der == certificates["default.test"].der
    assert served.sha256 == hashlib.sha256(served.der).hexdigest()
    assert (served.endpoint.scheme, served.server_name) == (scheme, "mail.test")
    assert server.notes["after"] == goodbye


def test_xmpp_stream_is_addressed_to_the_server_name(serve):
    server = serve(xmpp_server)

    assert fetch("xmpp", server, "xmpp.test").error is None
    server.stop()
    assert b'to="xmpp.test"' in server.notes["header"]


def test_an_xmpp_stream_is_never_addressed_to_an_ip_address(serve):
    """Without a name, the probe says what to write instead of connecting."""
    server = serve(xmpp_server)

    served = fetch("xmpp", server, None)

    assert served.error.startswith("no domain to address the XMPP stream to (an IP address is none)")
    assert "xmpp://HOST?sni=DOMAIN" in served.error


def test_smtp_says_nothing_before_a_multiline_banner_ends(serve):
    def postscreen(peer):
        peer.send("220-mail.test ESMTP postscreen\r\n")
        quiet = peer.quiet(0.3)
        peer.send("220-please wait\r\n")
        peer.server.notes["quiet"] = quiet and peer.quiet(0.3)
        smtp_server(peer, banner=("220 mail.test ESMTP",))

    server = serve(postscreen)

    served = fetch("smtp", server)
    server.stop()

    assert served.error is None
    assert server.notes["quiet"] is True


@pytest.mark.parametrize("capabilities", [("PIPELINING", "STARTTLS"), ("STARTTLS",), ("starttls", "8BITMIME")])
def test_smtp_finds_starttls_anywhere_among_the_capabilities(serve, certificates, capabilities):
    server = serve(lambda peer: smtp_server(peer, capabilities=capabilities))

    assert fetch("smtp", server).der == certificates["default.test"].der


def refusing_smtp(reply):
    def handler(peer):
        peer.send("220 mail.test ESMTP\r\n")
        peer.line()
        peer.send("250-mail.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
        assert peer.line() == "STARTTLS"
        peer.send(reply + "\r\n")
        peer.server.notes["after"] = peer.rest()
    return handler


def test_smtp_starttls_refused_names_the_reply_and_quits(serve):
    server = serve(refusing_smtp("454 4.7.0 TLS not available due to local problem"))

    served = fetch("smtp", server)
    server.stop()

    assert served.error == "STARTTLS refused: 454 4.7.0 TLS not available due to local problem"
    assert served.der is None
    assert served.sha256 is None
    assert server.notes["after"] == b"QUIT\r\n"


def test_smtp_without_starttls_capability_quits(serve):
    def plain(peer):
        peer.send("220 mail.test ESMTP\r\n")
        peer.line()
        peer.send("250-mail.test\r\n250 PIPELINING\r\n")
        peer.server.notes["after"] = peer.rest()

    server = serve(plain)

    served = fetch("smtp", server)
    server.stop()

    assert served.error == "the server does not offer STARTTLS"
    assert server.notes["after"] == b"QUIT\r\n"


def refusing(greeting, reply, request=b"\n"):
    """A server that greets, reads the client's request up to the bytes `request` (or
    `request` bytes), refuses, and notes what the client sends next as notes["after"]."""
    def handler(peer):
        peer.send(greeting)
        peer.read(request) if isinstance(request, int) else peer.read_until(request)
        peer.send(reply)
        peer.server.notes["after"] = peer.rest()
    return handler


def greeting_only(greeting):
    """A server that sends `greeting`, then notes what the client sends as notes["after"]."""
    def handler(peer):
        peer.send(greeting)
        peer.server.notes["after"] = peer.rest()
    return handler


@pytest.mark.parametrize(
    "scheme, handler, error, goodbye",
    [
        ("imap", refusing("* OK ready\r\n", "a NO [UNAVAILABLE] TLS broken\r\n"),
         "STARTTLS refused: a NO [UNAVAILABLE] TLS broken", b"a LOGOUT\r\n"),
        ("imap", greeting_only("* BYE go away\r\n"), "unexpected greeting: * BYE go away", b"a LOGOUT\r\n"),
        ("pop3", refusing("+OK ready\r\n", "-ERR no TLS\r\n"), "STLS refused: -ERR no TLS", b"QUIT\r\n"),
        ("sieve", refusing('"STARTTLS"\r\nOK "ready"\r\n', 'NO "no TLS"\r\n'), 'STARTTLS refused: NO "no TLS"',
         b"LOGOUT\r\n"),
        ("sieve", greeting_only('"SIEVE" "fileinto"\r\nOK "ready"\r\n'), "the server does not offer STARTTLS",
         b"LOGOUT\r\n"),
        ("ftp", refusing("220 ready\r\n", "530 no TLS\r\n"), "AUTH TLS refused: 530 no TLS", b"QUIT\r\n"),
        ("ftp", greeting_only("421 too many users\r\n"), "unexpected greeting: 421 too many users", b"QUIT\r\n"),
        ("ldap", refusing(b"", ldap_response(2, b"unsupported extended operation"), len(LDAP_REQUEST)),
         "StartTLS refused: LDAP result 2: unsupported extended operation", LDAP_UNBIND),
        ("postgres", refusing(b"", b"N", 8), "server refused SSL (N)", b""),
        ("postgres", refusing(b"", b"\x00", 8), "server refused SSL (00)", b""),
        ("xmpp", refusing("<stream:stream><stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
                          "</stream:features>", "<failure xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>", b"tls'/>"),
         "STARTTLS refused: <failure/>", b"</stream:stream>"),
        ("xmpp", greeting_only("<stream:stream><stream:features><bind/></stream:features>"),
         "the server does not offer STARTTLS", b"</stream:stream>"),
        ("xmpp", greeting_only("<stream:stream><stream:error><host-unknown xmlns='x'/></stream:error>"),
         "XMPP stream error waiting for the stream features: host-unknown", b"streams'>"),  # nothing to close
    ],
)
def test_refusals_name_the_reply_and_say_goodbye(serve, scheme, handler, error, goodbye):
    server = serve(handler)

    served = fetch(scheme, server)
    server.stop()

    assert (served.der, served.error) == (None, error)
    assert server.notes["after"].endswith(goodbye)


def test_accepting_starttls_but_never_handshaking_times_out_in_the_timeout(serve):
    def stalling(peer):
        peer.send("220 mail.test ESMTP\r\n")
        peer.line()
        peer.send("250-mail.test\r\n250 STARTTLS\r\n")
        peer.line()
        peer.send("220 go ahead\r\n")
        peer.server.notes["client gave up"] = peer.closed()  # its ClientHello is never answered

    server = serve(stalling)

    served = fetch("smtp", server, timeout=TIMEOUT)
    server.stop()

    assert served.error == "timed out after 1 s during the TLS handshake"
    assert server.notes["client gave up"] is True  # it closed, the server never did


def test_the_handshake_waits_what_is_left_of_the_one_deadline_not_a_timeout_of_its_own(serve, monkeypatch):
    # probe's clock is a fake that only the server moves: when the dialogue before the
    # handshake has (on that clock) used all but TIMEOUT of an hour, the handshake gets
    # TIMEOUT of real time; one with an hour of its own outlasts the server's patience.
    clock = [0.0]
    fake_time = types.SimpleNamespace(**vars(time))
    fake_time.monotonic = lambda: clock[0]
    monkeypatch.setattr(probe, "time", fake_time)

    def stalling(peer):
        peer.send("220 mail.test ESMTP\r\n")
        peer.line()
        peer.send("250-mail.test\r\n250 STARTTLS\r\n")
        peer.line()
        clock[0] = 3600 - TIMEOUT
        peer.send("220 go ahead\r\n")
        peer.server.notes["client gave up"] = peer.closed()  # by the server's clock, GENEROUS

    server = serve(stalling)

    served = fetch("smtp", server, timeout=3600)
    server.stop()

    assert served.error == "timed out after 3600 s during the TLS handshake"
    assert server.notes["client gave up"] is True


def test_a_banner_dripping_forever_still_times_out_at_the_deadline(serve):
    def dripping(peer):
        # A line every DRIP: a timeout that restarts with each line never fires. The drip
        # ends only after GENEROUS (a deadline), so a client that gives up in its own
        # timeout closes while it still goes on.
        for _ in range(round(GENEROUS / DRIP)):
            try:
                peer.send("220-still here\r\n")
            except OSError:  # the client closed (and reset) already
                break
            if peer.closed(DRIP):
                break
        else:
            peer.server.notes["drip ended"] = True
            peer.closed()

    server = serve(dripping)

    served = fetch("smtp", server, timeout=TIMEOUT)
    server.stop()

    assert served.error == "timed out after 1 s waiting for the greeting"
    assert "drip ended" not in server.notes  # one deadline for the greeting, not reset by every line


@pytest.mark.parametrize(
    "scheme, errors",
    [
        ("smtp", ["connection closed by the server waiting for the greeting"]),
        ("postgres", ["connection closed by the server waiting for the SSLRequest reply",
                      "connection reset by peer waiting for the SSLRequest reply"]),
        ("tls", ["connection closed by the server during the TLS handshake",
                 "connection reset by peer during the TLS handshake"]),
    ],
)
def test_a_server_that_closes_at_once(serve, scheme, errors):
    server = serve(lambda peer: None)

    assert fetch(scheme, server).error in errors


def test_a_closed_port_is_connection_refused():
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]

    served = probe.fetch(endpoint_module.parse_endpoint(f"smtp://127.0.0.1:{port}"), None, GENEROUS)

    assert (served.der, served.error) == (None, "connection refused")


def flooding(unit):
    """A server that sends `unit` until the client gives up."""
    def handler(peer):
        try:
            while not peer.server.stopping.is_set():
                peer.send(unit * 1024)
        except OSError:
            pass
    return handler


@pytest.mark.parametrize(
    "scheme, handler, error",
    [
        ("smtp", flooding(b"A"), "the server sent a line of more than 4096 bytes waiting for the greeting"),
        ("smtp", flooding(b"220-more\r\n"),
         "the server sent a reply of more than 100 lines waiting for the greeting"),
        ("imap", flooding(b"\x00\xff\n"), "unexpected greeting: \x00\ufffd".replace("\x00", "?")),
        ("xmpp", flooding(b"<x/>"), "the server sent more than 16384 bytes waiting for the stream features"),
        ("ldap", flooding(b"\x30\x84\xff\xff\xff\xff"),
         "an LDAP message of 4294967295 bytes waiting for the StartTLS response"),
        ("ldap", flooding(b"\x02"), "not an LDAP message waiting for the StartTLS response"),
    ],
)
def test_a_flood_of_garbage_is_an_error_not_a_hang_or_a_memory_blowup(serve, scheme, handler, error):
    server = serve(handler)

    assert fetch(scheme, server).error == error


def test_a_plain_text_server_on_a_tls_port_fails_the_handshake(serve):
    server = serve(greeting_only("220 mail.test ESMTP\r\n"))

    error = fetch("tls", server).error

    assert error.startswith("TLS handshake failed: ")  # the reason's wording depends on OpenSSL's version


def test_control_characters_in_a_reply_do_not_reach_the_log(serve):
    server = serve(refusing("220 ok\r\n", "454 \x1b[31mred\x07 alert\r\n"))

    assert fetch("ftp", server).error == "AUTH TLS refused: 454 ?[31mred? alert"


def test_data_pipelined_after_the_starttls_reply_is_refused(serve):
    def injecting(peer):
        peer.send("220 mail.test ESMTP\r\n")
        peer.line()
        peer.send("250-mail.test\r\n250 STARTTLS\r\n")
        peer.line()
        peer.send("220 go ahead\r\n250 injected\r\n")
        peer.rest()

    server = serve(injecting)

    assert fetch("smtp", server).error == (
        "the server sent data it should not have before the TLS handshake: b'250 injected\\r\\n'"
    )


@pytest.fixture
def sni_server(serve, certificates):
    """A TLS server that serves other.test to an SNI under other.test, else default.test;
    server.notes["seen"] lists the SNI of each connection (None for none)."""
    context = certificates["default.test"].context()
    seen = []

    def choose(ssl_socket, name, _):
        seen.append(name)
        if name and name.endswith("other.test"):
            ssl_socket.context = certificates["other.test"].context()

    context.sni_callback = choose
    server = serve(tls_server, context)
    server.notes["seen"] = seen
    return server


def test_the_server_name_is_sent_as_sni_and_picks_the_certificate(sni_server, certificates):
    by_name = [
        (endpoint_module.server_name(endpoint("tls", sni_server), ["other.test"]), "other.test"),
        (endpoint_module.server_name(endpoint("tls", sni_server), ["*.other.test"]), "other.test"),
        (endpoint_module.server_name(endpoint_module.parse_endpoint(f"tls://127.0.0.1:{sni_server.port}?sni=www.other.test"), []),
         "other.test"),
        (None, "default.test"),
        ("127.0.0.1", "default.test"),
        ("www.default.test", "default.test"),
    ]

    served = [fetch("tls", sni_server, name) for name, _ in by_name]
    sni_server.stop()

    assert [result.der for result in served] == [certificates[expected].der for _, expected in by_name]
    assert sni_server.notes["seen"] == [
        "other.test", "certrelay-probe.other.test", "www.other.test", None, None, "www.default.test"
    ]


def test_a_host_name_is_resolved_and_sent_as_sni(sni_server, certificates):
    localhost = endpoint_module.parse_endpoint(f"tls://localhost:{sni_server.port}")

    served = probe.fetch(localhost, endpoint_module.server_name(localhost, ["other.test"]), GENEROUS)
    sni_server.stop()

    assert served.der == certificates["default.test"].der
    assert sni_server.notes["seen"] == ["localhost"]


def ipv6_available():
    try:
        with socket.socket(socket.AF_INET6) as probe_socket:
            probe_socket.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_available(), reason="::1 is not available")
def test_ipv6(serve, certificates):
    server = serve(smtp_server, host="::1")

    served = probe.fetch(endpoint_module.parse_endpoint(f"smtp://[::1]:{server.port}"), None, GENEROUS)

    assert served.der == certificates["default.test"].der


def test_an_unresolvable_name_is_an_error():
    served = probe.fetch(endpoint_module.parse_endpoint("smtp://certrelay-probe.invalid"), None, TIMEOUT)

    assert served.error in ("cannot resolve certrelay-probe.invalid: Name or service not known",
                            "timed out after 1 s while resolving the host name")


def test_a_name_the_ssl_module_refuses_as_sni_is_an_error_not_an_exception(serve):
    server = serve(lambda peer: peer.rest())

    assert fetch("tls", server, "a" * 64 + ".test").error.startswith("cannot send 'aaaa")


class Silent:
    """A server that accepts every connection and never says a word, holding each until
    the client closes it; `most` is the most connections it held at once."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=16)
        self.port = self.listener.getsockname()[1]
        self.held, self.most = [], 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stopping.is_set():
            for ready in select.select([self.listener, *self.held], [], [], 0.05)[0]:
                if ready is self.listener:
                    self.held.append(self.listener.accept()[0])
                    self.most = max(self.most, len(self.held))
                    continue
                try:
                    if ready.recv(4096):
                        continue
                except ConnectionResetError:
                    pass
                self.held.remove(ready)
                ready.close()

    def stop(self):
        self.stopping.set()
        self.thread.join(GENEROUS)
        assert not self.thread.is_alive()
        for connection in [self.listener, *self.held]:
            connection.close()


def test_fetch_many_probes_concurrently_keeping_the_order(serve, certificates):
    good = serve(tls_server)
    other = serve(tls_server, certificates["other.test"].context())
    smtp = serve(smtp_server)
    silent = Silent()
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        requests = [
            (endpoint("tls", good), None),
            (endpoint_module.parse_endpoint(f"smtp://127.0.0.1:{silent.port}"), None),
            (endpoint("smtp", smtp), "mail.test"),
            (endpoint_module.parse_endpoint(f"tls://127.0.0.1:{closed.getsockname()[1]}"), None),
            (endpoint("tls", other), "other.test"),
            (endpoint_module.parse_endpoint(f"smtp://127.0.0.1:{silent.port}"), None),
        ]

        try:
            served = probe.fetch_many(iter(requests), TIMEOUT)
        finally:
            silent.stop()

    assert [(result.endpoint, result.server_name) for result in served] == requests
    assert [result.der for result in served] == [
        certificates["default.test"].der, None, certificates["default.test"].der, None,
        certificates["other.test"].der, None,
    ]
    assert [result.error for result in served] == [
        None, "timed out after 1 s waiting for the greeting", None, "connection refused", None,
        "timed out after 1 s waiting for the greeting",
    ]
    assert silent.most == 2  # both silent probes waited at once: one timeout, not the sum of two


def test_fetch_many_of_nothing():
    assert probe.fetch_many([], TIMEOUT) == []
