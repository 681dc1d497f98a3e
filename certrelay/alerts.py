"""Alerts: tell a person of each problem through the rules file's [alert] channels.

The journal of a path unit or a daemon is read by nobody, and Let's Encrypt no longer
mails before expiry: so each problem a batch finds (alarms.Problem: overdue, failed
renewal, certbot stopped, expiry, and a notification kept because an action or
verification failed, or an entry quarantined) alerts once when it appears, at most
once a day while it lasts, and once when it clears ("resolved"). Every mode (cron,
path unit, timer, daemon) runs batches, so every mode alerts.

Channels:  mail     addresses, through the local MTA (exim4, postfix) on localhost:25
           command  argv lists, no shell; the message on stdin, CERTRELAY_ALERT_LEVEL
                    and CERTRELAY_ALERT_SUBJECT in the environment, under the timeout
           apprise  apprise URLs (ntfy, Gotify, Matrix, e-mail...), where installed
           ping     a dead-man's switch URL: GET after a batch that ended well,
                    URL/fail after one that did not (healthchecks.io, Uptime Kuma)

STATE_DIR/alerts.json holds the problems standing ("active": {key: subject, when last
sent}) and the "outbox": a message that a channel could not take stays there, for that
channel, and is sent again by the next batch, so nothing is lost to a mail server that
is down; the batch that could not send says so and exits 1.
"""

import dataclasses
import email.message
import email.utils
import logging
import socket
import time

from certrelay import execute, state

logger = logging.getLogger(__name__)

KEYS = ("mail", "command", "apprise", "ping")
# Mail goes to the local MTA over SMTP on loopback, not through /usr/sbin/sendmail: the
# hardened units forbid what sendmail needs (exim4's and postfix's write their spool
# under /var/spool, read-only there, and change user, with no CAP_SETUID), while
# loopback is allowed; Debian's exim4 and postfix listen there by default.
MTA = ("localhost", 25)
SENDER = "root@localhost"  # qualified: an MTA refuses a bare name over SMTP
# Seconds between connection attempts while nothing listens: the batch may just have
# restarted the MTA (exim4 forks into the background before it listens).
MTA_RESTARTING = (0.25, 0.5, 1.0, 2.0)
EVERY = 86400  # seconds: a standing problem is said again once a day
OUTBOX_LIMIT = 100  # messages: beyond, the oldest are dropped (and that is said)
PING_TIMEOUT = 10.0  # seconds: a ping never holds a batch up longer
KEPT = "kept "  # key prefix of a kept notification's problem: no lineage name has a space


@dataclasses.dataclass(frozen=True)
class Channels:
    """The [alert] table: where alerts go."""

    mail: tuple = ()
    command: tuple = ()  # argv tuples
    apprise: tuple = ()
    ping: str = None

    def names(self):
        """Return the names of the channels set, for the outbox: "mail", "command
        /path ARG...", "apprise URL"... (ping is not a channel of messages)."""
        return ([] if not self.mail else ["mail"]) + ["command " + " ".join(argv) for argv in self.command] \
            + ["apprise " + url for url in self.apprise]

    def problems(self):
        """Return what keeps a channel set here from working on this host, in words."""
        found = []
        if self.mail:
            try:
                socket.create_connection(MTA, timeout=5).close()
            except OSError as error:
                found.append(f"[alert] mail: no mail server answers on {MTA[0]}:{MTA[1]} ({error}): install one"
                             " (apt install exim4-daemon-light, or postfix) or start it")
        if self.apprise:
            try:
                import apprise  # noqa: F401
            except ImportError:
                found.append("[alert] apprise: the apprise library is not installed: apt install apprise")
        return found


@dataclasses.dataclass(frozen=True)
class Message:
    level: str  # "warning", "error", "resolved"
    subject: str
    body: str


def send(channels, message, names, timeout):
    """Send `message` through each channel of `channels` named in `names` (of
    `channels.names()`); return {name: None if sent, else why not}."""
    results = {}
    for name in names:
        kind, _, target = name.partition(" ")
        try:
            if kind == "mail":
                error = send_mail(channels.mail, message, timeout)
            elif kind == "command":
                error = run(next(argv for argv in channels.command if " ".join(argv) == target), message, timeout)
            else:
                error = send_apprise(target, message)
        except Exception as exception:  # a channel's failure never stops a batch  # noqa: BLE001
            error = f"{type(exception).__name__}: {exception}"
        results[name] = error
    return results


def send_mail(addresses, message, timeout):
    """Submit `message` to the local MTA on loopback (see MTA); return None, or why not."""
    import smtplib

    recipients = [address if "@" in address else address + "@localhost" for address in addresses]
    mail = email.message.EmailMessage()
    mail["From"] = SENDER
    mail["To"] = ", ".join(recipients)
    mail["Subject"] = message.subject
    mail["Date"] = email.utils.formatdate(localtime=True)
    mail["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies
    mail["X-Certrelay-Level"] = message.level
    mail.set_content(message.body)
    for pause in (*MTA_RESTARTING, None):
        try:
            with smtplib.SMTP(*MTA, timeout=timeout) as server:
                server.send_message(mail, SENDER, recipients)
            return None
        except ConnectionRefusedError:
            if pause is None:
                return (f"no mail server listens on {MTA[0]}:{MTA[1]}: install one (apt install exim4-daemon-light,"
                        " or postfix), or start it")
            time.sleep(pause)
        except (OSError, smtplib.SMTPException) as error:
            return f"the mail server on {MTA[0]}:{MTA[1]} refused it: {error}"


def run(argv, message, timeout):
    result = execute.run_command(argv, timeout, stdin=message.body.encode("utf-8"), extra_environment={
        "CERTRELAY_ALERT_LEVEL": message.level, "CERTRELAY_ALERT_SUBJECT": message.subject})
    return None if result.ok else result.detail


def send_apprise(url, message):
    try:
        import apprise
    except ImportError:
        return "the apprise library is not installed: apt install apprise"
    sender = apprise.Apprise()
    if not sender.add(url):
        return "apprise does not accept this URL (see its wiki for the service's form)"
    kind = {"warning": apprise.NotifyType.WARNING, "error": apprise.NotifyType.FAILURE}.get(
        message.level, apprise.NotifyType.SUCCESS)
    return None if sender.notify(body=message.body, title=message.subject, notify_type=kind) else \
        "apprise could not deliver it (its log line above says why)"


def ping(url, ok):
    """GET `url` (or URL/fail when not `ok`); return None, or why it failed."""
    import urllib.request

    target = url if ok else url.rstrip("/") + "/fail"
    try:
        with urllib.request.urlopen(urllib.request.Request(target, headers={"User-Agent": "certrelay"}),
                                    timeout=PING_TIMEOUT) as response:
            response.read(1024)
    except (OSError, ValueError) as error:  # urllib's errors are OSErrors
        return f"ping {target}: {error}"
    return None


def kept_problems(kept):
    """Return a Problem for each lineage with a notification kept for retry (`kept`:
    status.json's {entry: {"name", "failed": [{"action", "error"}], "attempts"}})."""
    from certrelay import alarms

    found = {}
    for value in kept.values():
        name = value.get("name", "?")
        lines = "".join(f"\n- {reason.get('action')}: {reason.get('error')}" for reason in value.get("failed", ()))
        found[name] = alarms.Problem(KEPT + name, f"{name}: action or verification failed", (
            f"{name} renewed, but this failed (tried {value.get('attempts')} time(s); each run tries again):{lines}"))
    return list(found.values())


def quarantine_events(said):
    """Return a Problem, said once, for each entry the spool quarantined (`said`: its log lines)."""
    from certrelay import alarms

    return [alarms.Problem("quarantined", "a notification was quarantined", f"{line}") for line in said]


def subject(words):
    return f"certrelay on {socket.gethostname()}: {words}"


class Alerter:
    """The alert state of one state dir under one [alert] table."""

    def __init__(self, channels, state_dir, timeout):
        self.channels, self.timeout = channels, timeout
        self.store = state.Store(state_dir, "alerts.json")
        data = self.store.data
        if not isinstance(data.get("active"), dict) or not isinstance(data.get("outbox"), list):
            data.update(active={}, outbox=[])
        # Written by certrelay alone, but a hand-edited entry must not stop every batch.
        data["active"] = {key: said for key, said in data["active"].items() if isinstance(said, dict)}
        data["outbox"] = [entry for entry in data["outbox"] if isinstance(entry, dict)]

    @property
    def quiet(self):
        """True if no problem stands and nothing waits to be sent."""
        return not (self.store.data["active"] or self.store.data["outbox"])

    def update(self, problems, events, now, ok):
        """Queue what changed since the last batch: the Problems of `problems` that
        appeared or were last said a day ago, "resolved" for those gone; each Problem of
        `events` (said once, never resolved); then send the outbox and ping (`ok`: the
        batch ended well). Return the number of messages not sent through every channel."""
        active, outbox = self.store.data["active"], self.store.data["outbox"]
        names = self.channels.names()
        standing = {problem.key: problem for problem in problems}
        for key in sorted(set(active) - set(standing)):
            words = str(active.pop(key).get("subject", key))
            outbox.append(self.message("resolved", "resolved: " + words,
                                       f"Resolved by {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(now))}:"
                                       f" {words}.", names))
        for problem in problems:
            said = active.get(problem.key)
            if said and now - said.get("sent", 0) < EVERY and said.get("since", 0) >= problem.since:
                continue
            outbox.append(self.message(problem.level, problem.subject, problem.message, names))
            active[problem.key] = {"subject": problem.subject, "sent": now, "since": problem.since}
        outbox.extend(self.message(event.level, event.subject, event.message, names) for event in events)
        unsent = self.flush()
        if self.channels.ping:
            error = ping(self.channels.ping, ok and not unsent)
            if error:
                logger.warning("%s (certrelay goes on; the monitor will notice the missing ping)", error)
        self.store.save()
        return unsent

    def message(self, level, words, body, names):
        return {"level": level, "subject": subject(words), "body": body + FOOTER, "channels": names}

    def flush(self):
        """Send each message of the outbox through the channels it still lacks; keep
        what failed; return how many messages are still not sent."""
        outbox = self.store.data["outbox"]
        if len(outbox) > OUTBOX_LIMIT:
            logger.error("%d alert(s) could not be sent for too long and are dropped: %s", len(outbox) - OUTBOX_LIMIT,
                         "; ".join(str(message.get("subject")) for message in outbox[:-OUTBOX_LIMIT]))
            del outbox[:-OUTBOX_LIMIT]
        kept, names = [], self.channels.names()
        for entry in outbox:
            try:
                message = Message(entry["level"], entry["subject"], entry["body"])
                channels = [name for name in entry["channels"] if name in names]
            except (KeyError, TypeError):
                logger.warning("dropped an unreadable message from the outbox of %s: %.200r", self.store.path, entry)
                continue
            if len(channels) < len(entry["channels"]):
                logger.warning("alert %r no longer sent through %s: not in [alert] any more", message.subject,
                               ", ".join(sorted(set(entry["channels"]) - set(channels))))
            failed = {name: error for name, error in send(self.channels, message, channels,
                                                          self.timeout).items() if error}
            for name, error in failed.items():
                logger.error("alert %r not sent through %s: %s; kept in %s, sent again by the next run",
                             message.subject, name, error, self.store.path)
            if failed:
                kept.append({**entry, "channels": sorted(failed)})
        self.store.data["outbox"] = kept
        return len(kept)


FOOTER = ("\n\n`certrelay status` shows each certificate, when certbot renews it and what certrelay did;"
          " `journalctl -u 'certrelay*'` (or the cron mail) has the whole log.\n")


def test(channels, timeout):
    """Send a test message through every channel and ping; return {name: None or why not}."""
    message = Message("warning", subject("test alert"), "A test of certrelay's [alert] channels: it reached you."
                      + FOOTER)
    results = send(channels, message, channels.names(), timeout)
    if channels.ping:
        results["ping"] = ping(channels.ping, True)
    return results
