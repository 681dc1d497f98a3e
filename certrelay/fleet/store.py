"""The fleet's etcd client: etcd v3 through its JSON gRPC gateway, with the standard
library only (as Patroni's patroni/dcs/etcd3.py does).

    store = Store(["https://etcd1.example.net:2379"], ca_file="/etc/certrelay/fleet/ca.pem",
                  user="certrelay-host-mail", password="...")
    revision, values = store.range("/certrelay/v1/hosts/mail/")
    with store.watch("/certrelay/v1/hosts/mail/", revision + 1, idle=30) as watch:
        for events in watch:        # [] after `idle` seconds without an event
            ...

What etcd 3.4.23's gateway does, and what this module does about it:

- Keys and values are base64 in the JSON; revisions are int64 sent as strings; empty
  fields (no value, `more: false`, no kvs) are left out of an answer.
- Auth: POST /v3/auth/authenticate gives a simple token, sent as the bare
  `Authorization` header. It expires after --auth-token-ttl seconds unused (default
  300): the next request gets HTTP 401 "invalid auth token", and is retried once after
  authenticating again. An open watch outlives its token.
- RBAC: a key or prefix the user may not touch gives HTTP 403 "permission denied"
  (`Denied`); a watch there is answered "created" and "canceled" at once, its
  cancel_reason saying PermissionDenied, with HTTP status 200.
- A watch is one POST to /v3/watch whose chunked answer is a stream of JSON objects,
  one a line: {"result": {...}}. The first is the "created" acknowledgement. A watch
  from a compacted revision is canceled with `compact_revision` (`Compacted`), and
  etcd leaves the stream open: the cancel is the end. Errors of the stream come as
  {"error": {...}}.
- A transaction holds at most --max-txn-ops operations (default 128) and a request at
  most --max-request-bytes (default 1.5 MiB): `put_many` splits by both.
"""

import base64
import dataclasses
import http.client
import ipaddress
import json
import socket
import ssl
import threading
import time
import urllib.parse

DEFAULT_PORT = 2379
#: etcd's default --max-txn-ops.
TXN_OPS = 128
#: Bytes of keys and values in one transaction: well below etcd's default
#: --max-request-bytes (1.5 MiB), leaving room for the request's own overhead.
TXN_BYTES = 1024 * 1024
#: Keys asked for in one range request: a page of sealed lineages (a few KiB each)
#: stays a few MiB, however many keys the prefix holds.
PAGE = 500
#: TCP keepalive of a watch's connection (idle seconds, interval, probes): a peer gone
#: without a word (power loss, partition) ends the watch with an error in about 30 s,
#: where the stream itself may rightly stay silent for hours.
KEEPALIVE = (15, 5, 3)


class StoreError(Exception):
    """etcd could not be reached, gave an answer that is not one, or refused the
    credentials: the message says what failed, at which endpoint, and what to fix."""


class Denied(StoreError):
    """etcd's RBAC refused an operation (HTTP 403, "permission denied"): `key` is the
    key or prefix, `user` the etcd user, `operation` "read", "write" or "watch"."""

    def __init__(self, message, key=None, user=None, operation=None):
        super().__init__(message)
        self.key, self.user, self.operation = key, user, operation


class Compacted(StoreError):
    """A watch's start revision has been compacted away: `revision` is etcd's
    compact_revision. Read the whole prefix again, and watch from that read."""

    def __init__(self, message, revision):
        super().__init__(message)
        self.revision = revision


@dataclasses.dataclass(frozen=True)
class KeyValue:
    """One key as etcd holds it: `value` is b"" for a keys-only range and a DELETE."""

    key: str
    value: bytes
    mod_revision: int
    version: int


@dataclasses.dataclass(frozen=True)
class Event:
    """One change seen by a watch: `type` "PUT" or "DELETE", `kv` the key after it
    (a DELETE's kv has the key and the deleting revision, no value)."""

    type: str
    kv: KeyValue


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """One parsed endpoint: `url` as given (for messages), scheme, host and port."""

    url: str
    tls: bool
    host: str
    port: int


def parse_endpoint(text):
    """Return the Endpoint for "https://host:port" (port 2379 if left out). Plain
    "http://" is accepted only for a loopback address or localhost, where nothing
    crosses a network. Raise ValueError saying what is wrong."""
    if not isinstance(text, str):
        raise ValueError(f"etcd endpoint {text!r} is not a URL such as https://etcd1.example.net:2379")
    url = urllib.parse.urlsplit(text.strip())
    try:
        port = url.port or DEFAULT_PORT
    except ValueError:
        raise ValueError(f"etcd endpoint {text!r} has a port that is not a number from 1 to 65535") from None
    if url.scheme not in ("https", "http") or not url.hostname:
        raise ValueError(f"etcd endpoint {text!r} is not a URL such as https://etcd1.example.net:2379")
    if url.path not in ("", "/") or url.query or url.fragment or url.username or url.password:
        raise ValueError(f"etcd endpoint {text!r} must be only scheme, host and port, such as "
                         "https://etcd1.example.net:2379")
    if url.scheme == "http" and not is_loopback(url.hostname):
        raise ValueError(f"etcd endpoint {text!r} is plain http to another machine: the credentials and the store's"
                         f" answers would cross the network in clear; use https://{url.netloc} with ca-file")
    return Endpoint(text.strip(), url.scheme == "https", url.hostname, port)


def is_loopback(host):
    """Whether `host` is localhost or a loopback address (127.0.0.0/8, ::1)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def prefix_end(prefix):
    """The range_end that makes a range over bytes `prefix` cover every key starting
    with it: the prefix with its last byte below 0xff incremented and cut after it;
    b"\\0" (to the end of the key space) when there is no such byte."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def encode(data):
    """bytes or str -> base64 text as the gateway wants it. A str key is UTF-8 (a
    surrogate-escaped key read back from etcd gives the same bytes again)."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    return base64.b64encode(data).decode("ascii")


def decode_key(text):
    return base64.b64decode(text or "").decode("utf-8", "surrogateescape")


def key_value(kv):
    """A KeyValue from the gateway's JSON for a mvccpb.KeyValue."""
    return KeyValue(decode_key(kv.get("key")), base64.b64decode(kv.get("value") or ""),
                    int(kv.get("mod_revision") or 0), int(kv.get("version") or 0))


def header_revision(answer):
    return int((answer.get("header") or {}).get("revision") or 0)


def describe_error(error):
    """A short text for a connection failure, with what to check."""
    if isinstance(error, ssl.SSLCertVerificationError):
        reason = error.verify_message or str(error)
        if error.verify_code == 62:  # X509_V_ERR_HOSTNAME_MISMATCH
            return (f"TLS: etcd's certificate does not name this host ({reason}): use the name or address"
                    " its certificate has in the endpoint")
        return (f"TLS: etcd's certificate is not trusted ({reason}): ca-file must hold the CA that signed"
                " etcd's server certificate")
    if isinstance(error, ssl.SSLError):
        if "WRONG_VERSION_NUMBER" in str(error) or "wrong version number" in str(error):
            return f"TLS handshake failed ({error.reason}): does etcd speak plain http there?"
        return f"TLS handshake failed: {error.reason or error}"
    if isinstance(error, (socket.timeout, TimeoutError)):
        return "no answer in time: is etcd there, and running (not stopped)?"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused: is etcd running and listening on that address and port?"
    if isinstance(error, socket.gaierror):
        return f"cannot resolve the host name ({error.strerror})"
    if isinstance(error, http.client.RemoteDisconnected):
        return "etcd closed the connection without an answer"
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return str(error) or type(error).__name__


class _Unreachable(Exception):
    """One endpoint failed at the connection level: try the next one."""


class Store:
    """A client of one etcd cluster, safe to share between threads (requests take
    turns on one kept-alive connection; each watch has its own).

    `endpoints`: client URLs of etcd members, "https://host:port" (plain "http://" only
    for loopback: ValueError otherwise), tried in turn, starting with the last one that
    answered. `ca_file`: the CA that signed etcd's server certificate (the only one
    trusted; None: the system's CAs); the host name is checked. `user`/`password`: etcd
    auth (None: none).
    `timeout`: seconds for connecting and for each read of an answer.
    """

    def __init__(self, endpoints, ca_file=None, user=None, password=None, timeout=10.0):
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        self.endpoints = [parse_endpoint(endpoint) for endpoint in endpoints]
        if not self.endpoints:
            raise ValueError("no etcd endpoint given: name at least one, such as https://etcd1.example.net:2379")
        if (user is None) != (password is None):
            raise ValueError("etcd auth needs both a user and a password (or neither)")
        self.user, self._password = user, password
        self.timeout = float(timeout)
        self.ca_file = ca_file
        self._context = None
        if any(endpoint.tls for endpoint in self.endpoints):
            self._context = tls_context(ca_file)
        self._lock = threading.RLock()
        self._current = 0  # index of the endpoint that answered last
        self._connection = None
        self._token = None
        self._authenticated = False  # token is None and True: etcd has auth off

    def __repr__(self):
        return f"Store({[endpoint.url for endpoint in self.endpoints]!r}, user={self.user!r})"

    @property
    def endpoint(self):
        """The URL of the endpoint used last (or to be tried first)."""
        return self.endpoints[self._current].url

    # --- the key-value API ----------------------------------------------------------

    def range(self, prefix, keys_only=False):
        """Return (revision, [KeyValue]): every key starting with `prefix` as of one
        revision (the answer's header revision), sorted by key, values left empty if
        `keys_only`. Read in pages of PAGE keys pinned to the first page's revision,
        so 10,000 keys of a few KiB each do not make one huge answer; if that revision
        is compacted between pages, the read starts again."""
        first = prefix.encode("utf-8", "surrogateescape") if isinstance(prefix, str) else prefix
        # An empty prefix means every key: etcd spells that key "\0", range_end "\0".
        start, end = (first, prefix_end(first)) if first else (b"\0", b"\0")
        for _attempt in range(5):
            revision, found, key = 0, [], start
            while True:
                request = {"key": encode(key), "range_end": encode(end), "limit": PAGE}
                if revision:
                    request["revision"] = revision
                if keys_only:
                    request["keys_only"] = True
                try:
                    answer = self._call("/v3/kv/range", request, prefix, "read")
                except _RevisionCompacted:
                    break  # the pinned revision went between pages: read it all again
                revision = revision or header_revision(answer)
                kvs = answer.get("kvs") or []
                found.extend(key_value(kv) for kv in kvs)
                if not answer.get("more") or not kvs:
                    return revision, found
                key = base64.b64decode(kvs[-1]["key"]) + b"\0"  # the next key after the page's last
        raise StoreError(f"etcd at {self.endpoint}: reading {prefix!r} failed five times because etcd compacted"
                         " its history between the pages of one read: is something compacting continuously?")

    def get(self, key):
        """Return the KeyValue of `key`, or None if there is no such key."""
        answer = self._call("/v3/kv/range", {"key": encode(key)}, key, "read")
        kvs = answer.get("kvs") or []
        return key_value(kvs[0]) if kvs else None

    def put(self, key, value):
        """Set `key` to bytes `value`; return the revision that wrote it."""
        return header_revision(self._call("/v3/kv/put", {"key": encode(key), "value": encode(value)}, key, "write"))

    def put_many(self, items):
        """Set every key of dict `items` (str -> bytes) to its value, in as few
        transactions as etcd's limits allow (TXN_OPS operations, TXN_BYTES bytes each):
        each transaction is one revision and lands whole or not at all, but together
        they are not atomic. Return the revision of the last one (0 if `items` is empty)."""
        revision = 0
        for batch in batches(items):
            request = {"success": [{"request_put": {"key": encode(key), "value": encode(value)}}
                                   for key, value in batch]}
            keys = [key for key, _value in batch]
            what = keys[0] if len(keys) == 1 else f"{keys[0]} and {len(keys) - 1} other keys"
            revision = header_revision(self._call("/v3/kv/txn", request, what, "write"))
        return revision

    def delete(self, key):
        """Delete `key` (nothing happens if there is none)."""
        self._call("/v3/kv/deleterange", {"key": encode(key)}, key, "write")

    def delete_prefix(self, prefix):
        """Delete every key starting with `prefix` (not empty); return how many there were."""
        first = prefix.encode("utf-8", "surrogateescape")
        if not first:
            raise ValueError("delete_prefix needs a prefix: it would delete every key")
        answer = self._call("/v3/kv/deleterange", {"key": encode(first), "range_end": encode(prefix_end(first))},
                            prefix, "write")
        return int(answer.get("deleted") or 0)

    def watch(self, prefix, start_revision, idle=30.0):
        """Watch every key starting with `prefix`, from `start_revision` (events since
        then are replayed first; None or 0: from now on). Return a Watch: a context
        manager and iterator of lists of Event (see Watch).

        The watch is set up before this returns (so nothing written afterwards can
        be missed even with start_revision None); a failure to set it up (no endpoint,
        credentials, Denied) is raised by the first iteration, like every failure
        after it, so that one `try` around the loop handles all."""
        return Watch(self, prefix, start_revision, idle)

    # --- requests --------------------------------------------------------------------

    def _call(self, path, request, key, operation):
        """POST `request` to `path`; return the answer's JSON. Authenticate first if
        there is no token yet, and once more if etcd says the token expired. `key` and
        `operation` ("read" or "write") name what a Denied is about."""
        with self._lock:
            for attempt in range(2):
                headers = self._auth_headers()
                endpoint, status, answer = self._post(path, request, headers)
                if status == 200:
                    return answer
                message = error_message(answer)
                if attempt == 0 and self.user is not None and expired_token(status, message):
                    self._token, self._authenticated = None, False  # expired: authenticate again, once
                    continue
                raise self._error(endpoint, status, message, key, operation)
            raise AssertionError("unreachable")  # the loop returns or raises

    def _auth_headers(self):
        """The Authorization header (none without a user), authenticating if needed."""
        if self.user is None:
            return {}
        if not self._authenticated:
            self._authenticate()
        return {"Authorization": self._token} if self._token else {}

    def _authenticate(self):
        endpoint, status, answer = self._post("/v3/auth/authenticate", {"name": self.user, "password": self._password},
                                              {})
        message = error_message(answer)
        if status == 200 and answer.get("token"):
            self._token, self._authenticated = answer["token"], True
            return
        if "authentication is not enabled" in message:
            self._token, self._authenticated = None, True  # etcd without auth: requests go without a token
            return
        if "authentication failed" in message:
            raise StoreError(f"etcd at {endpoint.url} refused user {self.user!r}: wrong user name or password"
                             " (check the password file, and that the user exists: `etcdctl user list`)")
        raise StoreError(f"etcd at {endpoint.url}: authenticating as {self.user!r} failed:"
                         f" HTTP {status}: {message or 'no answer'}")

    def _error(self, endpoint, status, message, key, operation):
        """The StoreError for a refused request."""
        if status == 403 or "permission denied" in message:
            return Denied(f"etcd at {endpoint.url} denies user {self.user!r} to {operation} {key!r}"
                          f" ({message}): the user's roles do not grant {operation} on that key or prefix",
                          key=key, user=self.user, operation=operation)
        if "user name is empty" in message:
            return StoreError(f"etcd at {endpoint.url} has auth enabled, and no user was given: set the user"
                              " and its password file")
        if expired_token(status, message):
            return StoreError(f"etcd at {endpoint.url} refused the auth token of user {self.user!r} right after"
                              f" authenticating ({message})")
        if "too many operations in txn" in message:
            return StoreError(f"etcd at {endpoint.url} refused a transaction of {TXN_OPS} operations ({message}):"
                              f" its --max-txn-ops is below {TXN_OPS}, the default; raise it")
        if "request is too large" in message or "larger than max" in message:
            return StoreError(f"etcd at {endpoint.url} refused writing {key!r} as too large ({message}): raise"
                              " etcd's --max-request-bytes, or store less")
        if "required revision has been compacted" in message:
            return _RevisionCompacted(message)
        return StoreError(f"etcd at {endpoint.url}: {operation} {key!r} failed: HTTP {status}:"
                          f" {message or 'no explanation'}")

    def _post(self, path, request, headers):
        """POST JSON `request`, trying each endpoint in turn from the last good one;
        return (endpoint, HTTP status, JSON answer (a dict)). Move on to the next
        endpoint when one cannot be reached or says it cannot serve (HTTP 503: no
        leader, a timeout inside etcd). Raise StoreError when none answers."""
        body = json.dumps(request).encode("ascii")
        failures = []
        for offset in range(len(self.endpoints)):
            index = (self._current + offset) % len(self.endpoints)
            endpoint = self.endpoints[index]
            try:
                status, data = self._exchange(index, path, body, headers)
            except _Unreachable as failure:
                failures.append(f"{endpoint.url}: {failure}")
                continue
            answer = parse_answer(data)
            if answer is None:
                failures.append(f"{endpoint.url}: HTTP {status}, an answer that is not etcd's JSON gateway's:"
                                f" {data[:200]!r} (is this etcd's client URL, with the right scheme?)")
                self._drop_connection()
                continue
            if status == 503 or answer.get("code") == 14:  # gRPC Unavailable: this member cannot serve now
                failures.append(f"{endpoint.url}: unavailable: {error_message(answer)}")
                self._drop_connection()
                continue
            self._current = index
            return endpoint, status, answer
        raise StoreError("cannot reach etcd: " + "; ".join(failures))

    def _exchange(self, index, path, body, headers):
        """One request on the kept-alive connection to endpoint `index`; a reused
        connection that fails (etcd closed it while idle) is replaced once. Return
        (status, body) or raise _Unreachable."""
        for attempt in range(2):
            reused = self._connection is not None and self._connection[0] == index
            if not reused:
                self._drop_connection()
                self._connection = (index, self._connect(self.endpoints[index]))
            connection = self._connection[1]
            try:
                connection.request("POST", path, body=body,
                                   headers=dict(headers, **{"Content-Type": "application/json"}))
                response = connection.getresponse()
                data = response.read()
                if response.getheader("Connection", "").lower() == "close":
                    self._drop_connection()
                return response.status, data
            except (OSError, http.client.HTTPException) as error:
                self._drop_connection()
                # A timeout is not a stale connection: a stopped etcd would be asked twice.
                if reused and attempt == 0 and not isinstance(error, (socket.timeout, TimeoutError)):
                    continue
                raise _Unreachable(describe_error(error)) from None
        raise AssertionError("unreachable")

    def _connect(self, endpoint):
        if endpoint.tls:
            return http.client.HTTPSConnection(endpoint.host, endpoint.port, timeout=self.timeout,
                                               context=self._context)
        return http.client.HTTPConnection(endpoint.host, endpoint.port, timeout=self.timeout)

    def _drop_connection(self):
        if self._connection is not None:
            self._connection[1].close()
            self._connection = None

    def close(self):
        """Close the kept-alive connection (the Store stays usable: it reconnects)."""
        with self._lock:
            self._drop_connection()

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        self.close()


class _RevisionCompacted(StoreError):
    """A range pinned to a revision that has been compacted since (between pages)."""


def tls_context(ca_file):
    """An SSL context trusting only `ca_file` (the system's CAs if None), checking
    host names, TLS 1.2 or newer. Raise StoreError if the file cannot be used."""
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as error:
        raise StoreError(f"{ca_file}: cannot use it as the CA of etcd's certificate:"
                         f" {getattr(error, 'strerror', None) or error}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def parse_answer(data):
    """The JSON object of a unary answer, or None if it is not one."""
    try:
        answer = json.loads(data or b"{}")
    except (ValueError, UnicodeDecodeError):
        return None
    return answer if isinstance(answer, dict) else None


def error_message(answer):
    """etcd's error text in a gateway answer ({"error": ..., "message": ..., "code": ...});
    "" if there is none."""
    error = answer.get("error") if isinstance(answer, dict) else None
    if isinstance(error, dict):  # a stream's error
        return str(error.get("message") or error)
    return str(answer.get("message") or error or "") if isinstance(answer, dict) else ""


def expired_token(status, message):
    """Whether etcd refused a request for its token (expired, or issued before an
    auth change): authenticating again fixes it."""
    return status == 401 or "invalid auth token" in message or "revision of auth store is old" in message


def batches(items):
    """Split dict `items` into lists of (key, value), each within TXN_OPS operations
    and TXN_BYTES bytes (a single item larger than that is a batch of its own, for
    etcd to refuse with its reason)."""
    batch, size = [], 0
    for key, value in items.items():
        length = len(key.encode("utf-8", "surrogateescape")) + len(value)
        if batch and (len(batch) == TXN_OPS or size + length > TXN_BYTES):
            yield batch
            batch, size = [], 0
        batch.append((key, value))
        size += length
    if batch:
        yield batch


class Watch:
    """A watch on a prefix: a context manager, and an iterator that yields

    - a list of Event, in revision order: one etcd answer's worth (a transaction's
      events come together; a replay from an old revision can bring many revisions
      in one list), or
    - [] when `idle` seconds passed without an event, so that the caller can tell a
      watchdog it lives, or read the prefix again;

    and raises Compacted when etcd cancels it because its start revision is gone,
    Denied when the user may not read the prefix, StoreError on any other cancel,
    error or lost connection (then, or after `close()`, iteration ends).

    `revision` is the revision of the newest event yielded (start_revision - 1 before
    any): a new watch from `revision + 1` misses nothing. `close()` ends the watch,
    also from another thread (the iterating one then stops without an error).

    It is read on its own connection, with a buffer of its own: an idle timeout
    costs nothing of a message half received, which http.client could not promise.
    """

    def __init__(self, store, prefix, start_revision, idle=30.0):
        self.store, self.prefix, self.idle = store, prefix, float(idle)
        self.start_revision = int(start_revision or 0)
        self.revision = max(self.start_revision - 1, 0)
        self.endpoint = None
        self._socket = None
        self._raw = b""        # bytes received and not yet de-chunked
        self._chunk_left = 0   # bytes of the current chunk still to come
        self._lines = b""      # de-chunked body: JSON messages, one a line
        self._pending = None   # an error of the set-up, raised by the first iteration
        self._closed = False
        self._reading = False
        self._lock = threading.Lock()
        try:
            self._open()
        except StoreError as error:
            self._pending = error
            self._shut()

    def __repr__(self):
        return f"Watch({self.prefix!r}, from {self.start_revision}, at {self.endpoint})"

    # --- set-up ------------------------------------------------------------------------

    def _open(self):
        """Connect (endpoints in turn, as Store does), POST the watch, and read its
        "created" acknowledgement. An expired token is renewed once."""
        store = self.store
        prefix = self.prefix.encode("utf-8", "surrogateescape")
        create = {"key": encode(prefix or b"\0"), "range_end": encode(prefix_end(prefix) if prefix else b"\0")}
        if self.start_revision:
            create["start_revision"] = self.start_revision
        body = json.dumps({"create_request": create}).encode("ascii")
        for attempt in range(2):
            with store._lock:
                headers = store._auth_headers()
                self._connect(body, headers)
            first = self._read_message(time.monotonic() + store.timeout)
            if first is None:
                raise StoreError(f"etcd at {self.endpoint} accepted the watch on {self.prefix!r} but did not"
                                 f" acknowledge it within {store.timeout:g} s: is etcd stopped or overloaded?")
            result = first.get("result") or {}
            reason = str(result.get("cancel_reason") or error_message(first))
            if attempt == 0 and store.user is not None and expired_token(0, reason):
                with store._lock:
                    store._token, store._authenticated = None, False
                self._shut()
                continue
            self._check(first)
            if not result.get("created"):
                raise StoreError(f"etcd at {self.endpoint} answered the watch on {self.prefix!r} with"
                                 f" {json.dumps(first)[:300]} instead of acknowledging it")
            return
        raise StoreError(f"etcd at {self.endpoint} refused the auth token of user {store.user!r} for a watch right"
                         " after authenticating")

    def _connect(self, body, headers):
        """Open a connection to the first endpoint that takes one (from the Store's
        last good one), send the request and read the answer's head."""
        store = self.store
        failures = []
        for offset in range(len(store.endpoints)):
            index = (store._current + offset) % len(store.endpoints)
            endpoint = store.endpoints[index]
            try:
                self._socket = self._request(endpoint, body, headers)
            except _Unreachable as failure:
                failures.append(f"{endpoint.url}: {failure}")
                self._shut()
                continue
            store._current, self.endpoint = index, endpoint.url
            return
        raise StoreError(f"cannot watch {self.prefix!r}: cannot reach etcd: " + "; ".join(failures))

    def _request(self, endpoint, body, headers):
        """Connect to `endpoint`, POST /v3/watch and check the answer's head (status
        200, chunked); return the socket, positioned at the body."""
        timeout = self.store.timeout
        self._raw, self._chunk_left, self._lines = b"", 0, b""  # a new stream
        try:
            raw = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
        except OSError as error:
            raise _Unreachable(describe_error(error)) from None
        keepalive(raw)
        try:
            sock = self.store._context.wrap_socket(raw, server_hostname=endpoint.host) if endpoint.tls else raw
            self._socket = sock
            head = ["POST /v3/watch HTTP/1.1", f"Host: {endpoint.host}:{endpoint.port}",
                    "Content-Type: application/json", f"Content-Length: {len(body)}"]
            head += [f"{name}: {value}" for name, value in headers.items()]
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
            status, fields = self._read_head(time.monotonic() + timeout)
        except (OSError, _Unreachable) as error:
            raw.close()
            raise error if isinstance(error, _Unreachable) else _Unreachable(describe_error(error)) from None
        if status != 200 or "chunked" not in fields.get("transfer-encoding", ""):
            text = self._raw[:300]
            raw.close()
            raise _Unreachable(f"HTTP {status} to a watch, not a stream: {text!r} (is this etcd's client URL?)")
        return sock

    def _read_head(self, deadline):
        """Read the status line and header fields; return (status, {lower name: value})."""
        while b"\r\n\r\n" not in self._raw:
            if len(self._raw) > 65536:
                raise _Unreachable("an answer head of over 64 KiB: not etcd")
            self._receive(deadline, what="the answer to the watch request")
        head, self._raw = self._raw.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise _Unreachable(f"not an HTTP answer: {lines[0][:100]!r}")
        fields = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip().lower()
        return int(parts[1]), fields

    def _receive(self, deadline, what):
        """Add what the socket has to the raw buffer, waiting at most until
        `deadline`; raise socket.timeout if nothing came, _Unreachable if it closed."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout(f"no data for {what}")
        self._socket.settimeout(remaining)
        data = self._socket.recv(65536)
        if not data:
            raise _Unreachable(f"etcd closed the connection while sending {what}")
        self._raw += data

    # --- the stream ------------------------------------------------------------------------

    def _read_message(self, deadline):
        """Return the next JSON message of the stream, or None if none came by
        `deadline`. Raise StoreError if the connection failed or the stream ended."""
        while True:
            if b"\n" in self._lines:
                line, self._lines = self._lines.split(b"\n", 1)
                if not line.strip():
                    continue
                try:
                    message = json.loads(line)
                except (ValueError, UnicodeDecodeError):
                    raise StoreError(f"etcd at {self.endpoint} sent the watch on {self.prefix!r} something that is"
                                     f" not JSON: {line[:200]!r}") from None
                if not isinstance(message, dict):
                    raise StoreError(f"etcd at {self.endpoint} sent the watch on {self.prefix!r} a"
                                     f" {type(message).__name__}: {line[:200]!r}")
                return message
            if self._dechunk():
                continue
            try:
                self._receive(deadline, what="the watch stream")
            except (socket.timeout, TimeoutError):
                return None
            except _Unreachable as failure:
                raise StoreError(f"the watch on {self.prefix!r} at {self.endpoint} ended: {failure}") from None
            except OSError as error:
                if self._closed:
                    raise _Closing() from None
                raise StoreError(f"the watch on {self.prefix!r} at {self.endpoint} lost its connection:"
                                 f" {describe_error(error)}") from None

    def _dechunk(self):
        """Move what the raw buffer holds of chunk data into the line buffer; return
        whether anything moved. Raise StoreError at the last chunk (end of stream) or
        on a malformed chunk."""
        moved = False
        while self._raw:
            if self._chunk_left > 0:
                data = self._raw[:self._chunk_left]
                self._raw = self._raw[len(data):]
                self._chunk_left -= len(data)
                self._lines += data
                if self._chunk_left == 0:
                    self._chunk_left = -2  # the CRLF after the chunk data
                moved = moved or bool(data)
                continue
            if self._chunk_left < 0:  # skip the CRLF that ends a chunk
                skip = min(-self._chunk_left, len(self._raw))
                self._raw = self._raw[skip:]
                self._chunk_left += skip
                continue
            if b"\r\n" not in self._raw:
                if len(self._raw) > 1024:
                    raise StoreError(f"the watch on {self.prefix!r} at {self.endpoint}: a malformed chunk")
                break
            line, self._raw = self._raw.split(b"\r\n", 1)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                raise StoreError(f"the watch on {self.prefix!r} at {self.endpoint}: a malformed chunk size"
                                 f" {line[:50]!r}") from None
            if size == 0:
                raise StoreError(f"etcd at {self.endpoint} ended the watch stream on {self.prefix!r}")
            self._chunk_left = size
        return moved

    def _check(self, message):
        """Raise what a message that is an error or a cancel means."""
        if "error" in message:
            raise StoreError(f"etcd at {self.endpoint} ended the watch on {self.prefix!r} with an error:"
                             f" {error_message(message)}")
        result = message.get("result") or {}
        if not result.get("canceled"):
            return
        compact = int(result.get("compact_revision") or 0)
        reason = str(result.get("cancel_reason") or "")
        if compact:
            raise Compacted(f"etcd at {self.endpoint} canceled the watch on {self.prefix!r} from revision"
                            f" {self.revision + 1}: its history before revision {compact} is compacted; read the"
                            " whole prefix again and watch from that read's revision", compact)
        if "PermissionDenied" in reason or "permission denied" in reason:
            raise Denied(f"etcd at {self.endpoint} denies user {self.store.user!r} to watch {self.prefix!r}"
                         f" ({reason}): the user's roles do not grant read on that prefix",
                         key=self.prefix, user=self.store.user, operation="watch")
        raise StoreError(f"etcd at {self.endpoint} canceled the watch on {self.prefix!r}:"
                         f" {reason or 'no reason given'}")

    def __iter__(self):
        return self

    def __next__(self):
        with self._lock:
            if self._pending is not None:
                error, self._pending = self._pending, None
                self._closed = True
                raise error
            if self._closed:
                raise StopIteration
            self._reading = True
        try:
            deadline = time.monotonic() + self.idle
            while True:
                message = self._read_message(deadline)
                if message is None:
                    return []
                self._check(message)
                events = [Event(event.get("type") or "PUT", key_value(event.get("kv") or {}))
                          for event in (message.get("result") or {}).get("events") or []]
                if events:  # not the acknowledgement nor a progress notice
                    self.revision = max(self.revision, max(event.kv.mod_revision for event in events))
                    return events
        except (_Closing, StoreError) as error:
            with self._lock:
                closed, self._closed = self._closed, True
            if isinstance(error, _Closing) or closed:
                raise StopIteration from None
            raise
        finally:
            with self._lock:
                self._reading = False
                if self._closed:
                    self._shut()

    def close(self):
        """End the watch. From another thread, this wakes the iterating one, whose
        iteration then ends without an error."""
        with self._lock:
            self._closed = True
            if self._reading and self._socket is not None:
                # Only shut down: the reading thread still uses the socket, and closes it.
                try:
                    socket.socket.shutdown(self._socket, socket.SHUT_RDWR)
                except OSError:
                    pass
            else:
                self._shut()

    def _shut(self):
        if self._socket is not None:
            try:
                self._socket.close()
            except OSError:
                pass
            self._socket = None

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        self.close()


class _Closing(Exception):
    """The watch's socket failed because close() shut it down."""


def keepalive(sock):
    """Turn on TCP keepalive (KEEPALIVE), where the platform offers the options."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in zip(("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT"), KEEPALIVE):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
