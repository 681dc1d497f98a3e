"""certrelay.fleet.store against a real etcd 3.4 (tests/etcd.py): TLS, users with
per-prefix roles, watches, compaction, SIGKILL and restart, token expiry."""

import base64
import json
import secrets
import threading

import pytest

from certrelay.fleet import store as store_module
from certrelay.fleet.store import Compacted, Denied, Event, KeyValue, Store, StoreError
from tests import certs, wait
from tests.etcd import Etcd, free_port

MAIL = "/certrelay/v1/hosts/mail/"
MAIL2 = "/certrelay/v1/hosts/mail2/"
ACKS_MAIL = "/certrelay/v1/acks/mail/"
PASSWORDS = {"publisher": secrets.token_hex(8), "mail": secrets.token_hex(8)}


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    """One etcd for the module, auth on: `publisher` may read and write all of
    /certrelay/v1/, `mail` may read its hosts/ prefix and write its acks/ prefix."""
    instance = Etcd(tmp_path_factory.mktemp("etcd"))
    try:
        instance.start()
        instance.add_user("publisher", PASSWORDS["publisher"], read_prefixes=["/certrelay/v1/"],
                          write_prefixes=["/certrelay/v1/"])
        instance.add_user("mail", PASSWORDS["mail"], read_prefixes=[MAIL], write_prefixes=[ACKS_MAIL])
        yield instance
    finally:
        instance.close()


def connect(etcd, user="publisher", **options):
    return Store([etcd.endpoint], ca_file=etcd.ca_file, user=user, password=PASSWORDS.get(user), **options)


@pytest.fixture
def publisher(etcd):
    with connect(etcd) as store:
        yield store


@pytest.fixture
def prefix(request):
    """A prefix of the test's own, so that tests sharing the etcd never meet."""
    return f"/certrelay/v1/test/{request.node.name}/"


def collect(watch, count):
    """Read `watch` until `count` events came (skipping idle []s); return them."""
    events = []
    wait.until(lambda: events.extend(next(watch)) or len(events) >= count, what=f"{count} watch events",
               explain=lambda: f"got {events}", interval=0)
    return events


# --- the key-value API --------------------------------------------------------------


def test_round_trip_of_binary_values(publisher, prefix):
    every_byte = bytes(range(256))
    revision = publisher.put(prefix + "b", every_byte)
    publisher.put(prefix + "a", b"")
    publisher.put(prefix[:-1] + "-sibling", b"not under the prefix")

    got = publisher.get(prefix + "b")
    assert got == KeyValue(prefix + "b", every_byte, revision, 1)
    assert publisher.get(prefix + "a").value == b""
    assert publisher.get(prefix + "missing") is None

    second = publisher.put(prefix + "b", b"\0\n\xff")
    assert second > revision
    assert publisher.get(prefix + "b") == KeyValue(prefix + "b", b"\0\n\xff", second, 2)

    read_at, values = publisher.range(prefix)
    assert read_at == second
    assert [(kv.key, kv.value) for kv in values] == [(prefix + "a", b""), (prefix + "b", b"\0\n\xff")]
    _, keys = publisher.range(prefix, keys_only=True)
    assert [(kv.key, kv.value, kv.mod_revision) for kv in keys] == [(kv.key, b"", kv.mod_revision) for kv in values]

    publisher.delete(prefix + "b")
    assert publisher.get(prefix + "b") is None
    assert [kv.key for kv in publisher.range(prefix)[1]] == [prefix + "a"]
    assert publisher.delete_prefix(prefix) == 1
    assert publisher.range(prefix)[1] == []
    assert publisher.get(prefix[:-1] + "-sibling").value == b"not under the prefix"


def test_put_many_writes_over_128_keys_in_few_transactions(publisher, prefix):
    before = publisher.put(prefix + "marker", b"")
    items = {f"{prefix}host{number:03d}": f"sealed for {number}".encode() for number in range(300)}

    last = publisher.put_many(items)

    # Three transactions of at most 128 puts each (etcd refuses more): three revisions.
    assert last == before + 3
    revision, values = publisher.range(prefix)
    assert revision == last
    assert {kv.key: kv.value for kv in values if kv.key != prefix + "marker"} == items
    assert {kv.mod_revision for kv in values} == {before, before + 1, before + 2, before + 3}


def test_put_many_splits_what_etcd_would_refuse_as_too_large(publisher, prefix):
    # etcd refuses a request over 2 MiB (its gRPC limit with the default --max-request-bytes),
    # which one transaction of 128 values of 16 KiB would be: put_many splits by size too.
    with pytest.raises(StoreError, match="too large.*--max-request-bytes"):
        publisher.put(prefix + "huge", b"x" * (2 * 1024 * 1024))
    items = {f"{prefix}{number:03d}": bytes([number]) * 16384 for number in range(200)}

    publisher.put_many(items)

    assert {kv.key: kv.value for kv in publisher.range(prefix)[1]} == items


def test_range_reads_thousands_of_keys_in_pages(publisher, prefix):
    items = {f"{prefix}{number:05d}": number.to_bytes(2, "big") for number in range(1234)}
    last = publisher.put_many(items)

    revision, values = publisher.range(prefix)

    assert revision == last
    assert [kv.key for kv in values] == sorted(items)  # sorted, none twice, none missing
    assert {kv.key: kv.value for kv in values} == items
    assert len(publisher.range(prefix, keys_only=True)[1]) == 1234


def test_a_range_whose_revision_is_compacted_between_pages_reads_again(etcd, publisher, prefix, monkeypatch):
    publisher.put_many({f"{prefix}{number:02d}": b"old" for number in range(25)})
    monkeypatch.setattr(store_module, "PAGE", 10)
    calls = []
    original = Store._call

    def compacting_after_the_first_page(self, path, request, key, operation):
        calls.append(request.get("revision"))
        if len(calls) == 2:  # between the first page and the second
            etcd.compact(self.put(prefix + "99", b"new"))
        return original(self, path, request, key, operation)

    monkeypatch.setattr(Store, "_call", compacting_after_the_first_page)
    revision, values = publisher.range(prefix)

    assert [kv.key for kv in values] == [f"{prefix}{number:02d}" for number in range(25)] + [prefix + "99"]
    assert revision == values[-1].mod_revision
    assert calls[:2] == [None, calls[1]] and calls[1] is not None  # the second page was pinned, then refused


# --- watches ---------------------------------------------------------------------------


def test_a_watch_from_a_saved_revision_replays_missed_events_in_order(publisher, prefix):
    saved = publisher.put(prefix + "a", b"1")
    publisher.put(prefix + "b", b"2")
    publisher.delete(prefix + "a")
    publisher.put_many({prefix + "c": b"3", prefix + "d": b"4"})
    publisher.put(prefix[:-1] + "-sibling", b"not watched")
    last = publisher.put(prefix + "b", b"5")

    with publisher.watch(prefix, saved + 1, idle=10) as watch:
        events = collect(watch, 5)
        assert [(event.type, event.kv.key, event.kv.value) for event in events] == [
            ("PUT", prefix + "b", b"2"), ("DELETE", prefix + "a", b""), ("PUT", prefix + "c", b"3"),
            ("PUT", prefix + "d", b"4"), ("PUT", prefix + "b", b"5")]
        assert [event.kv.mod_revision for event in events] == sorted(event.kv.mod_revision for event in events)
        assert watch.revision == last

        live = publisher.put(prefix + "e", b"6")
        assert collect(watch, 1) == [Event("PUT", KeyValue(prefix + "e", b"6", live, 1))]
        assert watch.revision == live


def test_a_watch_from_a_compacted_revision_raises_compacted(etcd, publisher, prefix):
    saved = publisher.put(prefix + "a", b"1")
    publisher.put(prefix + "a", b"2")
    compacted = publisher.put(prefix + "a", b"3")
    etcd.compact(compacted)

    with publisher.watch(prefix, saved + 1) as watch:
        with pytest.raises(Compacted) as raised:
            next(watch)
        assert raised.value.revision == compacted
        assert f"revision {compacted}" in str(raised.value) and etcd.endpoint in str(raised.value)
        assert list(watch) == []  # the cancel is the end

    # As FLEET.md says to: read the whole prefix, watch from there.
    revision, values = publisher.range(prefix)
    assert values[0].value == b"3"
    with publisher.watch(prefix, revision + 1, idle=10) as watch:
        written = publisher.put(prefix + "a", b"4")
        assert collect(watch, 1)[0].kv.mod_revision == written


def bounded(call):
    """Return call(), run in a thread: a call that never returns fails the test."""
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(call()), daemon=True)
    thread.start()
    thread.join(wait.GENEROUS)
    assert outcome, f"waited {wait.GENEROUS} s for {call}, in vain"
    return outcome[0]


def test_an_idle_watch_yields_empty_lists_and_then_events(publisher, prefix):
    with publisher.watch(prefix, None, idle=0.2) as watch:
        assert bounded(lambda: next(watch)) == []
        assert bounded(lambda: next(watch)) == []
        revision = publisher.put(prefix + "a", b"x")
        events = collect(watch, 1)
        assert events[0].kv == KeyValue(prefix + "a", b"x", revision, 1)


def test_close_from_another_thread_ends_the_iteration(publisher, prefix):
    seen, outcome = [], []
    watch = publisher.watch(prefix, None, idle=600)

    def iterate():
        try:
            for events in watch:
                seen.extend(events)
            outcome.append("ended")
        except BaseException as error:  # reported to the test's thread
            outcome.append(error)

    thread = threading.Thread(target=iterate)
    thread.start()
    try:
        publisher.put(prefix + "seen", b"")
        wait.until(lambda: seen, what="the iterating thread to see the event")  # and wait for the next
        watch.close()
        thread.join(wait.GENEROUS)
        assert not thread.is_alive()
        assert outcome == ["ended"]
    finally:
        watch.close()
        thread.join(wait.GENEROUS)


def test_sigkill_mid_watch_raises_and_a_new_watch_after_restart_replays(tmp_path):
    with Etcd(tmp_path / "etcd") as etcd:
        etcd.add_user("publisher", PASSWORDS["publisher"], read_prefixes=["/certrelay/v1/"],
                      write_prefixes=["/certrelay/v1/"])
        store = connect(etcd)
        prefix = MAIL
        start = store.put(prefix + "one", b"1")
        watch = store.watch(prefix, start, idle=30)
        assert collect(watch, 1)[0].kv.key == prefix + "one"
        seen = watch.revision

        etcd.kill()
        with pytest.raises(StoreError, match="watch on .* lost its connection|watch on .* ended"):
            next(watch)
        with pytest.raises(StopIteration):
            next(watch)
        with pytest.raises(StoreError, match=f"{etcd.endpoint}: connection refused"):
            connect(etcd).put(prefix + "two", b"2")

        etcd.restart()
        # The store's kept-alive connection died with etcd: it connects again.
        two = store.put(prefix + "two", b"2")
        three = store.put(prefix + "three", b"3")
        with store.watch(prefix, seen + 1, idle=30) as again:
            events = collect(again, 2)
        assert [(event.kv.key, event.kv.mod_revision) for event in events] == [
            (prefix + "two", two), (prefix + "three", three)]


def test_a_stopped_etcd_times_out_instead_of_hanging(tmp_path):
    with Etcd(tmp_path / "etcd") as etcd:
        store = Store([etcd.endpoint], ca_file=etcd.ca_file)  # etcd without auth
        hasty = Store([etcd.endpoint], ca_file=etcd.ca_file, timeout=0.5)  # used only while etcd is stopped
        store.put("/k", b"v")
        # A user for an etcd without auth: etcd says so, and requests go without a token.
        assert Store([etcd.endpoint], ca_file=etcd.ca_file, user="mail", password="x").get("/k").value == b"v"
        idle_watch = store.watch("/", None, idle=0.3)
        etcd.stop()
        try:
            with pytest.raises(StoreError, match=f"{etcd.endpoint}: no answer in time"):
                hasty.get("/k")
            assert bounded(lambda: next(idle_watch)) == []  # still open: the caller decides to read again
            with pytest.raises(StoreError, match=f"cannot watch '/': cannot reach etcd: {etcd.endpoint}: no answer"):
                next(hasty.watch("/", None))
        finally:
            etcd.cont()
        assert store.get("/k").value == b"v"
        idle_watch.close()


def test_an_expired_token_is_renewed_and_an_open_watch_survives_it(tmp_path):
    with Etcd(tmp_path / "etcd", auth_token_ttl=1) as etcd:
        etcd.add_user("publisher", PASSWORDS["publisher"], read_prefixes=["/certrelay/v1/"],
                      write_prefixes=["/certrelay/v1/"])
        store, watcher = connect(etcd), connect(etcd)
        first = store.put(MAIL + "a", b"1")
        watcher.get(MAIL + "a")
        tokens = store._token, watcher._token
        watch = store.watch(MAIL, first + 1, idle=30)

        etcd.wait_for_token_expiry("publisher", PASSWORDS["publisher"])
        assert not any(etcd.token_valid(token) for token in tokens)  # both stores' tokens are gone

        second = store.put(MAIL + "b", b"2")  # 401, authenticate, again: it lands
        assert store._token not in (None, *tokens)
        assert store.get(MAIL + "b").mod_revision == second
        assert collect(watch, 1)[0].kv.mod_revision == second  # the watch opened with the old token
        watch.close()
        with watcher.watch(MAIL, first + 1, idle=30) as new_watch:  # canceled for the token: authenticates
            assert [event.kv.key for event in collect(new_watch, 1)] == [MAIL + "b"]
        assert watcher._token not in (None, *tokens)


# --- refusals --------------------------------------------------------------------------


def test_another_hosts_prefix_is_denied(etcd, publisher):
    publisher.put(MAIL + "lineages/herzbube.ch", b"for mail")
    publisher.put(MAIL2 + "lineages/other.example", b"for mail2")
    mail = connect(etcd, "mail")

    assert [kv.value for kv in mail.range(MAIL)[1]] == [b"for mail"]
    mail.put(ACKS_MAIL + "herzbube.ch", b"ack")

    # The trailing slash: read on "hosts/mail/" must not reach "hosts/mail2/".
    for read in (lambda: mail.range(MAIL2), lambda: mail.get(MAIL2 + "lineages/other.example"),
                 lambda: mail.range(MAIL[:-1])):
        with pytest.raises(Denied) as raised:
            read()
        assert raised.value.user == "mail" and "'mail'" in str(raised.value)
        assert "/certrelay/v1/hosts/mail" in str(raised.value) and etcd.endpoint in str(raised.value)
    with pytest.raises(Denied, match="'mail' to write '/certrelay/v1/hosts/mail/x'"):
        mail.put(MAIL + "x", b"forged")
    with pytest.raises(Denied, match="to write"):
        mail.put_many({MAIL + "y": b"forged"})
    with pytest.raises(Denied, match="to write"):
        mail.put("/certrelay/v1/acks/mail2/x", b"forged")

    with mail.watch(MAIL2, None) as watch:
        with pytest.raises(Denied) as raised:
            next(watch)
    assert raised.value.key == MAIL2 and raised.value.user == "mail" and raised.value.operation == "watch"
    assert f"watch {MAIL2!r}" in str(raised.value)


def test_no_user_on_an_etcd_with_auth_says_so(etcd):
    with pytest.raises(StoreError, match="auth enabled, and no user was given"):
        Store([etcd.endpoint], ca_file=etcd.ca_file).get(MAIL)


def test_a_wrong_password_names_the_endpoint_and_the_user(etcd):
    store = Store([etcd.endpoint], ca_file=etcd.ca_file, user="mail", password="wrong")
    with pytest.raises(StoreError) as raised:
        store.range(MAIL)
    assert not isinstance(raised.value, Denied)
    assert etcd.endpoint in str(raised.value) and "'mail'" in str(raised.value)
    assert "wrong user name or password" in str(raised.value)
    with pytest.raises(StoreError, match="wrong user name or password"):
        next(store.watch(MAIL, None))


def test_an_unreachable_endpoint_is_named(etcd):
    dead = f"https://127.0.0.1:{free_port()}"
    store = Store([dead], ca_file=etcd.ca_file, user="mail", password=PASSWORDS["mail"])
    with pytest.raises(StoreError, match=f"cannot reach etcd: {dead}: connection refused: is etcd running"):
        store.range(MAIL)
    with pytest.raises(StoreError, match=f"{dead}: connection refused"):
        next(store.watch(MAIL, None))


def test_an_untrusted_certificate_is_a_clear_error(etcd, tmp_path):
    stranger = tmp_path / "other-ca.pem"
    stranger.write_bytes(certs.Authority("not etcd's CA").pem)
    store = Store([etcd.endpoint], ca_file=str(stranger), user="mail", password=PASSWORDS["mail"])
    with pytest.raises(StoreError, match=f"{etcd.endpoint}: TLS: etcd's certificate is not trusted.*ca-file must"):
        store.range(MAIL)
    with pytest.raises(StoreError, match="not trusted"):
        next(store.watch(MAIL, None))
    with pytest.raises(StoreError, match="cannot use it as the CA"):
        Store([etcd.endpoint], ca_file=str(tmp_path / "missing.pem"))


def test_plain_http_only_to_loopback():
    with pytest.raises(ValueError, match="plain http to another machine.*https://etcd.example.net:2379"):
        Store(["https://127.0.0.1:2379", "http://etcd.example.net:2379"])
    with pytest.raises(ValueError, match="plain http"):
        Store(["http://10.0.0.1:2379"])
    for loopback in ("http://127.0.0.1:2379", "http://localhost:2379", "http://[::1]:2379", "http://127.1.2.3"):
        assert Store([loopback]).endpoints[0].port == 2379
    for wrong in ("etcd:2379", "ftp://etcd:2379", "https://etcd:2379/v3", "https://etcd:port", []):
        with pytest.raises(ValueError):
            Store(wrong if isinstance(wrong, list) else [wrong])


def test_failover_to_the_next_endpoint_and_remembering_it(etcd, prefix):
    dead = f"https://127.0.0.1:{free_port()}"
    store = Store([dead, etcd.endpoint], ca_file=etcd.ca_file, user="publisher", password=PASSWORDS["publisher"])
    revision = store.put(prefix + "a", b"1")
    assert store.endpoint == etcd.endpoint
    assert store.get(prefix + "a").mod_revision == revision
    with store.watch(prefix, revision, idle=10) as watch:
        assert watch.endpoint == etcd.endpoint
        assert collect(watch, 1)[0].kv.key == prefix + "a"
    # A new store finds the live one too when watching first.
    other = Store([dead, etcd.endpoint], ca_file=etcd.ca_file, user="publisher", password=PASSWORDS["publisher"])
    with other.watch(prefix, revision, idle=10) as watch:
        assert collect(watch, 1)[0].kv.value == b"1"


def test_base64_on_the_wire(etcd, publisher, prefix):
    """Keys and values travel base64-encoded: what the store wrote, etcd's own
    gateway reads back byte for byte."""
    publisher.put(prefix + "é", b"\xff\x00")
    token = etcd.authenticate("publisher", PASSWORDS["publisher"])
    status, body = etcd.request("POST", "/v3/kv/range", {"key": base64.b64encode((prefix + "é").encode()).decode()},
                                headers={"Authorization": token})
    assert status == 200
    assert base64.b64decode(json.loads(body)["kvs"][0]["value"]) == b"\xff\x00"
