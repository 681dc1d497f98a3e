"""A real Docker daemon beside a booted e2e system, Pebble where its containers reach it,
and certbot in the test image.

    daemon = DockerDaemon(root, work_dir).start()   # root: the booted system's tree
    daemon.docker("images")                          # the client, on the daemon's socket
    certbot = CertbotInDocker(daemon, root / "etc/letsencrypt").prepare()   # the image, derived
    acme = PebbleOnBridge(daemon, work_dir, certbot.acme_dir, validity).start()
    certbot.certonly(["example.test", "*.example.test"])
    ...
    acme.stop(); daemon.stop()                       # by PID; the daemon's mounts unmounted

dockerd runs on the host, not in the booted system: it needs overlay2 for its layers,
which does not stack on the overlay the booted system's root is, and cgroup and mount
rights that systemd-nspawn withholds. It runs in a private mount namespace (`unshare
--mount`) in which /etc/letsencrypt and /var/lib/letsencrypt are bind mounts of the
booted system's: bind-mount sources are resolved by the daemon, so the README's `-v
/etc/letsencrypt:/etc/letsencrypt` gives the container the booted system's certificates,
exactly as on a server. The booted system talks to the daemon with Debian's docker client
through /run/docker.sock, a symlink (tmpfiles.d) to the socket the daemon listens on
inside the booted system's tree.

Its network namespace: a new one of its own (`unshare --net`), or, with `network_of=PID`,
that of the booted system (its PID 1): then, as on a server, a port a container publishes
(`-p 8443:443`, through docker-proxy: no iptables here) is on the booted system's
loopback, where certrelay's `verify` connects. Its containers use the default bridge
(172.17.0.1/16, in that network namespace only; no iptables): the README's line has no
`--network host`, so certbot in the container reaches Pebble and pebble-challtestsrv on
the bridge's address, where PebbleOnBridge starts them, in the daemon's network namespace.
"""

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

from . import docker_image, rootfs
from .container import wait_until

DOCKER = "/usr/bin/docker"  # Debian's client (docker.io), the one the booted system gets too
BRIDGE_IP = "172.17.0.1"
#: Where the daemon listens, inside the booted system's tree, and the link to it there.
SOCKET_IN_ROOT = "/var/lib/certrelay-e2e-docker/docker.sock"
TMPFILES = f"L+ /run/docker.sock - - - - {SOCKET_IN_ROOT}\n"
PEBBLE_PORT, PEBBLE_MANAGEMENT_PORT, DNS_PORT, CHALLTESTSRV_PORT = 14000, 15000, 8053, 8055
DIRECTORY_URL = f"https://{BRIDGE_IP}:{PEBBLE_PORT}/dir"
FILES = Path(__file__).resolve().parent / "files"
ACME_HOOKS = rootfs.REPO / "tests" / "acme_hooks"
#: The image's name in the README's cron line, and where certbot's ACME test hooks and
#: Pebble's CA live: in the volume, so that the container reads them.
IMAGE = "certbot/dns-cloudflare"
ACME_DIR = "/etc/letsencrypt/e2e-acme"

# Runs as root in the new mount namespace (and network namespace, unless dockerd joins the
# booted system's), then execs dockerd. Args: the booted system's root, a scratch
# directory for a tmpfs, then dockerd's argv.
NAMESPACE_SCRIPT = r"""
set -eu
root=$1 scratch=$2
shift 2
ip link set lo up
mount -t tmpfs certrelay-dockerd "$scratch"
# Mount points for the volumes, without creating them on the host: overlays of /etc
# and /var/lib whose upper layers are on the tmpfs.
for dir in /etc /var/lib; do
    name=$(echo "$dir" | tr / _)
    if [ ! -d "$dir/letsencrypt" ]; then
        mkdir "$scratch/upper$name" "$scratch/work$name"
        mount -t overlay "certrelay-dockerd$name" \
            -o "lowerdir=$dir,upperdir=$scratch/upper$name,workdir=$scratch/work$name" "$dir"
        mkdir "$dir/letsencrypt"
    fi
    mount --bind "$root$dir/letsencrypt" "$dir/letsencrypt"
done
# dockerd turns on ip_forward (of this network namespace: without it `docker run` warns
# on stderr, which cron would mail). Inside systemd-nspawn (make fresh-check) /proc/sys
# is mounted read-only: make it writable in this mount namespace only.
if [ ! -w /proc/sys/net/ipv4/ip_forward ]; then
    mount -o remount,bind,rw /proc/sys
fi
exec "$@"
"""


def skip_reason():
    """Why a Docker daemon cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (dockerd, unshare --mount --net)"
    for tool in ("/usr/sbin/dockerd", DOCKER, "/usr/sbin/ip"):
        if not os.access(tool, os.X_OK):
            return f"{tool} is missing: apt-get install --no-install-recommends docker.io iproute2"
    return None


def _stop(process, timeout=30):
    """End a process we started, by its PID: SIGTERM, then SIGKILL; reap it."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)


class DockerDaemon:
    """dockerd in a private mount namespace, its volumes resolving into `root`; in a network
    namespace of its own, or in that of process `network_of` (the booted system's PID 1).
    Its images live in WORK_DIR/docker/data, or in `data_root` (kept by the caller between
    runs; never two daemons at once)."""

    def __init__(self, root, work_dir, network_of=None, data_root=None):
        self.root = Path(root)
        self.network_of = network_of
        self.dir = Path(work_dir) / "docker"
        self.socket = self.root / SOCKET_IN_ROOT.lstrip("/")
        self.log_path = self.dir / "dockerd.log"
        self.data_root = Path(data_root) if data_root else self.dir / "data"
        self.process = None

    @property
    def client(self):
        return [DOCKER, "-H", f"unix://{self.socket}"]

    def docker(self, *args, check=True, timeout=300, input=None):
        """Run the client with `args`; return the CompletedProcess (raise if it fails and `check`)."""
        done = subprocess.run([*self.client, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                              input=input, stdin=None if input is not None else subprocess.DEVNULL,
                              env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "DOCKER_BUILDKIT": "0",
                                   "HOME": str(self.dir)})
        if check and done.returncode != 0:
            raise RuntimeError(f"docker {' '.join(map(str, args))} exited with {done.returncode}:\n{done.stdout}{done.stderr}")
        return done

    def log(self, lines=60):
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def start(self, timeout=120):
        """Start dockerd and wait until it answers; return self."""
        for directory in (self.data_root, self.dir / "exec", self.dir / "scratch"):
            directory.mkdir(parents=True, exist_ok=True)
        self.socket.parent.mkdir(parents=True, exist_ok=True)
        for volume in ("etc/letsencrypt", "var/lib/letsencrypt"):
            (self.root / volume).mkdir(parents=True, exist_ok=True)
        tmpfiles = self.root / "etc" / "tmpfiles.d" / "certrelay-e2e-docker.conf"
        tmpfiles.parent.mkdir(parents=True, exist_ok=True)
        tmpfiles.write_text(TMPFILES)
        dockerd = [
            "/usr/sbin/dockerd", "--iptables=false", "--ip6tables=false", "--ip-masq=false",
            f"--bip={BRIDGE_IP}/16", "--data-root", self.data_root, "--exec-root", self.dir / "exec",
            "--pidfile", self.dir / "docker.pid", "-H", f"unix://{self.socket}",
        ]
        if self.network_of is None:
            namespaces = ["unshare", "--mount", "--net", "--propagation", "private"]
        else:  # nsenter -n and unshare without --fork exec: the PID stays dockerd's
            namespaces = ["nsenter", f"--net=/proc/{self.network_of}/ns/net",
                          "unshare", "--mount", "--propagation", "private"]
        argv = [*namespaces, "/bin/sh", "-c", NAMESPACE_SCRIPT, "certrelay-dockerd", self.root, self.dir / "scratch", *dockerd]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})

        def answers():
            if self.process.poll() is not None:
                raise RuntimeError(f"dockerd exited with {self.process.returncode}:\n{self.log()}")
            return self.docker("version", "--format", "{{.Server.Version}}", check=False, timeout=30).returncode == 0

        wait_until(answers, timeout, interval=0.2, what="dockerd to answer", explain=self.log)
        return self

    def nsenter(self):
        """The argv prefix that runs a command in the daemon's network namespace."""
        return ["nsenter", "-t", str(self.process.pid), "-n"]

    def stop(self):
        """Stop dockerd by its PID and unmount what it left below its directories (its
        mounts are in its own mount namespace, which ends with it: this makes sure)."""
        _stop(self.process, timeout=60)
        for point in [*rootfs.mounts_under(self.dir), *rootfs.mounts_under(self.data_root)]:
            done = subprocess.run(["umount", point], capture_output=True)
            if done.returncode != 0:
                subprocess.run(["umount", "--lazy", point], capture_output=True)


def make_tls(directory, ip=BRIDGE_IP):
    """A test CA and a certificate for `ip` signed by it (what Pebble listens with); return ca.pem."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca, ca_key, cert, key, csr, ext = (d / n for n in ("ca.pem", "ca-key.pem", "cert.pem", "key.pem", "cert.csr", "cert.ext"))
    ext.write_text("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                   f"extendedKeyUsage=serverAuth\nsubjectAltName=IP:{ip}\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    for argv in (
        ["openssl", "req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "7",
         "-subj", "/CN=certrelay docker e2e CA for pebble", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ["openssl", "req", *ec, "-keyout", key, "-out", csr, "-subj", f"/CN={ip}"],
        ["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-days", "7", "-extfile", ext, "-out", cert],
    ):
        subprocess.run([str(a) for a in argv], check=True, capture_output=True)
    return ca, cert, key


class PebbleOnBridge:
    """Pebble and pebble-challtestsrv in the daemon's network namespace, on the bridge's address.

    `validity`: Pebble's certificateValidityPeriod in seconds, short so that a plain
    `certbot renew` finds a certificate due after half of it (certbot's policy for
    lifetimes under 10 days). The CA that Pebble's HTTPS chains to goes to `ca_dir`
    (ca.pem), which the container reads (REQUESTS_CA_BUNDLE).
    """

    def __init__(self, daemon, work_dir, ca_dir, validity):
        self.daemon = daemon
        self.dir = Path(work_dir) / "pebble"
        self.ca_dir = Path(ca_dir)
        self.validity = validity
        self.processes = []

    def log(self):
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.dir.glob("*.log")))

    def _start(self, argv, name, env=None):
        with open(self.dir / f"{name}.log", "ab") as log:
            process = subprocess.Popen([*self.daemon.nsenter(), *map(str, argv)], stdin=subprocess.DEVNULL,
                                       stdout=log, stderr=subprocess.STDOUT, env=env)
        self.processes.append(process)
        return process

    def _listening(self, port):
        probe = f"import socket; socket.create_connection(({BRIDGE_IP!r}, {port}), 2).close()"
        done = subprocess.run([*self.daemon.nsenter(), "/usr/bin/python3", "-c", probe], capture_output=True, timeout=30)
        for process in self.processes:
            if process.poll() is not None:
                raise RuntimeError(f"{process.args} exited with {process.returncode}:\n{self.log()}")
        return done.returncode == 0

    def start(self, timeout=60):
        self.dir.mkdir(parents=True, exist_ok=True)
        ca, cert, key = make_tls(self.dir)
        shutil.copyfile(ca, self.ca_dir / "ca.pem")
        config = self.dir / "pebble-config.json"
        config.write_text(json.dumps({"pebble": {
            "listenAddress": f"{BRIDGE_IP}:{PEBBLE_PORT}",
            "managementListenAddress": f"{BRIDGE_IP}:{PEBBLE_MANAGEMENT_PORT}",
            "certificate": str(cert), "privateKey": str(key),
            "httpPort": 5002, "tlsPort": 5001, "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
            "certificateValidityPeriod": self.validity,
        }}, indent=2))
        self._start(["/usr/bin/pebble-challtestsrv", "-dns01", f"{BRIDGE_IP}:{DNS_PORT}",
                     "-management", f"{BRIDGE_IP}:{CHALLTESTSRV_PORT}", "-http01", "", "-https01", "",
                     "-tlsalpn01", ""], "challtestsrv")
        wait_until(lambda: self._listening(CHALLTESTSRV_PORT), timeout, what="pebble-challtestsrv", explain=self.log)
        env = {"PATH": "/usr/bin:/bin", "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_AUTHZREUSE": "0",
               "PEBBLE_WFE_NONCEREJECT": "0"}
        self._start(["/usr/bin/pebble", "-config", config, "-dnsserver", f"{BRIDGE_IP}:{DNS_PORT}"], "pebble", env)
        wait_until(lambda: self._listening(PEBBLE_PORT), timeout, what="pebble", explain=self.log)
        return self

    def stop(self):
        for process in reversed(self.processes):
            _stop(process, timeout=10)


def install_file(source, target, mode=0o755):
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    target.chmod(mode)


class CertbotInDocker:
    """certbot in the test image (docker_image.py), run by `daemon` with the README's volumes.

    `prepare()` puts the ACME test hooks into CONFIG/e2e-acme (in the volume: the
    container runs them under BusyBox), imports the image as `imported`, derives from it
    (no pull) an image that trusts Pebble's CA (REQUESTS_CA_BUNDLE, the ca.pem
    PebbleOnBridge writes there) and tags that `derived` and certbot/dns-cloudflare:latest,
    so that the README's line runs it unchanged.
    """

    def __init__(self, daemon, config_dir, image=None):
        self.daemon = daemon
        self.config = Path(config_dir)
        self.acme_dir = self.config / ACME_DIR.removeprefix("/etc/letsencrypt/")
        self.image = image or docker_image.certbot_image()
        # Tagged with the cached tar's key: a daemon that kept its images from an earlier
        # run (DockerDaemon's data_root) has this one already, or an outdated one.
        version = f"{self.image.name.removeprefix('certbot-')}-{docker_image.cache_key(self.image)}"
        self.imported = f"certrelay-e2e/certbot-imported:{version}"
        self.derived = f"certrelay-e2e/certbot-derived:{version}"
        self.reused = False

    def prepare(self):
        self.acme_dir.mkdir(parents=True, exist_ok=True)
        install_file(FILES / "docker-acme-auth", self.acme_dir / "auth")
        install_file(FILES / "docker-acme-cleanup", self.acme_dir / "cleanup")
        install_file(ACME_HOOKS / "auth-hook", self.acme_dir / "auth-hook")
        install_file(ACME_HOOKS / "cleanup-hook", self.acme_dir / "cleanup-hook")
        self.reused = self.daemon.docker("image", "inspect", self.derived, check=False).returncode == 0
        if not self.reused:
            docker_image.import_image(self.daemon.client, self.imported, image=self.image)
            context = self.daemon.dir / f"derived-{self.image.name}"
            context.mkdir(parents=True, exist_ok=True)
            (context / "Dockerfile").write_text(f"FROM {self.imported}\nENV REQUESTS_CA_BUNDLE={ACME_DIR}/ca.pem\n")
            self.daemon.docker("build", "-q", "-t", self.derived, context)
        self.restore_tag()
        # Outdated imports of this certbot (a kept data root): no use any more.
        stale = [name for name in self.daemon.docker("image", "ls", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
                 if name.startswith(("certrelay-e2e/certbot-imported:", "certrelay-e2e/certbot-derived:"))
                 and name.split(":", 1)[1].startswith(self.image.name.removeprefix("certbot-") + "-")
                 and name not in (self.imported, self.derived)]
        if stale:
            self.daemon.docker("rmi", *stale, check=False)
            self.daemon.docker("image", "prune", "--force", check=False)
        return self

    def restore_tag(self):
        """Tag the derived image certbot/dns-cloudflare:latest (again)."""
        self.daemon.docker("tag", self.derived, f"{IMAGE}:latest")

    def run(self, *args, entrypoint=None, check=False, timeout=300):
        """`docker run --rm` the image with the README's volumes; return the CompletedProcess."""
        argv = ["run", "--rm", "-v", "/etc/letsencrypt:/etc/letsencrypt",
                "-v", "/var/lib/letsencrypt:/var/lib/letsencrypt"]
        if entrypoint:
            argv += ["--entrypoint", entrypoint]
        return self.daemon.docker(*argv, IMAGE, *args, check=check, timeout=timeout)

    def certonly(self, domains, email="x@example.test"):
        """Obtain a certificate for `domains` from Pebble (DNS-01 through challtestsrv)."""
        args = ["certonly", "--manual", "--preferred-challenges", "dns",
                "--manual-auth-hook", f"/bin/sh {ACME_DIR}/auth", "--manual-cleanup-hook", f"/bin/sh {ACME_DIR}/cleanup",
                "--server", DIRECTORY_URL, "--non-interactive", "--agree-tos", "-m", email, "--no-eff-email"]
        for domain in domains:
            args += ["-d", domain]
        return self.run(*args)
