"""Fetch the leaf certificate an endpoint serves, over TLS or STARTTLS.

After a renewal certrelay restarts services; this is the wire layer that checks what
they serve now. Given an endpoint.Endpoint (`smtp://mail.example.ch`,
`tls://[2001:db8::1]:8443?sni=www.example.ch`), it connects, speaks just enough of the
protocol to start TLS, and returns the leaf certificate's DER.

Nothing is verified (an expired or self-signed certificate must be seen too) and no
credentials are ever sent. Every step, from the name lookup to the end of the TLS
handshake, shares one deadline, and reads are bounded, so that a dead, slow or hostile
service costs its own timeout and a few kilobytes, nothing more.
"""

import concurrent.futures
import dataclasses
import hashlib
import re
import socket
import ssl
import threading
import time
from xml.sax.saxutils import quoteattr

from certrelay import endpoint as endpoint_module

CLIENT_NAME = "certrelay.invalid"  # EHLO name: fixed, since getfqdn() is a DNS lookup that can stall
MAX_LINE = 4096  # bytes of one protocol line
MAX_LINES = 100  # lines of one reply (banner, capabilities)
MAX_MESSAGE = 16 * 1024  # bytes of an XMPP stream prelude or an LDAP response
CHUNK = 4096
# LDAPMessage SEQUENCE { messageID 1, [APPLICATION 23] ExtendedRequest { [0] the StartTLS OID } }
LDAP_STARTTLS = b"\x30\x1d\x02\x01\x01\x77\x18\x80\x16" + b"1.3.6.1.4.1.1466.20037"
LDAP_UNBIND = b"\x30\x05\x02\x01\x02\x42\x00"  # messageID 2, [APPLICATION 2] UnbindRequest NULL
POSTGRES_SSL_REQUEST = bytes.fromhex("0000000804d2162f")  # length 8, code 80877103


class ProbeError(Exception):
    """The probe failed for a reason the message states in one short line."""


@dataclasses.dataclass(frozen=True)
class Served:
    """What `endpoint` served when asked with `server_name` (the SNI, or None).

    `der` is the leaf certificate's DER; when it is None, `error` says why in one line.
    """

    endpoint: object  # endpoint.Endpoint
    server_name: str | None
    der: bytes | None
    error: str | None

    @property
    def sha256(self):
        """The SHA-256 hex digest of `der`, or None."""
        return None if self.der is None else hashlib.sha256(self.der).hexdigest()


def fetch(endpoint, server_name, timeout):
    """Connect to `endpoint` (an Endpoint), start TLS sending the SNI `server_name` (a
    name, or None or an IP address for none), and return a Served with the leaf
    certificate's DER, or with the error that prevented it.

    Never raises. Everything shares `timeout` seconds: the name lookup, each connect,
    every read and write, and the handshake.
    """
    conversation = _Conversation(time.monotonic() + timeout)
    try:
        conversation.connect(endpoint.host, endpoint.port)
        goodbye = b""
        if endpoint_module.SCHEMES[endpoint.scheme][1] == "starttls":
            goodbye = STARTTLS[endpoint.scheme](conversation, server_name or endpoint.host)
        der = conversation.start_tls(server_name)
        conversation.send_quietly(goodbye)
        return Served(endpoint, server_name, der, None)
    except ProbeError as error:
        message = str(error)
    except OSError as error:
        message = _describe(error, conversation.phase, timeout)
    except Exception as error:  # a bug, or something unforeseen in a hostile reply: still a result
        message = f"unexpected {type(error).__name__} {conversation.phase}: {_printable(str(error))}"
    finally:
        conversation.close()
    return Served(endpoint, server_name, None, message)


def fetch_many(requests, timeout, concurrency=16):
    """Fetch each of `requests` (an iterable of (Endpoint, server name) pairs) on up to
    `concurrency` threads, each with its own `timeout`; return the Served results in
    the order of `requests`.
    """
    requests = list(requests)
    if not requests:
        return []
    workers = max(1, min(concurrency, len(requests)))
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="certrelay-probe") as pool:
        return list(pool.map(lambda request: fetch(request[0], request[1], timeout), requests))


def _describe(error, phase, timeout):
    """Return one log line for an OSError (ssl errors included) raised `phase`."""
    if isinstance(error, TimeoutError):
        return f"timed out after {timeout:g} s {phase}"
    if isinstance(error, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return f"connection closed by the server {phase}"
    if isinstance(error, ssl.SSLError):
        reason = error.reason.lower().replace("_", " ") if error.reason else str(error)
        return f"TLS handshake failed: {reason}"
    text = error.strerror or str(error) or type(error).__name__
    text = text[:1].lower() + text[1:]
    return text if phase == "while connecting" else f"{text} {phase}"


def _printable(text, limit=120):
    """Return server-supplied `text` safe for one log line: no control characters, short."""
    text = "".join(character if character.isprintable() else "?" for character in text.strip())
    return text if len(text) <= limit else text[:limit] + "..."


def _resolve(host, port, deadline):
    """Return getaddrinfo's TCP addresses of `host` (a name or an IP address) and `port`.

    A name is looked up on a helper thread, abandoned at `deadline` (time.monotonic()):
    the resolver's own timeouts are longer, and would stretch the probe's.
    """
    if endpoint_module.ip_address(host) is not None:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    outcome = []

    def look_up():
        try:
            outcome.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except Exception as error:
            outcome.append(error)

    thread = threading.Thread(target=look_up, name=f"resolve {host}", daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    if not outcome:
        raise TimeoutError
    if isinstance(outcome[0], Exception):
        reason = getattr(outcome[0], "strerror", None) or outcome[0]
        raise ProbeError(f"cannot resolve {host}: {reason}")
    return outcome[0]


class _Conversation:
    """One TCP connection under a deadline, with a bounded read buffer.

    `phase` says what the client is doing, for error messages ("during the TLS
    handshake").
    """

    def __init__(self, deadline):
        self.deadline = deadline
        self.sock = None
        self.buffer = bytearray()
        self.phase = "while connecting"

    def _arm(self, sock=None):
        """Give the next socket operation what is left of the deadline, or raise TimeoutError."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        (sock or self.sock).settimeout(remaining)

    def connect(self, host, port):
        """Connect to the first of `host`'s addresses that accepts; raise the last failure."""
        self.phase = "while resolving the host name"
        addresses = _resolve(host, port, self.deadline)
        self.phase = "while connecting"
        failure = ProbeError(f"{host} has no address")
        for family, kind, protocol, _, address in addresses:
            sock = None
            try:
                sock = socket.socket(family, kind, protocol)  # fails where IPv6 is disabled
                self._arm(sock)
                sock.connect(address)
            except OSError as error:
                if sock is not None:
                    sock.close()
                failure = error
                continue
            self.sock = sock
            return
        raise failure

    def send(self, data):
        self._arm()
        self.sock.sendall(data)

    def send_quietly(self, data):
        """Send `data` if possible: a goodbye must not turn a result into an error."""
        try:
            if data:
                self.send(data)
        except OSError:
            pass

    def give_up(self, message, goodbye):
        """Say `goodbye` (bytes) to the server, then raise ProbeError(message)."""
        self.send_quietly(goodbye)
        raise ProbeError(message)

    def _receive(self):
        self._arm()
        chunk = self.sock.recv(CHUNK)
        if not chunk:
            raise ProbeError(f"connection closed by the server {self.phase}")
        self.buffer += chunk

    def read_bytes(self, count):
        """Return the next `count` bytes."""
        while len(self.buffer) < count:
            self._receive()
        data = bytes(self.buffer[:count])
        del self.buffer[:count]
        return data

    def read_line(self):
        """Return the next line as str, without its line end."""
        while (end := self.buffer.find(b"\n")) < 0:
            if len(self.buffer) >= MAX_LINE:
                raise ProbeError(f"the server sent a line of more than {MAX_LINE} bytes {self.phase}")
            self._receive()
        line = self.read_bytes(end + 1)
        return line.rstrip(b"\r\n").decode("utf-8", "replace")

    def read_until(self, pattern):
        """Read until the compiled bytes regex `pattern` matches; return the match and
        drop the buffer up to its end."""
        while not (match := pattern.search(bytes(self.buffer))):
            if len(self.buffer) >= MAX_MESSAGE:
                raise ProbeError(f"the server sent more than {MAX_MESSAGE} bytes {self.phase}")
            self._receive()
        del self.buffer[:match.end()]
        return match

    def read_reply(self):
        """Read an SMTP or FTP reply, `NNN text` or `NNN-text` lines up to `NNN text`.

        Return (code, lines); the code is a 3-digit str.
        """
        lines = [self.read_line()]
        code = lines[0][:3]
        if not (code.isascii() and code.isdigit() and lines[0][3:4] in ("", " ", "-")):
            raise ProbeError(f"garbled reply {self.phase}: {_printable(lines[0])}")
        while lines[-1][:3] != code or lines[-1][3:4] == "-":
            if len(lines) == MAX_LINES:
                raise ProbeError(f"the server sent a reply of more than {MAX_LINES} lines {self.phase}")
            lines.append(self.read_line())
        return code, lines

    def expect(self, phase, command, code, refused):
        """For reply-code protocols (SMTP, FTP): send `command` (bytes; nothing if
        empty) while in `phase`, read the reply, and give up with `refused` and QUIT
        unless its code is `code`; return its lines."""
        self.phase = phase
        if command:
            self.send(command)
        found, lines = self.read_reply()
        if found != code:
            self.give_up(f"{refused}: {_printable(lines[-1])}", b"QUIT\r\n")
        return lines

    def start_tls(self, server_name):
        """Do the TLS handshake, sending `server_name` as SNI unless it is None or an IP
        address; return the leaf certificate's DER."""
        if self.buffer:  # bytes sent ahead of the handshake are an injection attempt or garbage
            early = _printable(repr(bytes(self.buffer)))
            raise ProbeError(f"the server sent data it should not have before the TLS handshake: {early}")
        self.phase = "during the TLS handshake"
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        sni = server_name if server_name and endpoint_module.ip_address(server_name) is None else None
        if sni is not None:
            try:  # as wrap_socket will, but before it takes the socket over, leaking it on failure
                sni.encode("idna")
            except UnicodeError:  # an empty or overlong label
                raise ProbeError(f"cannot send {_printable(repr(sni))} as SNI: not a valid host name") from None
        self.sock = context.wrap_socket(self.sock, server_hostname=sni, do_handshake_on_connect=False)
        self._arm()
        self.sock.do_handshake()
        der = self.sock.getpeercert(binary_form=True)
        if not der:
            raise ProbeError("the server sent no certificate")
        self.phase = "after the TLS handshake"
        return der

    def close(self):
        if self.sock is not None:
            self.sock.close()


# STARTTLS dialogues: each takes the _Conversation and the domain the client asks for,
# leaves the connection ready for the ClientHello, and returns what to send over TLS to
# end the session politely (b"" for nothing).


def _smtp(conversation, domain):
    # Up to the final "220 ": postscreen bans clients that talk early.
    conversation.expect("waiting for the greeting", b"", "220", "unexpected greeting")
    lines = conversation.expect("waiting for the EHLO reply", f"EHLO {CLIENT_NAME}\r\n".encode(), "250", "EHLO refused")
    if not any(line[4:].strip().upper() == "STARTTLS" for line in lines[1:]):
        conversation.give_up("the server does not offer STARTTLS", b"QUIT\r\n")
    conversation.expect("waiting for the STARTTLS reply", b"STARTTLS\r\n", "220", "STARTTLS refused")
    return b"QUIT\r\n"


def _imap(conversation, domain):
    conversation.phase = "waiting for the greeting"
    greeting = conversation.read_line()
    if not greeting.upper().startswith("* OK"):
        conversation.give_up(f"unexpected greeting: {_printable(greeting)}", b"a LOGOUT\r\n")
    conversation.phase = "waiting for the STARTTLS reply"
    conversation.send(b"a STARTTLS\r\n")
    for _ in range(MAX_LINES):
        line = conversation.read_line()
        if line.startswith("* "):  # untagged data, e.g. CAPABILITY
            continue
        if line.upper().startswith("A OK"):
            return b"a LOGOUT\r\n"
        conversation.give_up(f"STARTTLS refused: {_printable(line)}", b"a LOGOUT\r\n")
    raise ProbeError(f"no tagged reply within {MAX_LINES} lines {conversation.phase}")


def _pop3(conversation, domain):
    conversation.phase = "waiting for the greeting"
    greeting = conversation.read_line()
    if not greeting.startswith("+OK"):
        conversation.give_up(f"unexpected greeting: {_printable(greeting)}", b"QUIT\r\n")
    conversation.phase = "waiting for the STLS reply"
    conversation.send(b"STLS\r\n")
    reply = conversation.read_line()
    if not reply.startswith("+OK"):
        conversation.give_up(f"STLS refused: {_printable(reply)}", b"QUIT\r\n")
    return b"QUIT\r\n"


def _sieve(conversation, domain):
    conversation.phase = "waiting for the greeting"
    capabilities = []
    while not (line := conversation.read_line()).upper().startswith(("OK", "NO", "BYE")):
        if len(capabilities) == MAX_LINES:
            raise ProbeError(f"more than {MAX_LINES} capability lines {conversation.phase}")
        capabilities.append(line.split(" ", 1)[0].upper())
    if not line.upper().startswith("OK"):
        conversation.give_up(f"unexpected greeting: {_printable(line)}", b"LOGOUT\r\n")
    if '"STARTTLS"' not in capabilities:
        conversation.give_up("the server does not offer STARTTLS", b"LOGOUT\r\n")
    conversation.phase = "waiting for the STARTTLS reply"
    conversation.send(b"STARTTLS\r\n")
    reply = conversation.read_line()
    if not reply.upper().startswith("OK"):
        conversation.give_up(f"STARTTLS refused: {_printable(reply)}", b"LOGOUT\r\n")
    return b"LOGOUT\r\n"


def _ftp(conversation, domain):
    conversation.phase = "waiting for the greeting"
    code, lines = conversation.read_reply()
    if code == "120":  # "ready in N minutes", then the real greeting
        code, lines = conversation.read_reply()
    if code != "220":
        conversation.give_up(f"unexpected greeting: {_printable(lines[-1])}", b"QUIT\r\n")
    conversation.expect("waiting for the AUTH TLS reply", b"AUTH TLS\r\n", "234", "AUTH TLS refused")
    return b"QUIT\r\n"


XMPP_STREAM_ERROR = rb"<stream:error>\s*<([\w-]+)|</stream:stream>"
XMPP_FEATURES = re.compile(rb"<starttls[\s/>]|</stream:features>|" + XMPP_STREAM_ERROR)
XMPP_PROCEED = re.compile(rb"<proceed[^>]*>|<failure[^>]*>|" + XMPP_STREAM_ERROR)


def _xmpp(conversation, domain):
    end = b"</stream:stream>"
    conversation.send(
        f"<?xml version='1.0'?><stream:stream to={quoteattr(domain)} version='1.0' xmlns='jabber:client'"
        f" xmlns:stream='http://etherx.jabber.org/streams'>".encode()
    )
    conversation.phase = "waiting for the stream features"
    match = conversation.read_until(XMPP_FEATURES)
    if match.group(1) or match.group(0) == end:
        raise ProbeError(f"XMPP stream error {conversation.phase}: {(match.group(1) or b'closed').decode()}")
    if not match.group(0).startswith(b"<starttls"):
        conversation.give_up("the server does not offer STARTTLS", end)
    conversation.buffer.clear()  # the rest of the features: nothing the client needs
    conversation.phase = "waiting for the STARTTLS reply"
    conversation.send(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    match = conversation.read_until(XMPP_PROCEED)
    if match.group(1) or match.group(0) == end:
        raise ProbeError(f"XMPP stream error {conversation.phase}: {(match.group(1) or b'closed').decode()}")
    if not match.group(0).startswith(b"<proceed"):
        conversation.give_up("STARTTLS refused: <failure/>", end)
    return b""  # the stream starts anew over TLS: there is nothing to close


def _ldap(conversation, domain):
    conversation.phase = "waiting for the StartTLS response"
    conversation.send(LDAP_STARTTLS)
    header = conversation.read_bytes(2)
    size = header[1] & 0x7F if header[1] & 0x80 else 0
    if header[0] != 0x30 or (header[1] & 0x80 and not 1 <= size <= 4):
        raise ProbeError(f"not an LDAP message {conversation.phase}")
    length_bytes = conversation.read_bytes(size)
    length = int.from_bytes(length_bytes, "big") if size else header[1]
    if length > MAX_MESSAGE:
        raise ProbeError(f"an LDAP message of {length} bytes {conversation.phase}")
    _, message, _ = _ber(header + length_bytes + conversation.read_bytes(length))
    _, _, offset = _ber(message)  # the messageID
    tag, response, _ = _ber(message, offset)
    if tag != 0x78:  # [APPLICATION 24] ExtendedResponse
        raise ProbeError(f"not an LDAP ExtendedResponse (tag {tag:#04x}) {conversation.phase}")
    tag, result, offset = _ber(response)
    if tag != 0x0A or not result:  # ENUMERATED resultCode
        raise ProbeError(f"malformed LDAP ExtendedResponse {conversation.phase}")
    code = int.from_bytes(result, "big")
    if code != 0:
        try:
            _, _, offset = _ber(response, offset)  # matchedDN
            diagnostic = _ber(response, offset)[1].decode("utf-8", "replace")
        except ProbeError:
            diagnostic = ""
        detail = f": {_printable(diagnostic)}" if diagnostic else ""
        conversation.give_up(f"StartTLS refused: LDAP result {code}{detail}", LDAP_UNBIND)
    return LDAP_UNBIND


def _ber(data, offset=0):
    """Decode the BER element of `data` (bytes) at `offset`, definite length only, as in
    LDAP. Return (tag, content, offset after it); raise ProbeError if it is truncated."""
    if offset + 2 > len(data):
        raise ProbeError("truncated LDAP message")
    tag, length = data[offset], data[offset + 1]
    offset += 2
    if length & 0x80:
        size = length & 0x7F
        if not 1 <= size <= 4 or offset + size > len(data):
            raise ProbeError("malformed length in an LDAP message")
        length = int.from_bytes(data[offset:offset + size], "big")
        offset += size
    if offset + length > len(data):
        raise ProbeError("truncated LDAP message")
    return tag, data[offset:offset + length], offset + length


def _postgres(conversation, domain):
    conversation.phase = "waiting for the SSLRequest reply"
    conversation.send(POSTGRES_SSL_REQUEST)
    reply = conversation.read_bytes(1)
    if reply != b"S":
        text = reply.decode("latin-1")
        raise ProbeError(f"server refused SSL ({text if text.isprintable() else reply.hex()})")
    return b""  # a Terminate message before any startup packet would only be logged as an error


STARTTLS = {
    "smtp": _smtp, "submission": _smtp, "imap": _imap, "pop3": _pop3, "sieve": _sieve,
    "ftp": _ftp, "xmpp": _xmpp, "ldap": _ldap, "postgres": _postgres,
}
