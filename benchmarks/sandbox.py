"""The common setup of the benchmarks: what certrelay runs on, and how it is started.

- `install_certrelay`: a throw-away installation laid out as `make install` does, so
  that a benchmark measures what an admin runs (the wrapper, byte-compiled modules),
  not the work tree.
- `Sandbox`: a certbot config dir, rules, a state dir and a systemctl of the
  benchmark's choice, under one directory; it renews and publishes as certbot and the
  deploy hook do, and runs certrelay on itself.
- `certificates`: real X.509 certificates, so that certrelay fingerprints and parses
  what it would on a real host; made once per run, shared by the benchmarks.
- `NotifySocket` and `start_watch`: `certrelay watch` as systemd starts it, told to
  say READY=1, so that a benchmark starts measuring only once the daemon watches.
- `scale_certificates` and `scale_rules`: the lineages and the 100 rules of a large
  host, shared by the scale and reconcile benchmarks.
"""

import datetime
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

from harness import PROCESSES, PYTHON, REPO, wait_for

FAKE_SYSTEMCTL = REPO / "tests" / "fake_systemctl"


# --- a throw-away certrelay installation ---------------------------------------------


def install_certrelay(root, prefix, compile_=True, python=PYTHON):
    """Lay certrelay out under ROOT+PREFIX as `make install` does (PREFIX/lib/certrelay,
    PREFIX/bin/certrelay with the paths filled in), for the interpreter `python`;
    byte-compile it unless not `compile_`. Return the wrapper's path as seen with ROOT as /."""
    base = Path(str(root) + str(prefix))
    package = base / "lib" / "certrelay"
    package.mkdir(parents=True, exist_ok=True)
    for source in sorted((REPO / "certrelay").glob("*.py")):
        shutil.copy(source, package / source.name)
    shutil.copytree(REPO / "certrelay" / "fleet", package / "fleet", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    if compile_:
        subprocess.run([str(python), "-m", "compileall", "-q", str(package)], check=True)
    wrapper = base / "bin" / "certrelay"
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    text = (REPO / "bin" / "certrelay.in").read_text()
    wrapper.write_text(text.replace("@PYTHON@", str(python)).replace("@PKGLIBDIR@", f"{prefix}/lib"))
    wrapper.chmod(0o755)
    return Path(prefix) / "bin" / "certrelay"


# --- a certbot config dir, rules and a systemctl ------------------------------------


class Sandbox:
    """A certbot config dir, rules, state dir and a bin/ with a systemctl, under `root`.

    `inside` is the path the consumer sees for `root` (a container's path), default
    the same.
    """

    def __init__(self, root, rules, systemctl=FAKE_SYSTEMCTL, inside=None):
        self.root = Path(root)
        self.inside = Path(inside or root)
        self.config_dir = self.root / "letsencrypt"
        self.queue = self.config_dir / "certrelay" / "queue"
        self.tmp = self.config_dir / "certrelay" / "tmp"
        self.claimed = self.config_dir / "certrelay" / "claimed"
        self.rules = self.root / "etc" / "rules.toml"
        self.state_dir = self.root / "state"
        self.bin = self.root / "bin"
        for directory in (self.queue, self.tmp, self.rules.parent, self.bin):
            directory.mkdir(parents=True, exist_ok=True)
        for directory in (self.root, self.rules.parent):
            directory.chmod(0o755)  # certrelay refuses rules a non-root user could change
        self.rules.write_text(rules)
        self.rules.chmod(0o644)
        if systemctl:
            shutil.copy(systemctl, self.bin / "systemctl")
            (self.bin / "systemctl").chmod(0o755)

    def see(self, path):
        """Return `path` (under root) as the consumer sees it."""
        return self.inside / Path(path).relative_to(self.root)

    def arguments(self):
        return ["--config-dir", str(self.see(self.config_dir)), "--rules", str(self.see(self.rules)),
                "--state-dir", str(self.see(self.state_dir))]

    def environment(self, **extra):
        environment = dict(os.environ, PATH=f"{self.bin}:{os.environ.get('PATH', '/usr/bin:/bin')}")
        for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "PYTHONPATH",
                    "CERTRELAY_CONFIG_DIR", "CERTRELAY_RULES", "CERTRELAY_STATE_DIR"):
            environment.pop(key, None)
        environment.update(extra)
        return environment

    def certrelay(self, wrapper, command, *flags, timeout):
        """Run `certrelay COMMAND FLAGS...` (the installed `wrapper`) on this sandbox: its
        dirs and rules, its environment. Return the CompletedProcess, output as text."""
        return subprocess.run([str(wrapper), command, *flags, *self.arguments()], env=self.environment(),
                              capture_output=True, text=True, timeout=timeout)

    def renew(self, name, version=None, pem=None):
        """Do to the files what a certbot renewal does: archive/NAME/certN.pem, new
        content (`pem`, else a new real certificate for NAME), live/NAME/cert.pem a
        relative link to it, and renewal/NAME.conf (as certbot 5 writes it, once)."""
        archive = self.config_dir / "archive" / name
        live = self.config_dir / "live" / name
        archive.mkdir(parents=True, exist_ok=True)
        live.mkdir(parents=True, exist_ok=True)
        version = version or len(os.listdir(archive)) + 1
        if pem is None:  # a distinct certificate each time: certrelay acts on a changed one only
            pem = certificates(self.root / "certificates").pem(f"{name} {version} {time.time_ns()}", [name])
        (archive / f"cert{version}.pem").write_bytes(pem)
        conf = self.config_dir / "renewal" / f"{name}.conf"
        if not conf.exists():
            conf.parent.mkdir(exist_ok=True)
            conf.write_text(f"version = 5.8.0\narchive_dir = {archive}\n\n[renewalparams]\nkey_type = ecdsa\n")
        link = live / "cert.pem"
        if os.path.lexists(link):
            link.unlink()
        os.symlink(f"../../archive/{name}/cert{version}.pem", link)

    def notification(self, name, domains):
        """Return the bytes the deploy hook writes for lineage `name`."""
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        lineage = self.see(self.config_dir / "live" / name)
        return (f"version=1\nname={name}\nlineage={lineage}\ndomains={' '.join(domains)}\ntime={now}\n").encode()

    def publish(self, name, domains):
        """Publish as the hook does: write tmp/NAME.PID, sync it, rename it into the
        queue. Return the wall-clock time (time.time()) taken just before the rename."""
        temporary = self.tmp / f"{name}.{os.getpid()}"
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(descriptor, self.notification(name, domains))
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        started = time.time()
        os.rename(temporary, self.queue / name)
        return started

    def calls(self):
        try:
            return (self.bin / "calls").read_text().splitlines()
        except FileNotFoundError:
            return []


# --- real certificates --------------------------------------------------------------


class Certificates:
    """Real X.509 certificates for benchmark lineages, made once per run and reused.

    `pem(name, domains)` returns a PEM certificate for `domains` (subjectAltName; CN the
    first), each distinct (its own serial), all signed with one EC P-256 key: certrelay
    fingerprints and parses each as it would a Let's Encrypt certificate. Made with
    python3-cryptography; without it, one certificate made by openssl is copied for every
    lineage (and the notes say so). `key_path` is that key, for TLS servers.
    """

    def __init__(self, directory):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.key_path = self.directory / "key.pem"
        self.made = {}
        try:
            from cryptography import x509
            from cryptography.hazmat.primitives import hashes, serialization
            from cryptography.hazmat.primitives.asymmetric import ec
        except ImportError:
            self.how = "one certificate made by openssl, copied for every lineage (no python3-cryptography)"
            certificate = self.directory / "cert.pem"
            subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                            "-nodes", "-keyout", str(self.key_path), "-out", str(certificate), "-days", "90",
                            "-subj", "/CN=bench.example"], check=True, capture_output=True)
            self.shared = certificate.read_bytes()
            return
        self.how = "a distinct certificate per lineage (python3-cryptography, EC P-256, 90 days)"
        self.shared = None
        self.x509, self.hashes, self.serialization = x509, hashes, serialization
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.key_path.write_bytes(self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
        self.issuer = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "certrelay bench CA")])
        self.now = datetime.datetime.now(datetime.timezone.utc)

    def pem(self, name, domains):
        if self.shared is not None:
            return self.shared
        if name not in self.made:
            x509 = self.x509
            sans = x509.SubjectAlternativeName([x509.DNSName(domain) for domain in domains])
            certificate = (
                x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, domains[0])]))
                .issuer_name(self.issuer).public_key(self.key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(self.now - datetime.timedelta(days=1))
                .not_valid_after(self.now + datetime.timedelta(days=89))
                .add_extension(sans, critical=False)
                .sign(self.key, self.hashes.SHA256())
            )
            self.made[name] = certificate.public_bytes(self.serialization.Encoding.PEM)
        return self.made[name]


CERTIFICATES = {}  # the one Certificates of this run, made on first need


def certificates(base):
    if "pool" not in CERTIFICATES:
        CERTIFICATES["pool"] = Certificates(base)
    return CERTIFICATES["pool"]


# --- certrelay watch as systemd starts it -------------------------------------------


class NotifySocket:
    """An AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET.

    A thread keeps reading it, as systemd does: unread, its queue fills up after a few
    messages and the daemon's next sd_notify blocks."""

    def __init__(self, path):
        self.path = str(path)
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(self.path)
        self.socket.settimeout(0.1)
        self.messages = []  # (monotonic time, text)
        self.closing = threading.Event()
        self.reader = threading.Thread(target=self._read, name="notify-socket", daemon=True)
        self.reader.start()

    def _read(self):
        while not self.closing.is_set():
            try:
                data = self.socket.recv(4096)
            except (socket.timeout, BlockingIOError):
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode("utf-8", "replace")))

    def count(self, word, since=None):
        return sum(word in text.split("\n") for moment, text in list(self.messages) if since is None or moment >= since)

    def wait_for(self, word, timeout):
        wait_for(lambda: self.count(word) > 0, timeout, f"{word} on the notify socket", 0.01)

    def close(self):
        self.closing.set()
        self.reader.join()
        self.socket.close()


def start_watch(wrapper, sandbox, notify, log, **environment):
    """Start `certrelay watch` on `sandbox` (`wrapper`: the installed certrelay) with
    `notify` as its NOTIFY_SOCKET and `environment` added, its log (stderr) to the file `log`;
    return the process once it said READY=1."""
    with open(log, "wb") as output:
        process = PROCESSES.start([str(wrapper), "watch", *sandbox.arguments()],
                                  env=sandbox.environment(NOTIFY_SOCKET=notify.path, **environment),
                                  stdout=subprocess.DEVNULL, stderr=output)
    notify.wait_for("READY=1", 30)
    return process


# --- the lineages and rules of a large host ------------------------------------------

SCALE_UNITS = (
    "apache2", "nginx", "haproxy", "dovecot", "exim4", "postfix", "prosody", "ejabberd", "coturn",
    "mosquitto", "slapd", "vsftpd", "proftpd", "squid", "gitea", "grafana-server", "keycloak",
    "mumble-server", "znc", "inspircd",
)


def scale_certificates(count):
    """Return [(name, domains)]: names in 50 groups; some have a mail host or a wildcard."""
    certificates = []
    for index in range(count):
        group = index % 50
        name = f"n{index:05d}.g{group:02d}.example"
        domains = [name, f"www.{name}"]
        if index % 3 == 0:
            domains.append(f"mail.g{group:02d}.example")
        if index % 7 == 0:
            domains.append(f"*.{name}")
        certificates.append((name, domains))
    return certificates


def scale_rules(count=100):
    """Return `count` (at most 100) rules over up to 20 units: a catch-all, lineage-name
    globs, mail-host domains, domain globs, one rule naming a wildcard certificate's domain;
    all three verbs. Fewer than 100 takes an even spread of the 100, the catch-all first."""
    blocks = [['match = ["*"]', 'reload = ["apache2"]']]
    for group in range(1, 50):  # 49 rules: one unit per group of lineage names
        verb = "restart" if group % 5 == 0 else "reload"
        blocks.append([f'match = ["n*.g{group:02d}.example"]', f'{verb} = ["{SCALE_UNITS[1 + group % 19]}"]'])
    for group in range(25):  # 25 rules: the mail host's domain
        units = '"dovecot", "exim4"' if group % 2 == 0 else '"postfix"'
        blocks.append([f'domains = ["mail.g{group:02d}.example"]', f"restart = [{units}]"])
    for last in range(0, 96, 4):  # 24 rules: a domain glob on the last two digits
        blocks.append([f'domains = ["*{last:02d}.g*.example"]', f'reload-or-restart = ["{SCALE_UNITS[10 + last % 10]}"]'])
    blocks.append(['match = ["n0000*"]', 'domains = ["*.n09996.g46.example"]', 'reload-or-restart = ["haproxy"]'])
    assert len(blocks) == 100
    chosen = [blocks[index * len(blocks) // count] for index in range(count)]
    lines = ["[settings]", "min-interval = 0", ""]
    for block in chosen:
        lines += ["[[rule]]", *block, ""]
    return "\n".join(lines)
