"""Fetch the leaf certificate an endpoint serves, over TLS or STARTTLS.

After a renewal certrelay restarts services; this is the wire layer that checks what
they serve now. Given an endpoint.Endpoint (`smtp://mail.example.ch`,
`tls://[2001:db8::1]:8443?sni=www.example.ch`), it connects, speaks just enough of the
protocol to start TLS, and returns the leaf certificate's DER and the certificates
served after it. Then it says the protocol's goodbye (QUIT, LOGOUT, ...), after the
server's greeting on direct TLS, so that the daemon logs a client that logged out,
not one that was lost.

Nothing is verified (an expired or self-signed certificate must be seen too) and no
credentials are ever sent. Every step, from the name lookup to the end of the TLS
handshake, shares one deadline, and reads are bounded, so that a dead, slow or hostile
service costs its own timeout and a few kilobytes, nothing more. A name's addresses are
tried as RFC 8305 (Happy Eyeballs) says, so a dead address costs CONNECTION_ATTEMPT_DELAY,
not the timeout.
"""

import concurrent.futures
import dataclasses
import errno
import hashlib
import os
import re
import selectors
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
#: RFC 8305 section 5: start connecting to the next address this long after the last
#: attempt started (its recommended 250 ms), or at once when an attempt fails.
CONNECTION_ATTEMPT_DELAY = 0.25
#: Seconds, at most, that the goodbye after the handshake may take (reading a direct TLS
#: greeting, ManageSieve's capabilities, XMPP's new stream): the certificate is in hand,
#: so a server that stays silent costs this, never the probe's whole timeout.
GOODBYE_WAIT = 2.0
#: The resolver, socket.getaddrinfo's signature: a seam where tests give a name the
#: addresses they need.
getaddrinfo = socket.getaddrinfo

#: What kind of failure a Served.failure names, for the hint a log line gives:
FAILURES = (
    "resolve",  # the name does not resolve (or the resolver did not answer in time)
    "refused",  # nothing listens at an address (every address refused)
    "timeout",  # no answer while connecting (a firewall dropping packets)
    "blocked",  # the kernel would not connect (EPERM/EACCES: systemd's IPAddressDeny)
    "no-route",  # no route to the address, or the address is not usable here
    "silent",  # connected, then no answer in time
    "closed",  # the server closed or reset the connection
    "tls",  # the TLS handshake failed
    "protocol",  # the server said something else than the protocol expects (quoted)
    "config",  # the endpoint cannot be probed as written (a bad SNI, no XMPP domain)
    "unexpected",  # an exception certrelay did not foresee
)


class ProbeError(Exception):
    """The probe failed for a reason the message states in one short line; `kind` is
    one of FAILURES (by default "protocol": the server's words were not the expected)."""

    def __init__(self, message, kind="protocol"):
        super().__init__(message)
        self.kind = kind


@dataclasses.dataclass(frozen=True)
class Served:
    """What `endpoint` served when asked with `server_name` (the SNI, or None).

    `der` is the leaf certificate's DER; when it is None, `error` says why in one line
    and `failure` which of FAILURES it was. `chain` holds the DER of each certificate
    the server sent after the leaf, in its order (None when this Python's ssl module
    cannot tell).
    """

    endpoint: object  # endpoint.Endpoint
    server_name: str | None
    der: bytes | None
    error: str | None
    chain: tuple | None = None
    failure: str | None = None

    @property
    def sha256(self):
        """The SHA-256 hex digest of `der`, or None."""
        return None if self.der is None else hashlib.sha256(self.der).hexdigest()


def fetch(endpoint, server_name, timeout):
    """Connect to `endpoint` (an Endpoint), start TLS sending the SNI `server_name` (a
    name, or None or an IP address for none), say the protocol's goodbye, and return a
    Served with the leaf certificate's DER and the chain after it, or with the error
    that prevented it.

    Never raises. Everything shares `timeout` seconds: the name lookup, the connects,
    every read and write, and the handshake; the goodbye gets at most GOODBYE_WAIT of
    what is left.
    """
    conversation = _Conversation(time.monotonic() + timeout)
    try:
        if endpoint.scheme == "xmpp":
            xmpp_domain(server_name)  # before connecting: a stream is never addressed to an IP address
        conversation.connect(endpoint.host, endpoint.port)
        goodbye = GOODBYES.get(endpoint.scheme, _nothing)
        if endpoint_module.SCHEMES[endpoint.scheme][1] == "starttls":
            goodbye = STARTTLS[endpoint.scheme](conversation, server_name)
        der, chain = conversation.start_tls(server_name)
        conversation.say_goodbye(goodbye)
        return Served(endpoint, server_name, der, None, chain)
    except ProbeError as error:
        message, failure = str(error), error.kind
    except OSError as error:
        message, failure = _describe(error, conversation.phase, timeout)
    except Exception as error:  # a bug, or something unforeseen in a hostile reply: still a result
        message = f"unexpected {type(error).__name__} {conversation.phase}: {_printable(str(error))}"
        failure = "unexpected"
    finally:
        conversation.close()
    return Served(endpoint, server_name, None, message, None, failure)


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
    """Return (one log line, kind of failure) for an OSError (ssl errors included)
    raised `phase`."""
    connecting = phase == "while connecting"
    if isinstance(error, TimeoutError):
        kind = "resolve" if phase == "while resolving the host name" else "timeout" if connecting else "silent"
        return f"timed out after {timeout:g} s {phase}", kind
    if isinstance(error, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return f"connection closed by the server {phase}", "closed"
    if isinstance(error, ssl.SSLError):
        reason = error.reason.lower().replace("_", " ") if error.reason else str(error)
        return f"TLS handshake failed: {reason}", "tls"
    text = error.strerror or str(error) or type(error).__name__
    text = text[:1].lower() + text[1:]
    if isinstance(error, ConnectionRefusedError):
        kind = "refused"
    elif isinstance(error, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
        kind = "closed"
    elif error.errno in (errno.EPERM, errno.EACCES):
        kind = "blocked"
    elif error.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT,
                         errno.ENETDOWN, errno.EHOSTDOWN):
        kind = "no-route"
    elif error.errno == errno.ETIMEDOUT:  # the kernel gave up on the SYNs before the deadline
        kind = "timeout" if connecting else "silent"
    else:
        kind = "unexpected"
    return (text if phase == "while connecting" else f"{text} {phase}"), kind


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
        return getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    outcome = []

    def look_up():
        try:
            outcome.append(getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except Exception as error:
            outcome.append(error)

    thread = threading.Thread(target=look_up, name=f"resolve {host}", daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    if not outcome:
        raise TimeoutError
    if isinstance(outcome[0], Exception):
        reason = getattr(outcome[0], "strerror", None) or outcome[0]
        raise ProbeError(f"cannot resolve {host}: {reason}", "resolve")
    return outcome[0]


def _interleaved(addresses):
    """Return getaddrinfo's `addresses` in the order RFC 8305 section 4 tries them: the
    families alternating, starting with the first address's (getaddrinfo sorted them
    by RFC 6724, which prefers IPv6), each family in its own order."""
    by_family = {}
    for address in addresses:
        by_family.setdefault(address[0], []).append(address)
    queues = list(by_family.values())
    ordered = []
    while queues:
        ordered += [queue.pop(0) for queue in queues]
        queues = [queue for queue in queues if queue]
    return ordered


def _race(addresses, deadline):
    """Connect to the first of `addresses` (getaddrinfo tuples) that accepts, as RFC
    8305 section 5 says: one attempt after the other, CONNECTION_ATTEMPT_DELAY apart
    or at once after a failure, all running concurrently until one connects; the
    others are closed. Return the connected socket (blocking); raise TimeoutError at
    `deadline` (time.monotonic()), else the last attempt's failure."""
    waiting, attempts, failure = list(addresses), [], None
    selector = selectors.DefaultSelector()
    winner, next_start = None, time.monotonic()
    try:
        while waiting or attempts:
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError
            if waiting and (now >= next_start or not attempts):
                family, kind, protocol, _, address = waiting.pop(0)
                try:
                    sock = socket.socket(family, kind, protocol)  # fails where IPv6 is disabled
                except OSError as error:
                    failure = error
                    continue
                sock.setblocking(False)
                code = sock.connect_ex(address)
                if code == 0:
                    winner = sock
                    break
                if code not in (errno.EINPROGRESS, errno.EAGAIN):
                    sock.close()
                    failure = OSError(code, os.strerror(code))
                    continue  # the next address at once
                attempts.append(sock)
                selector.register(sock, selectors.EVENT_WRITE)
                next_start = now + CONNECTION_ATTEMPT_DELAY
                continue
            wait = deadline - now
            if waiting:
                wait = min(wait, next_start - now)
            for key, _ in selector.select(max(0.0, wait)):
                sock = key.fileobj
                selector.unregister(sock)
                attempts.remove(sock)
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code == 0:
                    winner = sock
                    break
                sock.close()
                failure = OSError(code, os.strerror(code))
                next_start = time.monotonic()  # a failed attempt starts the next one at once
            if winner is not None:
                break
    finally:
        for sock in attempts:
            if sock is not winner:
                sock.close()
        selector.close()
    if winner is None:
        raise failure or OSError(errno.EADDRNOTAVAIL, "no address to connect to")
    winner.setblocking(True)
    return winner


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
        self.said_goodbye = False

    def _arm(self, sock=None):
        """Give the next socket operation what is left of the deadline, or raise TimeoutError."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        (sock or self.sock).settimeout(remaining)

    def connect(self, host, port):
        """Connect to the first of `host`'s addresses that accepts (Happy Eyeballs); raise
        TimeoutError at the deadline, else the last address's failure."""
        self.phase = "while resolving the host name"
        addresses = _resolve(host, port, self.deadline)
        self.phase = "while connecting"
        if not addresses:
            raise ProbeError(f"{host} has no address", "resolve")
        self.sock = _race(_interleaved(addresses), self.deadline)

    def send(self, data):
        self._arm()
        self.sock.sendall(data)

    def send_goodbye(self, data):
        """Send `data`, a few bytes that fit any send buffer, even once the goodbye's
        time ran out reading."""
        self.sock.settimeout(1.0)
        self.sock.sendall(data)
        self.said_goodbye = True

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
            raise ProbeError(f"connection closed by the server {self.phase}", "closed")
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
        address; return the leaf certificate's DER and the chain served after it (see
        Served.chain)."""
        if self.buffer:  # bytes sent ahead of the handshake are an injection attempt or garbage
            early = _printable(repr(bytes(self.buffer)))
            raise ProbeError(f"the server sent data it should not have before the TLS handshake: {early}")
        self.phase = "during the TLS handshake"
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        # A server that hangs up after its goodbye without close_notify is done, not an
        # attack on a certificate already in hand. Python 3.13 no longer sets this by
        # default; without it the SSL state breaks on that EOF and our close_notify
        # goes out as a decode_error alert, which the daemons log as a failure.
        context.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
        sni = server_name if server_name and endpoint_module.ip_address(server_name) is None else None
        if sni is not None:
            try:  # as wrap_socket will, but before it takes the socket over, leaking it on failure
                sni.encode("idna")
            except UnicodeError:  # an empty or overlong label
                raise ProbeError(f"cannot send {_printable(repr(sni))} as SNI: not a valid host name",
                                 "config") from None
        self.sock = context.wrap_socket(self.sock, server_hostname=sni, do_handshake_on_connect=False)
        self._arm()
        self.sock.do_handshake()
        der = self.sock.getpeercert(binary_form=True)
        if not der:
            raise ProbeError("the server sent no certificate", "tls")
        self.phase = "after the TLS handshake"
        return der, _served_chain(self.sock, der)

    def say_goodbye(self, goodbye):
        """After the handshake: run `goodbye(self)`, what the protocol says before
        leaving, then, if it said anything, read until the server closes the connection
        (so that its answer, 221 or BYE, is not lost to a reset), then send TLS's
        close_notify; all within GOODBYE_WAIT. The certificate is in hand: nothing that
        fails here changes the result."""
        self.phase = "saying goodbye"
        self.deadline = min(self.deadline, time.monotonic() + GOODBYE_WAIT)
        try:
            goodbye(self)
            if self.said_goodbye:
                self.phase = "waiting for the server to close the connection"
                self.buffer.clear()
                while len(self.buffer) < MAX_MESSAGE:
                    self._receive()  # ProbeError at the end of the connection
                    self.buffer.clear()
        except (OSError, ProbeError):
            pass
        try:  # without it, Dovecot and Prosody may log the TLS connection as lost
            self.sock.setblocking(False)
            self.sock.unwrap()  # sends close_notify, then would wait for the server's
        except (OSError, ValueError):  # ssl.SSLWantReadError: not waiting for it
            pass

    def close(self):
        if self.sock is not None:
            self.sock.close()


def _served_chain(sock, der):
    """Return the DER of each certificate `sock` (an SSLSocket after the handshake) was
    sent after the leaf `der`, in order; None if this Python cannot tell."""
    reader = getattr(sock, "get_unverified_chain", None)  # public from Python 3.13 on
    if reader is None:
        reader = getattr(getattr(sock, "_sslobj", None), "get_unverified_chain", None)  # 3.10 to 3.12
    try:
        chain = reader() if reader is not None else None
    except (ssl.SSLError, ValueError, AttributeError):
        return None
    if chain is None:
        return None
    ders = [each if isinstance(each, bytes) else each.public_bytes(ssl._ssl.ENCODING_DER) for each in chain]
    return tuple(ders[1:] if ders and ders[0] == der else ders)  # a client's chain starts with the leaf


# Goodbyes: each takes the _Conversation after the handshake and says what the protocol
# says before leaving, so that the daemon logs a logout, not a lost client
# (Conversation.say_goodbye bounds it and sends close_notify after it).


def _nothing(conversation):
    """The goodbye of a protocol without one, or whose client speaks first (https, tls)."""


def _say(data):
    """Return a goodbye that sends `data` (bytes)."""
    def goodbye(conversation):
        conversation.send_goodbye(data)
    return goodbye


def _after_greeting(accepts, data):
    """Return a direct TLS goodbye: read the greeting, then send `data` if
    `accepts(greeting)` (a server that said BYE is leaving anyway). A greeting that
    never comes gets no goodbye: the server does not speak the protocol."""
    def goodbye(conversation):
        conversation.phase = "waiting for the greeting"
        if accepts(conversation):
            conversation.send_goodbye(data)
    return goodbye


def _smtp_greeting(conversation):
    conversation.read_reply()  # any reply: RFC 5321 4.3.1 has the client QUIT after a 554 too
    return True


GOODBYES = {  # direct TLS: after the greeting of protocols where the server speaks first
    "smtps": _after_greeting(_smtp_greeting, b"QUIT\r\n"),
    "imaps": _after_greeting(lambda talk: talk.read_line().upper().startswith(("* OK", "* PREAUTH")), b"a LOGOUT\r\n"),
    "pop3s": _after_greeting(lambda talk: talk.read_line().startswith("+OK"), b"QUIT\r\n"),
    "ldaps": _say(LDAP_UNBIND),  # the client speaks first
}


def _sieve_goodbye(conversation):
    """RFC 5804 2.2: after the handshake the server sends its capabilities again, up to
    an OK; reading them before LOGOUT is what a client does (Dovecot logs a client
    that leaves without as a closed connection, not a logout)."""
    conversation.phase = "waiting for the capabilities"
    try:
        for _ in range(MAX_LINES + 1):
            line = conversation.read_line().upper()
            if line.startswith("BYE"):
                return
            if line.startswith(("OK", "NO")):
                break
    except TimeoutError:
        pass  # a server that does not send them still gets its LOGOUT
    conversation.send_goodbye(b"LOGOUT\r\n")


def _xmpp_goodbye(domain):
    """Return XMPP's goodbye: the stream starts anew over TLS (RFC 6120 5.4.3.3), so
    open it (to `domain` again) and close it at once, in one write: Prosody logs the
    stream as closed by the client, not the connection as lost."""
    return _say(_xmpp_header(domain) + b"</stream:stream>")


# STARTTLS dialogues: each takes the _Conversation and the SNI (a name, None or an IP
# address), leaves the connection ready for the ClientHello, and returns its goodbye.


def _smtp(conversation, domain):
    # Up to the final "220 ": postscreen bans clients that talk early.
    conversation.expect("waiting for the greeting", b"", "220", "unexpected greeting")
    lines = conversation.expect("waiting for the EHLO reply", f"EHLO {CLIENT_NAME}\r\n".encode(), "250", "EHLO refused")
    if not any(line[4:].strip().upper() == "STARTTLS" for line in lines[1:]):
        conversation.give_up("the server does not offer STARTTLS", b"QUIT\r\n")
    conversation.expect("waiting for the STARTTLS reply", b"STARTTLS\r\n", "220", "STARTTLS refused")
    return _say(b"QUIT\r\n")


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
            return _say(b"a LOGOUT\r\n")
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
    return _say(b"QUIT\r\n")


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
    return _sieve_goodbye


def _ftp(conversation, domain):
    conversation.phase = "waiting for the greeting"
    code, lines = conversation.read_reply()
    if code == "120":  # "ready in N minutes", then the real greeting
        code, lines = conversation.read_reply()
    if code != "220":
        conversation.give_up(f"unexpected greeting: {_printable(lines[-1])}", b"QUIT\r\n")
    conversation.expect("waiting for the AUTH TLS reply", b"AUTH TLS\r\n", "234", "AUTH TLS refused")
    return _say(b"QUIT\r\n")


XMPP_STREAM_ERROR = rb"<stream:error>\s*<([\w-]+)|</stream:stream>"
XMPP_FEATURES = re.compile(rb"<starttls[\s/>]|</stream:features>|" + XMPP_STREAM_ERROR)
XMPP_PROCEED = re.compile(rb"<proceed[^>]*>|<failure[^>]*>|" + XMPP_STREAM_ERROR)


def _xmpp_header(domain):
    """The opening of a client stream addressed to `domain` (a DNS name)."""
    return (f"<?xml version='1.0'?><stream:stream to={quoteattr(domain)} version='1.0' xmlns='jabber:client'"
            f" xmlns:stream='http://etherx.jabber.org/streams'>").encode()


def xmpp_domain(server_name):
    """Return the domain an XMPP stream is addressed to for the SNI `server_name`,
    which is that domain (endpoint.server_name), or raise ProbeError when there is no
    name: a stream is never addressed to an IP address (servers answer host-unknown)."""
    if not server_name or endpoint_module.ip_address(server_name) is not None:
        raise ProbeError("no domain to address the XMPP stream to (an IP address is none): write"
                         " xmpp://HOST?sni=DOMAIN", "config")
    return server_name


def _xmpp(conversation, domain):
    end = b"</stream:stream>"
    domain = xmpp_domain(domain)
    conversation.send(_xmpp_header(domain))
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
    return _xmpp_goodbye(domain)


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
    return _say(LDAP_UNBIND)


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
    return _nothing  # a Terminate message before any startup packet would only be logged as an error


STARTTLS = {
    "smtp": _smtp, "submission": _smtp, "imap": _imap, "pop3": _pop3, "sieve": _sieve,
    "ftp": _ftp, "xmpp": _xmpp, "ldap": _ldap, "postgres": _postgres,
}
