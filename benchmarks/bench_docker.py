"""Docker: from `docker run ... renew` finishing to every endpoint proven current.

The README's cron line is `docker run --rm ... certbot/dns-cloudflare renew --quiet;
certrelay run --quiet`: certbot renews in a container, then certrelay brings the renewal
to the services and proves it on the wire. This measures what the second half costs
against the first: the wall time of `certrelay run` (restart dovecot and exim4, reload
apache2, then verify that all three serve the new certificate; it exits 0 only then)
divided by that of the `docker run ... renew` before it.

Both run in the end-to-end tests' world, reused read-only (tests/e2e/test_docker.py,
`docker_world`): a booted Debian (systemd-nspawn) with apache2 (443), dovecot (993) and
exim4 (465) serving example.test, certrelay installed from its .deb, a real dockerd
in its network namespace, certbot in the test image (tests/e2e/docker_image.py, the
current certbot), Pebble on the Docker bridge. Each round, inside the booted system as
cron runs it (`env -i`, no TTY): the README's `docker run` with `--force-renewal
--cert-name example.test` (the certificate is not due), timed; then `certrelay run
--quiet`, timed; then, not timed, the three services' serials checked over TLS; then,
as the floor, the three systemctl calls certrelay made, by hand. The rules restart
dovecot and exim4 and reload apache2 for example.test, with a `verify` for each
endpoint (and no alert channel).

Needs root, dockerd (docker.io), mmdebstrap, systemd-nspawn, pebble, python3-pytest
(the e2e module imports it); elsewhere the row says "not measured" and why. The image
and the root file system are built on first use (a few minutes), then cached in .cache/.
"""

import statistics
import time

from harness import NOTES, ROWS, Row, progress, seconds, seconds_row

ROUNDS = 7
VALIDITY = 3600  # seconds: no expiry alarm during the run
RULES = """\
[settings]
min-interval = 0

[[rule]]
match = ["example.test"]
restart = ["dovecot", "exim4"]
reload = ["apache2"]
verify = ["https://127.0.0.1:443", "imaps://127.0.0.1:993", "smtps://127.0.0.1:465"]
"""
RENEW = ("docker run --rm -v /etc/letsencrypt:/etc/letsencrypt -v /var/lib/letsencrypt:/var/lib/letsencrypt"
         " certbot/dns-cloudflare renew --force-renewal --cert-name example.test --quiet")
RELAY = "certrelay run --quiet"
#: The floor: what certrelay has systemd do, by hand, nothing verified (after certrelay's run).
FLOOR = "systemctl restart dovecot.service; systemctl restart exim4.service; systemctl reload apache2.service"
VERSION = ("docker run --rm -v /etc/letsencrypt:/etc/letsencrypt -v /var/lib/letsencrypt:/var/lib/letsencrypt"
           " certbot/dns-cloudflare --version")


def load():
    """Return tests.e2e.test_docker, or (None, why it cannot run here)."""
    try:
        from tests.e2e import test_docker
    except ImportError as error:
        return None, f"tests/e2e/test_docker.py cannot be imported: {error} (apt-get install python3-pytest)"
    if test_docker.REASON:
        return None, test_docker.REASON
    return test_docker, None


def run(work):
    test_docker, reason = load()
    if test_docker is None:
        ROWS.append(Row("docker", "`docker run ... renew` done → apache2, dovecot, exim4 proven current",
                        f"not measured: {reason}"))
        return
    progress("docker: the e2e world: booted Debian, dockerd, Pebble, certbot in the test image")
    with test_docker.docker_world(name="certrelay-bench-docker", validity=VALIDITY, log=progress) as world:
        (world.root / "etc" / "certrelay" / "rules.toml").write_text(RULES)
        container = world.container

        def timed(line):
            started = time.monotonic()
            done = container.run([*test_docker.CRON_ENV, "/bin/sh", "-c", line], timeout=300)
            took = time.monotonic() - started
            if done.returncode != 0 or done.stdout + done.stderr:
                raise RuntimeError(f"{line} exited {done.returncode}:\n{(done.stdout + done.stderr)[-2000:]}")
            return took

        renews, relays, floors, starts = [], [], [], []
        for round_number in range(ROUNDS):
            old = world.serial()
            renews.append(timed(RENEW))
            relays.append(timed(RELAY))
            new = world.serial()
            served = world.served()
            if new == old or served != {unit: new for unit in test_docker.SERVICES}:
                raise RuntimeError(f"round {round_number}: live {old} -> {new}, served {served}")
            floors.append(timed(FLOOR))
            progress(f"docker: round {round_number + 1}/{ROUNDS}: docker run ... renew {seconds(renews[-1])},"
                     f" certrelay run {seconds(relays[-1])}, the systemctl calls alone {seconds(floors[-1])}")
        for _ in range(3):
            started = time.monotonic()
            done = container.run([*test_docker.CRON_ENV, "/bin/sh", "-c", VERSION], timeout=120)
            starts.append(time.monotonic() - started)
            if done.returncode != 0:
                raise RuntimeError(f"{VERSION} exited {done.returncode}:\n{done.stdout}{done.stderr}")
        version = done.stdout.strip()

    ours, theirs = statistics.median(relays), statistics.median(renews)
    ROWS.append(seconds_row(
        "docker", "`docker run ... renew` done → apache2, dovecot, exim4 proven current (`certrelay run`: restart,"
        " reload, verify)", ours, "`docker run ... certbot/dns-cloudflare renew` (one certificate, DNS-01)", theirs,
        shown=f"median {seconds(ours)} (min {seconds(min(relays))}, max {seconds(max(relays))})"))
    floor = statistics.median(floors)
    ROWS.append(seconds_row("docker", "the same `certrelay run` against the floor", ours,
                            "the floor: its three systemctl calls by hand (restart dovecot, exim4; reload apache2),"
                            " nothing verified", floor))
    ROWS.append(Row("docker", "reference: `docker run ... certbot/dns-cloudflare --version` (the container and"
                    " certbot starting, nothing renewed)", "", "", f"median {seconds(statistics.median(starts))}"))
    NOTES.append(
        f"docker: {ROUNDS} rounds in the e2e world (tests/e2e/test_docker.py's docker_world: booted Debian 12,"
        f" Debian's docker.io, the test image with {version}, Pebble on the Docker bridge issuing"
        f" {VALIDITY} s certificates), each `{RENEW}` then `{RELAY}` inside the booted system as cron runs them,"
        " then the served serials checked over TLS (not timed). certrelay's figure includes restarting dovecot"
        " and exim4 and reloading apache2 (systemd waits for each), and verifying the three endpoints until they"
        " serve the new certificate; the container's includes starting it, certbot's start-up, the ACME"
        " order with its DNS-01 challenge, and the deploy hooks. The floor: after certrelay's run in each round,"
        f" `{FLOOR}` (sh, as cron would), timed the same way. Medians; min and max of certrelay's."
    )
