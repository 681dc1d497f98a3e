"""A real etcd 3.4 (Debian's /usr/bin/etcd) for tests: one member on loopback, free
ports, its data in a temporary directory, server TLS from a throw-away CA.

    with Etcd(tmp_path) as etcd:
        etcd.add_user("mail", "secret", read_prefixes=["/certrelay/v1/hosts/mail/"])
        store = Store([etcd.endpoint], ca_file=etcd.ca_file, user="mail", password="secret")

Clients authenticate with user and password (FLEET.md: through the JSON gateway a
client certificate with a Common Name is refused), so etcd runs without
--client-cert-auth. Readiness is polled on etcd's /health and token expiry on probe
tokens (tests.wait.until): no test sleeps. The process is ended by its PID only.
"""

import base64
import datetime
import http.client
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests import certs, wait

ETCD = "/usr/bin/etcd"
ETCDCTL = "/usr/bin/etcdctl"


def free_port():
    """A TCP port on 127.0.0.1 that nobody listens on now (etcd may still lose a race
    for it: `Etcd.start` tries again with other ports then)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_certificate(authority, names=("localhost",), addresses=("127.0.0.1", "::1")):
    """Return (certificate PEM, key PEM) for etcd's server, signed by `authority` (a
    tests.certs.Authority), valid for DNS `names` and IP `addresses`."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    alternative = [x509.DNSName(name) for name in names]
    alternative += [x509.IPAddress(ipaddress.ip_address(address)) for address in addresses]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "etcd test server")]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, authority.name)]))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(alternative), critical=False)
        # Python 3.13's default context (VERIFY_X509_STRICT) refuses a certificate without it.
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.key.public_key()), critical=False)
        # serverAuth is what clients check; clientAuth too lets the one certificate serve any role.
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .sign(authority.key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


class Etcd:
    """One etcd member. `endpoint` ("https://127.0.0.1:PORT") and `ca_file` (the CA
    that signed its certificate) are what a client needs; `pid` the running process.

    `auth_token_ttl`: seconds a simple auth token lives unused (etcd's default: 300).
    """

    def __init__(self, directory, auth_token_ttl=None, addresses=()):
        self.directory = str(directory)
        self.addresses = tuple(addresses)  # IPv4 addresses to listen on besides 127.0.0.1 (a veth's)
        self.data_dir = os.path.join(self.directory, "etcd-data")
        self.log_path = os.path.join(self.directory, "etcd.log")
        self.auth_token_ttl = auth_token_ttl
        self.root_password = None  # set once auth is enabled
        self.process = None
        self.client_port = self.peer_port = None
        os.makedirs(self.directory, exist_ok=True)
        self.authority = certs.Authority("certrelay test etcd CA")
        self.ca_file = self._write("ca.pem", self.authority.pem)
        certificate, key = server_certificate(self.authority, addresses=("127.0.0.1", "::1", *self.addresses))
        self.cert_file = self._write("server.pem", certificate)
        self.key_file = self._write("server-key.pem", key)
        os.chmod(self.key_file, 0o600)

    def _write(self, name, data):
        path = os.path.join(self.directory, name)
        with open(path, "wb") as file:
            file.write(data)
        return path

    @property
    def endpoint(self):
        return f"https://127.0.0.1:{self.client_port}"

    def endpoint_on(self, address):
        """The client URL on one of `addresses`."""
        return f"https://{address}:{self.client_port}"

    @property
    def pid(self):
        return self.process.pid if self.process else None

    # --- the process --------------------------------------------------------------

    def _command(self):
        peer = f"http://127.0.0.1:{self.peer_port}"
        command = [
            ETCD, "--name", "test", "--data-dir", self.data_dir,
            "--listen-client-urls", ",".join([self.endpoint, *(self.endpoint_on(a) for a in self.addresses)]),
            "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"test={peer}", "--initial-cluster-state", "new",
            "--cert-file", self.cert_file, "--key-file", self.key_file,
            "--logger", "zap", "--log-outputs", "stderr",
        ]
        if self.auth_token_ttl is not None:
            command += ["--auth-token-ttl", str(self.auth_token_ttl)]
        return command

    def _environment(self):
        # etcd reads ETCD_* as flags: the caller's environment must not change this one.
        return {key: value for key, value in os.environ.items() if not key.startswith(("ETCD_", "ETCDCTL_"))}

    def start(self):
        """Start etcd on free ports (new ones if another process took them first) and
        return once it answers /health."""
        if not os.path.exists(ETCD):
            pytest.skip(f"{ETCD} is missing (Debian: apt install etcd-server etcd-client)")
        for _attempt in range(5):
            self.client_port, self.peer_port = free_port(), free_port()
            self._spawn()
            try:
                self._wait_ready()
                return self
            except PortTaken:
                continue
        raise AssertionError(f"etcd found no free ports in 5 attempts; its log:\n{self.log()}")

    def _spawn(self):
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self._command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                            env=self._environment())

    def _wait_ready(self):
        def ready():
            if self.process.poll() is not None:
                text = self.log()
                if "address already in use" in text[-4000:]:
                    raise PortTaken()
                raise AssertionError(f"etcd exited with {self.process.returncode}; its log:\n{text}")
            return self.healthy()

        wait.until(ready, what="etcd to answer /health", explain=self.log)

    def healthy(self):
        """Whether etcd answers GET /health with {"health": "true"} now."""
        try:
            status, body = self.request("GET", "/health", timeout=2)
        except (OSError, http.client.HTTPException):
            return False
        return status == 200 and json.loads(body or b"{}").get("health") == "true"

    def request(self, method, path, body=None, headers=None, timeout=5):
        """One HTTPS request to etcd's client port, checked against the CA; return
        (status, body bytes)."""
        context = ssl.create_default_context(cafile=self.ca_file)
        connection = http.client.HTTPSConnection("127.0.0.1", self.client_port, context=context, timeout=timeout)
        try:
            connection.request(method, path, body=None if body is None else json.dumps(body),
                               headers=headers or {})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def log(self):
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as file:
                return file.read()[-20000:]
        except FileNotFoundError:
            return ""

    def kill(self):
        """SIGKILL etcd by its PID and reap it."""
        if self.process and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        if self.process:
            self.process.wait()

    def restart(self):
        """Start etcd again on the same data dir and ports (after `kill`)."""
        self.kill()
        self._spawn()
        try:
            self._wait_ready()
        except PortTaken:
            raise AssertionError(f"etcd could not listen on its ports again: another process took one;"
                                 f" its log:\n{self.log()}") from None

    def stop(self):
        """SIGSTOP etcd: it holds its connections open and answers nothing."""
        os.kill(self.process.pid, signal.SIGSTOP)

    def cont(self):
        """SIGCONT etcd after `stop`."""
        os.kill(self.process.pid, signal.SIGCONT)

    def close(self):
        """End etcd (by its PID) and remove its data dir."""
        self.kill()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *_exc):
        self.close()

    # --- administration through etcdctl, as root ----------------------------------

    def etcdctl(self, *arguments, check=True):
        """Run etcdctl against this etcd (as root once auth is on); return its stdout.
        ETCDCTL_* are unset: etcdctl 3.4 exits when a flag is also set by one."""
        command = [ETCDCTL, "--endpoints", self.endpoint, "--cacert", self.ca_file]
        if self.root_password:
            command += ["--user", f"root:{self.root_password}"]
        result = subprocess.run(command + list(arguments), env=self._environment(),
                                capture_output=True, text=True, timeout=30)
        if check and result.returncode != 0:
            raise AssertionError(f"etcdctl {' '.join(arguments)} failed ({result.returncode}): "
                                 f"{result.stderr}{result.stdout}")
        return result.stdout

    def enable_auth(self):
        """Make user root (role root) with a random password and enable auth, once."""
        if self.root_password:
            return
        password = secrets.token_hex(12)
        self.etcdctl("user", "add", f"root:{password}", "--interactive=false")
        self.etcdctl("user", "grant-role", "root", "root")
        self.etcdctl("auth", "enable")
        self.root_password = password

    def add_user(self, name, password, read_prefixes=(), write_prefixes=()):
        """Add user `name` with a role of the same name that may read each of
        `read_prefixes` and write each of `write_prefixes` (etcd prefix permissions);
        enable auth first if it is not yet."""
        self.enable_auth()
        self.etcdctl("role", "add", name)
        # A second grant on the same prefix replaces the first: both is "readwrite".
        for prefix in dict.fromkeys(list(read_prefixes) + list(write_prefixes)):
            permission = {(True, False): "read", (False, True): "write", (True, True): "readwrite"}[
                (prefix in read_prefixes, prefix in write_prefixes)]
            self.etcdctl("role", "grant-permission", name, permission, prefix, "--prefix=true")
        self.etcdctl("user", "add", f"{name}:{password}", "--interactive=false")
        self.etcdctl("user", "grant-role", name, name)

    def compact(self, revision):
        """Compact etcd's history up to `revision` and wait until it is done."""
        self.etcdctl("compaction", str(revision), "--physical")

    def authenticate(self, user, password):
        """Return a fresh simple token for `user` (POST /v3/auth/authenticate)."""
        status, body = self.request("POST", "/v3/auth/authenticate", {"name": user, "password": password})
        assert status == 200, (status, body)
        return json.loads(body)["token"]

    def token_valid(self, token):
        """Whether etcd accepts `token` for a request now. Careful: a valid simple
        token is given a new life by every use."""
        status, body = self.request("POST", "/v3/kv/range", {"key": base64.b64encode(b"\0").decode()},
                                    headers={"Authorization": token})
        return status != 401

    def wait_for_token_expiry(self, user, password):
        """Wait until etcd has expired every token of this etcd last used before this
        call. Each use of a valid token extends it, so tokens are not polled: probe
        tokens issued now (later than any such use) are each tried once, and the
        first one refused proves that the older ones are gone too (etcd expires them
        on one clock tick)."""
        interval = 0.3
        # Enough probes to outlast a token's life and etcd's 1 s expiry tick.
        batch = int(((self.auth_token_ttl or 300) + 2) / interval) + 1
        probes = []

        def a_probe_refused():
            if not probes:  # a new batch, issued after the call began too: it ages from now
                probes.extend(self.authenticate(user, password) for _ in range(batch))
            return not self.token_valid(probes.pop(0))

        wait.until(a_probe_refused, what="etcd to expire auth tokens", interval=interval)


@pytest.fixture
def etcd_server(tmp_path):
    """A started Etcd of the test's own (import this fixture into a test module),
    ended when the test ends."""
    with Etcd(tmp_path / "etcd") as etcd:
        yield etcd


class PortTaken(Exception):
    """etcd could not bind a port `free_port` returned: another process took it."""
