"""End to end: a service that runs in a container, reloaded by a certrelay rule and verified.

Issue 19, item 3. The world of test_docker.py (the booted Debian with certrelay, dockerd in
its network namespace, Pebble, certbot in the test image), plus nginx in containers of
the test image docker_image.NGINX (Debian's nginx as PID 1, like the official image),
both serving the lineage example.test on ports they publish on the booted system's
loopback:

    web       -p 8443:443 -v /etc/letsencrypt:/etc/letsencrypt:ro
              the whole directory: live/ and the archive/ its links point into
    web-file  -p 8444:443 -v /etc/letsencrypt/live/example.test/fullchain.pem:/etc/nginx/certs/fullchain.pem:ro
              (and privkey.pem): single files, the trap of dashpay/platform#4421

The rule is read from docs/docker.md, where an admin copies it:
`run = [["/usr/bin/docker", "kill", "--signal=HUP", "web"]]` and `verify` on the
port nginx publishes. SIGHUP to the container's PID 1 is nginx's own reload: the master
rereads its configuration and certificates and replaces its workers, no connection is
dropped, nothing needs a shell or `docker exec` in the image, and a new configuration
that nginx refuses leaves it serving the old one (which `verify` then reports).

Checked: after a renewal in the certbot container, nginx in `web` still serves the old
certificate until certrelay runs the rule; then it serves the new one (on the wire, and
`certrelay verify`), reloaded in place (same container, same PID 1, the SIGHUP in its
log); the same through the hardened certrelay.path unit; `web-file`, reloaded just
the same, keeps serving the OLD certificate, which `certrelay run` and `certrelay verify`
report as old, saying to mount the directory, not the file; a `docker restart` of it
mounts the file anew, once.
"""

import contextlib
import datetime
import re

import pytest

from . import docker_image
from .container import wait_until
from .test_docker import REASON, docker_world
from .test_e2e import FILES, NAME, REPO, spool_entries

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(REASON is not None, reason=REASON or "")]

#: The published ports on the booted system's loopback.
WEB_PORT, WEB_FILE_PORT = 8443, 8444
LIVE = f"/etc/letsencrypt/live/{NAME}"
#: A shorter verify-timeout for the run that is to find the old certificate (30 s by default).
SHORT_VERIFY = 5
WEB_FILE_RULE = f"""
[[rule]]
match = ["{NAME}"]
run = [["/usr/bin/docker", "kill", "--signal=HUP", "web-file"]]
verify = ["https://127.0.0.1:{WEB_FILE_PORT}"]
"""


def docs_rule():
    """The rule for nginx in a container, as docs/docker.md gives it (its one ```toml
    block with `docker kill --signal=HUP`)."""
    text = (REPO / "docs" / "docker.md").read_text()
    blocks = [block for block in re.findall(r"```toml\n(.*?)```", text, re.DOTALL) if '"--signal=HUP"' in block]
    assert len(blocks) == 1, f"docs/docker.md has {len(blocks)} toml blocks with --signal=HUP"
    return blocks[0]


class Services:
    """The DockerWorld and its nginx containers."""

    def __init__(self, world):
        self.world = world
        self.daemon = world.daemon
        self.rules = world.root / "etc" / "certrelay" / "rules.toml"
        self.base_rules = self.rules.read_text()
        self.first = {}  # container name: the serial of the live certificate when it started

    def start(self, name, port, conf, *volumes):
        self.daemon.docker("run", "-d", "--name", name, "-p", f"{port}:443", *volumes,
                           "-v", f"{FILES / conf}:/etc/nginx/conf.d/{name}.conf:ro", docker_image.NGINX.tag)
        self.first[name] = self.world.serial()
        wait_until(lambda: self.serial(port) == self.first[name], 60, what=f"nginx in {name} to serve {NAME}",
                   explain=lambda: self.explain(name))

    def serial(self, port):
        """The serial of the certificate served on the booted system's 127.0.0.1:PORT."""
        return self.world.container.serial_on_port(port)

    def state(self, name):
        """(PID 1 as the host sees it, when the container started): unchanged by a reload."""
        return self.daemon.docker("inspect", "--format", "{{.State.Pid}} {{.State.StartedAt}}", name).stdout.split()

    def reloads(self, name):
        """How often nginx in `name` logged a reload: "signal 1 (SIGHUP) received from PID,
        reconfiguring" (its error log, at notice, goes to the container's stderr)."""
        done = self.daemon.docker("logs", name)
        return (done.stdout + done.stderr).count("(SIGHUP) received")

    def explain(self, *names, extra=""):
        logs = "\n".join(f"--- docker logs {name}\n{self.daemon.docker('logs', name, check=False).stderr[-3000:]}"
                         for name in names)
        return self.world.explain(extra, logs, self.daemon.docker("ps", "--all").stdout)

    @contextlib.contextmanager
    def rules_with(self, extra, verify_timeout=None):
        """The world's rules plus `extra`, in /etc/certrelay/rules.toml, for the block's duration."""
        text = self.base_rules
        if verify_timeout is not None:
            text = text.replace("[settings]\n", f"[settings]\nverify-timeout = {verify_timeout}\n", 1)
        self.rules.write_text(f"{text}\n{extra}")
        try:
            yield
        finally:
            self.rules.write_text(self.base_rules)

    def renew(self):
        """A real renewal of example.test in the certbot container; return (old, new) serials."""
        old = self.world.serial()
        done = self.world.certbot("renew", "--force-renewal", "--cert-name", NAME, "--quiet")
        assert done.returncode == 0, done.stdout + done.stderr
        new = self.world.serial()
        assert new != old
        return old, new


@pytest.fixture(scope="module")
def services():
    """The DockerWorld with `web` and `web-file` serving example.test; removed after."""
    with docker_world(name="certrelay-e2e-docker-services") as world:
        docker_image.import_image(world.daemon.client, image=docker_image.NGINX)
        built = Services(world)
        try:
            built.start("web", WEB_PORT, "docker-nginx-web.conf", "-v", "/etc/letsencrypt:/etc/letsencrypt:ro")
            built.start("web-file", WEB_FILE_PORT, "docker-nginx-web-file.conf",
                        "-v", f"{LIVE}/fullchain.pem:/etc/nginx/certs/fullchain.pem:ro",
                        "-v", f"{LIVE}/privkey.pem:/etc/nginx/certs/privkey.pem:ro")
            yield built
        finally:
            world.daemon.docker("rm", "--force", "web", "web-file", check=False)


def test_docs_rule_is_the_one_tested():
    """The rule docs/docker.md gives is the one these tests run: the HUP to `web`, and
    the endpoint nginx publishes; the README's "certbot in Docker" gives the same."""
    rule = docs_rule()
    assert 'run = [["/usr/bin/docker", "kill", "--signal=HUP", "web"]]' in rule, rule
    assert f'verify = ["https://127.0.0.1:{WEB_PORT}"]' in rule, rule
    assert f'match = ["{NAME}"]' in rule, rule
    assert f"```toml\n{rule}```" in (REPO / "README.md").read_text()


def test_nginx_in_a_container_reloaded_by_the_rule_serves_the_new_certificate(services):
    """A renewal in the certbot container: nginx in `web` (the directory bind-mounted)
    keeps serving the old certificate until `certrelay run` sends the rule's SIGHUP; then
    it serves the new one, on the wire and by `certrelay verify`, reloaded in place: the
    same container and PID 1, one more SIGHUP received in its log."""
    world = services.world
    before, reloads = services.state("web"), services.reloads("web")
    with services.rules_with(docs_rule()):
        old, new = services.renew()
        assert services.serial(WEB_PORT) == old, "nginx changed its certificate before any reload"

        status, output = world.certrelay("run")

        assert status == 0, services.explain("web", extra=output)
        assert f"done: run /usr/bin/docker kill --signal=HUP web ({NAME})" in output, output
        assert f"verified: https://127.0.0.1:{WEB_PORT} (SNI {NAME}) serves the current certificate of {NAME}" in output, output
        assert services.serial(WEB_PORT) == new, services.explain("web", extra=output)
        assert services.state("web") == before, "the container was restarted, not reloaded"
        assert services.reloads("web") == reloads + 1, services.explain("web")
        status, verified = world.certrelay("verify")
        assert status == 0, verified
        assert f"https://127.0.0.1:{WEB_PORT} (SNI {NAME}) serves the current certificate of {NAME}" in verified, verified
    assert spool_entries(world.config) == {"queue": [], "claimed": []}


def test_nginx_rule_through_the_hardened_path_unit(services):
    """The same rule run by certrelay.path's certrelay.service (its sandbox: read-only
    file system, loopback only): the docker client reaches the daemon's socket, nginx
    reloads and serves the new certificate, and the journal says it was verified."""
    world, container = services.world, services.world.container
    since = datetime.datetime.now().timestamp() - 1
    reloads = services.reloads("web")
    with services.rules_with(docs_rule()):
        container.systemctl("enable", "--now", "certrelay.path")
        try:
            _, new = services.renew()
            wait_until(lambda: services.serial(WEB_PORT) == new, 120, what="certrelay.service to reload nginx",
                       explain=lambda: services.explain("web", extra=container.journal("certrelay.service", since=since)))
            verified = f"verified: https://127.0.0.1:{WEB_PORT} (SNI {NAME}) serves the current certificate of {NAME}"
            wait_until(lambda: verified in container.journal("certrelay.service", since=since), 30,
                       what="certrelay.service's journal to say nginx was verified",
                       explain=lambda: container.journal("certrelay.service", since=since))
            assert services.reloads("web") == reloads + 1, services.explain("web")
        finally:
            container.systemctl("disable", "--now", "certrelay.path", check=False)
            container.systemctl("reset-failed", "certrelay.service", "certrelay.path", check=False)


def test_single_file_bind_mount_serves_the_old_certificate_and_certrelay_says_mount_the_directory(services):
    """`web-file` has fullchain.pem and privkey.pem bind-mounted one by one. After a
    renewal the rule reloads it just the same (one more SIGHUP received), yet it serves
    an OLD certificate, the one of the day it started: the mount holds the file the link
    pointed to then. `certrelay run` exits 1 and `certrelay verify` too, each naming the endpoint,
    the certificate as OLD, and the fix: mount the directory, not the file."""
    world = services.world
    reloads = services.reloads("web-file")
    with services.rules_with(WEB_FILE_RULE, verify_timeout=SHORT_VERIFY):
        _, new = services.renew()

        status, output = world.certrelay("run")

        assert status == 1, services.explain("web-file", extra=output)
        assert f"done: run /usr/bin/docker kill --signal=HUP web-file ({NAME})" in output, output
        assert services.reloads("web-file") == reloads + 1, services.explain("web-file")
        # The certificate of the day the container started (older renewals came since).
        assert services.serial(WEB_FILE_PORT) == services.first["web-file"] != new, services.explain("web-file")
        for said in (output, world.certrelay("verify")[1]):
            # Only the verdict: Pebble's certificates live minutes, so on a slow machine the
            # same endpoint may also get an expiry warning line.
            lines = [line for line in said.splitlines() if f"https://127.0.0.1:{WEB_FILE_PORT}" in line
                     and "serves a certificate that expires in" not in line]
            assert len(lines) == 1, said
            assert f"still serves an OLD certificate of {NAME}" in lines[0], lines[0]
            assert "bind-mounted as a single file" in lines[0] and "mount the directory" in lines[0], lines[0]
            assert "-v /etc/letsencrypt:/etc/letsencrypt:ro" in lines[0] and "not the file" in lines[0], lines[0]
        # What the container sees: the file of the day it started, not the live one.
        inside = services.daemon.docker("exec", "web-file", "cat", "/etc/nginx/certs/fullchain.pem").stdout
        assert inside != (world.config / "live" / NAME / "fullchain.pem").read_text()
        # A restart of the container mounts the file anew: the new certificate, until the next renewal.
        services.daemon.docker("restart", "web-file")
        wait_until(lambda: services.serial(WEB_FILE_PORT) == new, 60, what="web-file to serve the new certificate",
                   explain=lambda: services.explain("web-file"))
    # The notification kept by the failed verification is done by the next run.
    status, output = world.certrelay("run")
    assert status == 0, output
    assert spool_entries(world.config) == {"queue": [], "claimed": []}
