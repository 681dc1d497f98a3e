"""A local ACME world for tests and the demo: Pebble, its DNS server and certbot.

Debian's `pebble` (an ACME server) and `pebble-challtestsrv` (its DNS server for DNS-01)
run on 127.0.0.1 on free ports. certbot from PyPI (in a cached venv) runs "as the
certbot container does": in its own mount namespace with the caller's config dir bound
at /etc/letsencrypt, BusyBox as /bin/sh and no bash, so its deploy hooks run as they
would in the certbot/dns-cloudflare image. Needs root (mount namespaces).

Usage:

    from tests import acme          # or load this file by path
    with acme.acme_server(base_dir) as server:       # base_dir: an existing directory
        server.certonly(config_dir, ["example.test", "*.example.test"])
        acme.install_deploy_hook(config_dir, "certrelay/certrelay-hook")
        result = server.renew(config_dir, fail_domains=["mail.example.test"])
        assert result.returncode == 1          # that lineage failed, the others renewed

Everything the harness writes (Pebble's config and TLS key, logs, certbot's work and log
dirs) goes under `base_dir`; the certificates go under the `config_dir` you pass.
"""

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOOKS = Path(__file__).resolve().parent / "acme_hooks"
DEFAULT_VENV = REPO / ".cache" / "certbot-venv"
#: certbot >= 5.3 runs deploy hooks for a new certonly too; 6 may change what we rely on.
CERTBOT_REQUIREMENT = "certbot>=5.3,<6"
EMAIL = "x@example.test"
#: PATH inside the stand-in container, like the image's (no venvs, no pyenv shims).
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Runs as root in a fresh mount namespace, then execs certbot. Args: CONFIG_DIR SCRATCH
# CERTBOT_ARGV... SCRATCH is an empty directory we may mount a tmpfs on.
CONTAINER_SCRIPT = r"""
set -eu
config=$1 scratch=$2
shift 2
mount -t tmpfs certbot-scratch "$scratch"
if [ ! -d /etc/letsencrypt ]; then
    # A bind mount needs a mount point; make one in an overlay of /etc (upper layer on
    # the tmpfs) rather than creating /etc/letsencrypt on the host.
    mkdir "$scratch/upper" "$scratch/work"
    mount -t overlay certbot-etc -o "lowerdir=/etc,upperdir=$scratch/upper,workdir=$scratch/work" /etc
    mkdir /etc/letsencrypt
fi
mount --bind "$config" /etc/letsencrypt
# Mask bash before replacing sh, so that a /bin/sh -> bash link still ends up BusyBox.
for bash in /usr/bin/bash /bin/bash; do
    if [ -e "$bash" ] && ! mountpoint -q "$(readlink -f "$bash")"; then
        mount --bind /dev/null "$(readlink -f "$bash")"
    fi
done
# /bin/sh is a symlink (to dash on Debian): this binds BusyBox over its target, and
# BusyBox, called as "sh", is ash.
mount --bind /bin/busybox /bin/sh
exec "$@"
"""


def skip_reason():
    """Return why this harness cannot run here (a string), or None if it can.

    For `pytest.skip(reason)`: it needs root (mount namespaces), pebble,
    pebble-challtestsrv, /bin/busybox, unshare, openssl, and /usr/bin/python3 (for the venv).
    """
    if os.geteuid() != 0:
        return "needs root: certbot runs in its own mount namespace (unshare -m, mount --bind)"
    for tool in ("/usr/bin/pebble", "/usr/bin/pebble-challtestsrv", "/bin/busybox"):
        if not os.access(tool, os.X_OK):
            return f"{tool} is missing: apt-get install pebble busybox-static"
    for tool in ("unshare", "mount", "mountpoint", "openssl"):
        if not shutil.which(tool):
            return f"{tool} is not on PATH: apt-get install util-linux mount openssl"
    return None


def ensure_certbot(venv=DEFAULT_VENV, python="/usr/bin/python3", requirement=CERTBOT_REQUIREMENT):
    """Return the path of a certbot executable from PyPI, installing it once into `venv`.

    In: the venv directory (default REPO/.cache/certbot-venv, gitignored), the Python to
    create it with, the pip requirement. A venv finished earlier is reused (marker file
    `.certrelay-complete`); a half-made one is removed and made again. A lock file beside
    the venv keeps parallel callers from building it twice. Raises RuntimeError with pip's
    output if the install fails.
    """
    venv = Path(venv)
    certbot = venv / "bin" / "certbot"
    marker = venv / ".certrelay-complete"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(str(venv) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists() and certbot.exists():
            return certbot
        shutil.rmtree(venv, ignore_errors=True)
        for argv in (
            [python, "-m", "venv", str(venv)],
            [str(venv / "bin" / "pip"), "install", "--disable-pip-version-check", "-q", requirement],
        ):
            done = subprocess.run(argv, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stdout}{done.stderr}")
        marker.write_text(requirement + "\n")
    return certbot


def certbot_version(certbot):
    """Return certbot's version string, e.g. '5.8.0', from `certbot --version`."""
    out = subprocess.run([str(certbot), "--version"], capture_output=True, text=True, check=True)
    return (out.stdout + out.stderr).split()[-1]


def free_ports(count):
    """Return `count` distinct ports free on 127.0.0.1 for both TCP and UDP (DNS needs both).

    The sockets stay bound until all are chosen, so no port is handed out twice; a server
    started right after may still lose a race for one, and then fails to start (loudly).
    """
    held, ports = [], []
    try:
        while len(ports) < count:
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(tcp)
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            held.append(udp)
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            ports.append(port)
    finally:
        for sock in held:
            sock.close()
    return ports


def make_tls(directory):
    """Make a test CA and a certificate for 127.0.0.1 signed by it, for Pebble to listen with.

    In: an existing directory. Out: (ca.pem, cert.pem, key.pem) paths in it. The CA is what
    clients trust (REQUESTS_CA_BUNDLE); Debian's pebble ships no test certificates.
    """
    d = Path(directory)
    ca, ca_key, cert, key, csr = (d / n for n in ("ca.pem", "ca-key.pem", "cert.pem", "key.pem", "cert.csr"))
    ext = d / "cert.ext"
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n"
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    for argv in (
        ["openssl", "req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "7",
         "-subj", "/CN=certrelay test CA for pebble",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ["openssl", "req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        ["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-days", "7", "-extfile", ext, "-out", cert],
    ):
        subprocess.run([str(a) for a in argv], check=True, capture_output=True)
    return ca, cert, key


def _start(argv, log_path, env=None):
    """Start a server process with its output in `log_path`; return the Popen."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)


def _stop(process):
    """End a server we started, by its PID: SIGTERM, then SIGKILL after 5 s; reap it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_until(ready, process, log_path, what, timeout=15.0):
    """Poll `ready()` until true; raise RuntimeError with the log if `process` dies or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{Path(log_path).read_text()}")
        try:
            if ready():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout:g} s:\n{Path(log_path).read_text()}")
        time.sleep(0.05)


@dataclasses.dataclass
class AcmeServer:
    """A running Pebble + challtestsrv, and certbot set up to use them.

    Fields: base_dir (everything the harness writes), directory_url (ACME directory),
    ca_bundle (the CA Pebble's HTTPS certificate chains to), challtestsrv_url (its
    management API), dns_port, certbot (executable), pebble_pid, challtestsrv_pid.
    """

    base_dir: Path
    directory_url: str
    ca_bundle: Path
    challtestsrv_url: str
    dns_port: int
    certbot: Path
    pebble_pid: int = 0
    challtestsrv_pid: int = 0

    def run_certbot(self, config_dir, args, env=None, timeout=300):
        """Run `certbot ARGS` as the container would; return the CompletedProcess.

        In: config_dir (host directory, seen by certbot as /etc/letsencrypt; made if
        missing), certbot arguments after the common ones (--config-dir, --work-dir,
        --logs-dir, --server, --non-interactive, --agree-tos, -m), extra environment.
        Out: CompletedProcess with text stdout/stderr; never raises for certbot's exit code.
        """
        config_dir = Path(config_dir).resolve()
        config_dir.mkdir(parents=True, exist_ok=True)
        work, logs, scratch = (self.base_dir / "certbot" / n for n in ("work", "logs", "scratch"))
        for d in (work, logs, scratch):
            d.mkdir(parents=True, exist_ok=True)
        # A small, container-like environment: nothing from the caller's venv or pyenv leaks
        # into the hooks. The hooks read ACME_* ; certbot reads REQUESTS_CA_BUNDLE.
        environment = {
            "PATH": CONTAINER_PATH,
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "REQUESTS_CA_BUNDLE": str(self.ca_bundle),
            "ACME_CHALLTESTSRV": self.challtestsrv_url,
            **(env or {}),
        }
        argv = [
            "unshare", "--mount", "--propagation", "private",
            "/bin/sh", "-c", CONTAINER_SCRIPT, "certbot-container", str(config_dir), str(scratch),
            str(self.certbot),
            *args,
            "--config-dir", "/etc/letsencrypt",
            "--work-dir", str(work),
            "--logs-dir", str(logs),
            "--server", self.directory_url,
            "--non-interactive", "--agree-tos", "-m", EMAIL, "--no-eff-email",
        ]
        return subprocess.run(argv, env=environment, capture_output=True, text=True, timeout=timeout)

    def deactivate_authorizations(self, config_dir):
        """Deactivate the valid authorizations of config_dir's ACME accounts; return their identifiers.

        Pebble hands an account's valid authorization back in a new order now and then
        even with PEBBLE_AUTHZREUSE=0 (1 identifier in 100: see acme_hooks/deactivate_authzs.py);
        the order is then ready without a challenge and the auth hook is never called.
        A deactivated authorization is never reused. Runs acme_hooks/deactivate_authzs.py
        with the certbot venv's Python (certbot's `acme` library); raises RuntimeError
        with its output if it fails.
        """
        python = self.certbot.parent / "python"
        done = subprocess.run(
            [str(python), str(HOOKS / "deactivate_authzs.py"), str(Path(config_dir).resolve()), self.directory_url],
            env={"PATH": CONTAINER_PATH, "LANG": "C.UTF-8", "REQUESTS_CA_BUNDLE": str(self.ca_bundle)},
            capture_output=True, text=True, timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"deactivating authorizations failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        return json.loads(done.stdout)["deactivated"]

    def certonly(self, config_dir, domains, cert_name=None, extra_args=(), env=None):
        """Obtain a certificate by DNS-01 for `domains` into `config_dir`; return the CompletedProcess.

        The lineage is `config_dir/live/NAME`, NAME = cert_name or the first domain. The
        manual hooks used are saved in the renewal conf, so `renew` uses them too. Deploy
        hooks already in config_dir/renewal-hooks/deploy run (certbot >= 5.3).
        Raises RuntimeError with certbot's output if certbot fails.
        """
        args = ["certonly", *manual_dns_args()]
        for domain in domains:
            args += ["-d", domain]
        if cert_name:
            args += ["--cert-name", cert_name]
        done = self.run_certbot(config_dir, [*args, *extra_args], env=env)
        if done.returncode != 0:
            raise RuntimeError(f"certbot certonly {' '.join(domains)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        return done

    def renew(self, config_dir, force=True, cert_names=None, extra_args=(), fail_domains=(), env=None):
        """Run `certbot renew` on `config_dir`; return the CompletedProcess (check returncode).

        In: force (--force-renewal: renew although not due), cert_names (renew only these
        lineages, one certbot run each; default: all, in one run), fail_domains (the auth
        hook refuses these domains, so every lineage holding one fails: certbot renews the
        others, runs their deploy hooks, and exits 1). For a wildcard `*.example.test`,
        certbot names the domain `example.test`.

        Before each certbot run the account's valid authorizations are deactivated
        (`deactivate_authorizations`), so every domain is validated again and the auth
        hook is asked for each: a refused domain always fails.
        """
        args = ["renew", "--no-random-sleep-on-renew"]
        if force:
            args.append("--force-renewal")
        environment = {"ACME_FAIL_DOMAINS": " ".join(fail_domains), **(env or {})}

        def renew_once(more_args):
            self.deactivate_authorizations(config_dir)
            return self.run_certbot(config_dir, [*args, *more_args, *extra_args], env=environment)

        if not cert_names:
            return renew_once([])
        # certbot keeps only the last of several --cert-name options: one run per name,
        # results merged (exit code 1 if any run failed, like one `renew` would).
        runs = [renew_once(["--cert-name", name]) for name in cert_names]
        return subprocess.CompletedProcess(
            [run.args for run in runs],
            max(run.returncode for run in runs),
            "".join(run.stdout for run in runs),
            "".join(run.stderr for run in runs),
        )


def manual_dns_args():
    """Return certbot's arguments for DNS-01 through our challtestsrv hooks.

    The hooks are called through /bin/sh (BusyBox in the namespace): they need no exec bit.
    """
    return [
        "--manual", "--preferred-challenges", "dns",
        "--manual-auth-hook", f"/bin/sh {HOOKS / 'auth-hook'}",
        "--manual-cleanup-hook", f"/bin/sh {HOOKS / 'cleanup-hook'}",
    ]


@contextlib.contextmanager
def acme_server(base_dir, certbot=None):
    """Run Pebble and pebble-challtestsrv on 127.0.0.1 for the `with` block; yield an AcmeServer.

    In: base_dir, an existing directory for the harness's files (pebble/, certbot/, logs);
    certbot executable (default: ensure_certbot()). Both servers are stopped by PID when the
    block ends, on errors too. Raises RuntimeError (with the server's log) if one fails to
    start.
    """
    base_dir = Path(base_dir).resolve()
    certbot = Path(certbot) if certbot else ensure_certbot()
    pebble_dir = base_dir / "pebble"
    pebble_dir.mkdir(parents=True, exist_ok=True)
    ca, cert, key = make_tls(pebble_dir)
    acme_port, management_port, dns_port, chall_port = free_ports(4)
    config = pebble_dir / "pebble-config.json"
    config.write_text(json.dumps({"pebble": {
        "listenAddress": f"127.0.0.1:{acme_port}",
        "managementListenAddress": f"127.0.0.1:{management_port}",
        "certificate": str(cert),
        "privateKey": str(key),
        # Ports Pebble's validator would use for HTTP-01 / TLS-ALPN-01; we use DNS-01 only.
        "httpPort": 5002,
        "tlsPort": 5001,
        "ocspResponderURL": "",
        "externalAccountBindingRequired": False,
    }}, indent=2))
    env = {
        **os.environ,
        "PEBBLE_VA_NOSLEEP": "1",  # validate at once, not after a random 0-15 s
        # Reuse valid authorizations as seldom as Pebble allows; it still does for 1
        # identifier in 100, so renew() also deactivates them (deactivate_authorizations).
        "PEBBLE_AUTHZREUSE": "0",
        "PEBBLE_WFE_NONCEREJECT": "0",  # default rejects 5% of nonces: a source of flaky runs
    }
    processes = []
    try:
        chall_log = base_dir / "challtestsrv.log"
        # Empty addresses turn off the HTTP/TLS challenge servers: they would bind to fixed
        # ports on all interfaces.
        chall = _start([
            "/usr/bin/pebble-challtestsrv",
            "-dns01", f"127.0.0.1:{dns_port}",
            "-management", f"127.0.0.1:{chall_port}",
            "-http01", "", "-https01", "", "-tlsalpn01", "",
        ], chall_log)
        processes.append(chall)
        _wait_until(lambda: _tcp_open(chall_port), chall, chall_log, "pebble-challtestsrv")

        pebble_log = base_dir / "pebble.log"
        pebble = _start(["/usr/bin/pebble", "-config", str(config), "-dnsserver", f"127.0.0.1:{dns_port}"], pebble_log, env)
        processes.append(pebble)
        directory_url = f"https://127.0.0.1:{acme_port}/dir"
        context = ssl.create_default_context(cafile=str(ca))
        _wait_until(
            lambda: urllib.request.urlopen(directory_url, context=context, timeout=2).status == 200,
            pebble, pebble_log, "pebble",
        )
        yield AcmeServer(
            base_dir=base_dir,
            directory_url=directory_url,
            ca_bundle=ca,
            challtestsrv_url=f"http://127.0.0.1:{chall_port}",
            dns_port=dns_port,
            certbot=certbot,
            pebble_pid=pebble.pid,
            challtestsrv_pid=chall.pid,
        )
    finally:
        for process in reversed(processes):
            _stop(process)


def _tcp_open(port):
    """Return True if something accepts TCP connections on 127.0.0.1:`port`."""
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def install_deploy_hook(config_dir, source, name=None):
    """Copy the script `source` into config_dir/renewal-hooks/deploy/ as executable; return its path.

    certbot runs every executable there, in sorted order, after each renewal (and after a
    new certonly since certbot 5.3), as `/bin/sh -c PATH`.
    """
    deploy = Path(config_dir) / "renewal-hooks" / "deploy"
    deploy.mkdir(parents=True, exist_ok=True)
    target = deploy / (name or Path(source).name)
    shutil.copyfile(source, target)
    target.chmod(0o755)
    return target


def cert_serial(config_dir, name):
    """Return the serial (hex string) of config_dir/live/NAME/cert.pem."""
    cert = Path(config_dir) / "live" / name / "cert.pem"
    out = subprocess.run(["openssl", "x509", "-noout", "-serial", "-in", str(cert)],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip().partition("=")[2]


def cert_version(config_dir, name):
    """Return N of the certN.pem that config_dir/live/NAME/cert.pem links to (1 after certonly)."""
    target = os.readlink(Path(config_dir) / "live" / name / "cert.pem")
    return int(Path(target).name.removeprefix("cert").removesuffix(".pem"))


if __name__ == "__main__":
    # Smoke check: python3 tests/acme.py DIR -> obtain and renew a wildcard cert in DIR.
    import tempfile
    base = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(dir="/var/tmp"))
    reason = skip_reason()
    if reason:
        sys.exit(reason)
    started = time.monotonic()
    with acme_server(base) as server:
        print("certbot", certbot_version(server.certbot), "server", server.directory_url)
        server.certonly(base / "le", ["example.test", "*.example.test"])
        print("certonly: serial", cert_serial(base / "le", "example.test"), f"{time.monotonic() - started:.1f} s")
        done = server.renew(base / "le")
        print("renew: exit", done.returncode, "serial", cert_serial(base / "le", "example.test"),
              "cert%d.pem" % cert_version(base / "le", "example.test"), f"{time.monotonic() - started:.1f} s")
