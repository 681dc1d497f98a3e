"""What verify reports beyond "current": the chain an endpoint serves compared with the
lineage's live chain.pem (the *chain* outcome, and its escalation), and a hint that fits
each way an endpoint can be unreachable. Real TLS servers on 127.0.0.1 (in-process, see
test_probe) and real `certrelay run` / `certrelay verify` processes."""

import json
import os
import socket
import ssl

import pytest

from certrelay import endpoint as endpoint_module, plan, probe, verify
from tests import certs
from tests.integration.test_probe import Server, refusing_smtp, tls_server

NAME = "example.test"
UNIT = "tlsd.service"
GENEROUS = 30  # seconds: a verify-timeout never reached by an endpoint that answers


@pytest.fixture(scope="module")
def authorities():
    """A root and two intermediates under it, as Let's Encrypt's R3 and R11."""
    root = certs.Authority("Test Root X1")
    return {"root": root, "R3": certs.Authority("R3", root), "R11": certs.Authority("R11", root)}


@pytest.fixture
def servers():
    """serve(pem_parts, key_pem) starts a TLS server sending the certificates of
    `pem_parts` (the leaf first) with the key; each is stopped when the test ends."""
    started = []

    def serve(directory, pem_parts, key_pem, handler=tls_server):
        chain_file, key_file = os.path.join(directory, f"served{len(started)}.pem"), os.path.join(directory, "key.pem")
        with open(chain_file, "wb") as file:
            file.write(b"".join(pem_parts))
        with open(key_file, "wb") as file:
            file.write(key_pem)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(chain_file, key_file)
        started.append(Server(handler, context))
        return started[-1]

    yield serve
    for server in started:
        server.stop()


def check(url, name=NAME, units=(("reload", UNIT),), escalate=True):
    endpoint = endpoint_module.parse_endpoint(url)
    return plan.Check(name, endpoint, endpoint_module.server_name(endpoint, [name]), tuple(units), escalate,
                      frozenset())


def verdict_for(config_dir, url, timeout=GENEROUS, **options):
    [verdict] = verify.verify([check(url, **options)], str(config_dir), timeout, quiet=True, once=True)
    return verdict


# --- the chain outcome ----------------------------------------------------------------------


def test_the_live_leaf_with_the_intermediate_of_chain_pem_is_current(tmp_path, servers, authorities):
    lineage = certs.renew_with_chain(str(tmp_path), NAME, authorities["R11"])
    server = servers(str(tmp_path), [lineage["fullchain"]], lineage["privkey"])

    verdict = verdict_for(tmp_path, f"tls://127.0.0.1:{server.port}")

    assert verdict.served.chain == (ssl.PEM_cert_to_DER_cert(authorities["R11"].pem.decode()),)
    assert verdict.outcome == "current", verdict.describe()


def test_a_root_sent_along_with_the_intermediate_is_still_current(tmp_path, servers, authorities):
    lineage = certs.renew_with_chain(str(tmp_path), NAME, authorities["R11"])
    server = servers(str(tmp_path), [lineage["fullchain"], authorities["root"].pem], lineage["privkey"])

    verdict = verdict_for(tmp_path, f"tls://127.0.0.1:{server.port}")

    assert len(verdict.served.chain) == 2  # the intermediate and the root, as sent
    assert verdict.outcome == "current", verdict.describe()  # clients have their roots: no harm done


@pytest.mark.parametrize("served_chain, says", [
    (["R3"], "intermediates served: CN=R3 (sha256 "),
    ([], "intermediates served: none; chain.pem: CN=R11 (sha256 "),
    (["R3", "R11"], "intermediates served: CN=R3 (sha256 "),
], ids=["old-intermediate", "leaf-alone", "an-extra-old-one"])
def test_the_live_leaf_with_other_intermediates_is_a_stale_chain_with_the_fix_in_words(
        tmp_path, servers, authorities, served_chain, says):
    certs.renew_with_chain(str(tmp_path), NAME, authorities["R3"])
    lineage = certs.renew_with_chain(str(tmp_path), NAME, authorities["R11"])  # the intermediate changed
    served = [lineage["cert"], *(authorities[name].pem for name in served_chain)]
    server = servers(str(tmp_path), served, lineage["privkey"])

    verdict = verdict_for(tmp_path, f"tls://127.0.0.1:{server.port}")
    line = verdict.describe()

    assert verdict.outcome == "chain"
    assert not verdict.ok
    assert verdict.served.sha256 == verdict.expected  # the leaf is the live one
    assert f"serves the current certificate of {NAME} (serial " in line
    assert "with a stale chain" in line
    assert says in line
    assert "chain.pem: CN=R11 (sha256 " in line
    assert f"reload or restart {UNIT} so that it reads chain.pem or fullchain.pem again" in line


def test_a_lineage_without_chain_pem_is_not_judged_on_its_chain(tmp_path, servers, authorities):
    lineage = certs.renew_with_chain(str(tmp_path), NAME, authorities["R11"])
    os.unlink(tmp_path / "live" / NAME / "chain.pem")
    server = servers(str(tmp_path), [lineage["cert"], authorities["R3"].pem], lineage["privkey"])

    assert verdict_for(tmp_path, f"tls://127.0.0.1:{server.port}").outcome == "current"


# --- the chain outcome in a real run: escalated like an old certificate ----------------------


class ChainKeepingService:
    """`UNIT` serving TLS on 127.0.0.1 as a daemon that reads cert.pem, privkey.pem and
    chain.pem of live/NAME apart: a restart reads all three, a reload (through the
    recording systemctl) rereads the leaf and key but keeps the chain it read at its
    start, so after a renewal that changed the intermediate it serves a stale chain."""

    def __init__(self, relay):
        self.relay, self.live = relay, os.path.join(relay.config_dir, "live", NAME)
        self.seen = len(relay.calls())
        self.chain = self.read("chain.pem")
        self.load()
        self.server = Server(self.handle, self.context)
        self.port = self.server.port

    def read(self, part):
        with open(os.path.join(self.live, part), "rb") as file:
            return file.read()

    def load(self):
        served = os.path.join(self.relay.root, "served.pem")
        with open(served, "wb") as file:
            file.write(self.read("cert.pem") + self.chain)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(served, os.path.join(self.live, "privkey.pem"))

    def handle(self, peer):
        calls = self.relay.calls()
        for call in calls[self.seen:]:
            if call == f"restart {UNIT}":
                self.chain = self.read("chain.pem")
            if call in (f"restart {UNIT}", f"reload {UNIT}"):
                self.load()
        self.seen = len(calls)
        peer.server.context = self.context
        peer.finish_tls()


@pytest.fixture
def chain_keeping_service(relay, authorities):
    certs.renew_with_chain(relay.config_dir, NAME, authorities["R3"])
    service = ChainKeepingService(relay)
    yield service
    service.server.stop()


def rules(port, extra=""):
    return (f'[settings]\nmin-interval = 0\nverify-timeout = "2s"\n\n[[rule]]\nmatch = ["{NAME}"]\n'
            f'reload = ["{UNIT}"]\nverify = ["tls://127.0.0.1:{port}"]\n{extra}')


def test_a_stale_chain_after_a_reload_is_escalated_to_one_restart(relay, chain_keeping_service, authorities):
    relay.write_rules(rules(chain_keeping_service.port))
    certs.renew_with_chain(relay.config_dir, NAME, authorities["R11"])
    relay.publish(NAME, renew=False)

    result = relay.run()

    assert relay.calls() == [f"reload {UNIT}", f"restart {UNIT}"]
    assert "with a stale chain (intermediates served: CN=R3" in result.stderr
    assert "escalating to a restart" in result.stderr
    assert f"verified: tls://127.0.0.1:{chain_keeping_service.port} (SNI {NAME}) serves the current" in result.stderr
    assert result.returncode == 0, result.stderr
    assert relay.entries("claimed") == []


def test_a_stale_chain_without_escalation_is_an_error_that_keeps_the_notification(
        relay, chain_keeping_service, authorities):
    relay.write_rules(rules(chain_keeping_service.port, extra="escalate = false\n"))
    certs.renew_with_chain(relay.config_dir, NAME, authorities["R11"])
    relay.publish(NAME, renew=False)

    result = relay.run()

    assert relay.calls() == [f"reload {UNIT}"]
    assert "error: stale chain: tls://127.0.0.1:" in result.stderr
    assert "(intermediates served: CN=R3 (sha256 " in result.stderr and "; chain.pem: CN=R11 (sha256 " in result.stderr
    assert result.returncode == 1
    assert len(relay.entries("claimed")) == 1

    checked = relay.run("--json", command="verify")  # on demand too, without acting

    assert checked.returncode == 1
    assert '"outcome": "chain"' in checked.stdout
    assert "with a stale chain" in json.loads(checked.stdout)[0]["error"]  # the detail, not null
    assert relay.calls() == [f"reload {UNIT}"]


# --- a hint that fits each failure -----------------------------------------------------------


@pytest.fixture
def lineage(tmp_path, authorities):
    return certs.renew_with_chain(str(tmp_path), NAME, authorities["R11"])


def closed_port():
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        return unused.getsockname()[1]


@pytest.fixture
def blackhole():
    """A port on 127.0.0.1 that never answers a SYN: its listener's queue is full (one
    connection nobody accepts, backlog 0), so the kernel drops further SYNs."""
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        filler.connect(listener.getsockname())
        yield listener.getsockname()[1]


def test_a_refused_connection_says_nothing_listens(tmp_path, lineage):
    line = verdict_for(tmp_path, f"smtps://127.0.0.1:{closed_port()}").describe()

    assert "unreachable (connection refused); nothing listens there: is the service running" in line


def test_a_connection_never_answered_says_a_firewall_may_drop_it(tmp_path, lineage, blackhole):
    verdict = verdict_for(tmp_path, f"imaps://127.0.0.1:{blackhole}", timeout=1)

    assert verdict.served.failure == "timeout"
    line = verdict.describe()
    assert "unreachable (timed out after 1 s while connecting); nothing answered: a firewall drops" in line


def test_a_failed_handshake_asks_whether_the_port_speaks_direct_tls(tmp_path, lineage, servers):
    def plain_smtp(peer):
        peer.send("220 mail.test ESMTP\r\n")
        peer.rest()

    server = servers(str(tmp_path), [lineage["fullchain"]], lineage["privkey"], handler=plain_smtp)

    line = verdict_for(tmp_path, f"smtps://127.0.0.1:{server.port}").describe()

    assert "unreachable (TLS handshake failed: " in line
    assert "does this port speak smtps:// (TLS from the first byte)" in line


def test_a_protocol_refusal_quotes_the_server_and_names_the_scheme(tmp_path, lineage, servers):
    server = servers(str(tmp_path), [lineage["fullchain"]], lineage["privkey"],
                     handler=refusing_smtp("454 4.7.0 TLS not available due to local problem"))

    line = verdict_for(tmp_path, f"submission://127.0.0.1:{server.port}").describe()

    assert ("unreachable (STARTTLS refused: 454 4.7.0 TLS not available due to local problem); the server's own"
            " words are quoted: does the service offer TLS there, and is submission:// the protocol") in line


def test_a_server_that_closes_at_once_asks_whether_it_lets_the_client_in(tmp_path, lineage, servers):
    server = servers(str(tmp_path), [lineage["fullchain"]], lineage["privkey"], handler=lambda peer: None)

    line = verdict_for(tmp_path, f"imap://127.0.0.1:{server.port}").describe()

    assert "unreachable (connection closed by the server waiting for the greeting); the service closed" in line


def test_a_name_that_does_not_resolve_says_so(tmp_path, lineage, monkeypatch):
    def unknown(host, *arguments, **options):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(probe, "getaddrinfo", unknown)

    line = verdict_for(tmp_path, "imaps://mail.example.test").describe()

    assert ("unreachable (cannot resolve mail.example.test: Name or service not known); the host name does not"
            " resolve here") in line
