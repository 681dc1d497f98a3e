#!/usr/bin/python3
"""Write certrelay(8), in roff, from the click definitions in certrelay/cli.py.

    python3 tools/manpage.py > certrelay.8

Every command and every option comes from the click group, so the page cannot fall
behind the code; the prose around them (description, files, exit status) is here.
Options that most commands share are described once, under COMMON OPTIONS. The date
is SOURCE_DATE_EPOCH's when set (reproducible builds), else today's.
"""

import datetime
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402

from certrelay import __version__, cli  # noqa: E402

DESCRIPTION = """\
certrelay restarts and reloads host services when certbot, running in a container,
renews a certificate. The container shares only `/etc/letsencrypt` with the host: the
deploy hook `certrelay-hook`, run by certbot after each renewal, writes one
notification per certificate into `/etc/letsencrypt/certrelay/queue/`, and certrelay,
on the host, reads them and does what `/etc/certrelay/rules.toml` says for that
certificate: `systemctl restart`, `reload-or-restart` or `reload` of units, and
commands to run (see certrelay-rules(5)).

certrelay runs in one of three ways: from cron after `certbot renew` (`certrelay run`),
started by the path unit `certrelay.path` as soon as a notification lands, or as the
daemon `certrelay-watch.service` (`certrelay watch`). None of the units is enabled
when the package is installed: enable the one you choose.

Each unit gets at most one action per batch, the strongest asked for; a certificate
that did not change since the last action restarts nothing; a failed action is kept
and retried, and a crash loses no notification. Notifications that are not valid are
moved to `quarantine/` and never acted on."""

#: (what `run` says, what it means and where to look first), as in the README.
RENEWAL_FAILS = [
    ("NAME: renewal FAILED in the container at TIME",
     "certbot's post hook recorded an attempt that failed for NAME (certbot 4.2 and later name the failed domains; "
     "with older ones, NAME was due and did not change). Look at the container's output (`docker logs`, the cron "
     "mail) for the DNS-01 or account error, then `certbot renew --cert-name NAME`."),
    ("NAME: renewal OVERDUE: certbot should have renewed it from TIME",
     "Not renewed `overdue-grace` (1 day) after the time certbot's own policy renews it (`renewal/NAME.conf`). "
     "The same; also whether the container runs at all."),
    ("certbot has recorded no renewal attempt since TIME",
     "A lineage has been due for `stopped-after` (2 days) and certbot did not try: the cron line or "
     "`certbot-docker-renew.timer`."),
    ("NAME: the live certificate expires in N days",
     "The last line: below `expiry-warning`. All of the above, now."),
]

FILES = [
    ("/etc/certrelay/rules.toml", "The rules: which certificates restart or reload which units (certrelay-rules(5))."),
    ("/etc/letsencrypt/renewal-hooks/deploy/certrelay-hook",
     "The deploy hook, where certbot runs it; put there by `certrelay install-hook`."),
    ("/usr/share/certrelay/certrelay-hook", "The hook as shipped with this installation."),
    ("/etc/letsencrypt/certrelay/", "The spool: `queue/` (pending notifications), `claimed/` (being processed, or "
     "kept after a failed action), `quarantine/` (entries that were not valid notifications), `tmp/`."),
    ("/var/lib/certrelay/", "The state: the lock, the progress of kept notifications, the certificate last acted on "
     "per lineage, the time of the last action per unit, the record of runs and alarms (`status.json`), the alerts "
     "standing and waiting to be sent (`alerts.json`)."),
    ("certrelay.path, certrelay.service, certrelay-retry.timer",
     "Run `certrelay run` when the queue is not empty, and every 15 minutes to retry kept failures."),
    ("certrelay-watch.service", "The daemon, `certrelay watch` (Type=notify, with a watchdog; "
     "`systemctl reload` rereads the rules after checking them)."),
    ("certbot-docker-renew.service, certbot-docker-renew.timer",
     "`certbot renew` in the certbot/dns-cloudflare container twice a day, then `certrelay run`."),
]

EXIT_STATUS = [
    ("0", "Everything pending was done, or nothing was pending."),
    ("1", "Something was not done: a failed action, a quarantined entry, a notification whose live certificate "
     "cannot be read. It is kept and retried by the next run."),
    ("2", "A usage or configuration error (invalid or unsafe rules, an unusable spool or state dir): "
     "nothing was processed."),
]

SEE_ALSO = ["certrelay-rules(5)", "certbot(1)", "systemctl(1)", "systemd.path(5)", "systemd.timer(5)"]


def escape(text):
    """Escape text for roff and turn `code` into bold."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    text = re.sub(r"`([^`]+)`", r"\\fB\1\\fR", text)
    # A man page reference such as certrelay-rules(5): its name in bold.
    text = re.sub(r"\b([a-z][\w.\\-]*)\((\d)\)", r"\\fB\1\\fR(\2)", text)
    return text


def lines_of(text):
    """Return roff lines for `text`: paragraphs (blank-line separated) become .PP blocks."""
    out = []
    for number, paragraph in enumerate(re.split(r"\n\s*\n", text.strip())):
        paragraph = paragraph.replace("\b\n", "")
        if number:
            out.append(".PP")
        out.append(" ".join(escape(line.strip()) for line in paragraph.splitlines() if line.strip()))
    # A line that starts with . or ' would be a request: guard it.
    return [("\\&" + line) if line[:1] in (".", "'") and not line.startswith((".PP", ".TP", ".B", ".I")) else line
            for line in out]


def metavar(param, ctx):
    try:
        return param.make_metavar(ctx)  # click >= 8.2
    except TypeError:
        return param.make_metavar()


def option_lines(option, ctx):
    """Return the .TP block describing one click option."""
    names = ", ".join(f"\\fB{escape(name)}\\fR" for name in option.opts + option.secondary_opts)
    if not option.is_flag:
        names += f" \\fI{escape(metavar(option, ctx))}\\fR"
    text = escape(" ".join((option.help or "").split()))
    extras = []
    if option.show_default and option.default not in (None, False, ""):
        extras.append(f"Default: \\fB{escape(str(option.default))}\\fR.")
    if option.envvar:
        envvars = [option.envvar] if isinstance(option.envvar, str) else list(option.envvar)
        extras.append("Environment: " + ", ".join(f"\\fB{escape(name)}\\fR" for name in envvars) + ".")
    return [".TP", names, " ".join([text, *extras]).strip()]


def visible_options(command):
    return [param for param in command.params
            if isinstance(param, click.Option) and not param.hidden and param.name != "help"]


def key(option):
    return (tuple(option.opts), option.help)


def named_copy(command, name):
    """Return a copy of `command` named `name` (a group's command, "fleet keygen")."""
    import copy

    named = copy.copy(command)
    named.name = name
    return named


def manpage(group=cli.main, name="certrelay"):
    ctx = click.Context(group, info_name=name)
    commands = []  # a group's commands as "fleet keygen" etc.: the man page names every command
    for name_of in group.list_commands(ctx):
        command = group.get_command(ctx, name_of)
        if isinstance(command, click.Group):
            sub = click.Context(command, info_name=name_of, parent=ctx)
            commands += [named_copy(command.get_command(sub, inner), f"{name_of} {inner}")
                         for inner in command.list_commands(sub)]
        else:
            commands.append(command)
    commands = [command for command in commands if command is not None and not command.hidden]
    # Options (same names, same help) that more than half of the commands take.
    counts = {}
    for command in commands:
        for option in visible_options(command):
            counts.setdefault(key(option), [option, 0])[1] += 1
    common = [option for option, count in counts.values() if count * 2 > len(commands)]
    common_keys = {key(option) for option in common}

    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", datetime.datetime.now().timestamp()))
    date = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%d")
    summary = escape(" ".join((group.help or "").split()).rstrip(".").lower())
    out = [
        f'.TH CERTRELAY 8 "{date}" "certrelay {__version__}" "System Administration"',
        ".nh",
        ".SH NAME",
        f"certrelay \\- {summary}",
        ".SH SYNOPSIS",
        ".B certrelay",
        ".I command",
        ".RI [ options ]",
        ".br",
        ".B certrelay",
        ".RB [ \\-\\-version | \\-\\-help ]",
        ".SH DESCRIPTION",
        *lines_of(DESCRIPTION),
        ".SH COMMANDS",
    ]
    for command in commands:
        sub_ctx = click.Context(command, info_name=command.name, parent=ctx)
        usage = " ".join(command.collect_usage_pieces(sub_ctx)).replace("[OPTIONS]", "[options]")
        out += [f'.SS "{escape(command.name)} {escape(usage)}"', *lines_of(command.help or "")]
        own = [option for option in visible_options(command) if key(option) not in common_keys]
        takes_common = any(key(option) in common_keys for option in visible_options(command))
        if own:
            out += [".PP", "Options" + (" (and the common options):" if takes_common else ":"), ".RS"]
            for option in own:
                out += option_lines(option, sub_ctx)
            out += [".RE"]
        elif takes_common:
            out += [".PP", "Options: the common options."]
    out += [".SH COMMON OPTIONS", "Taken by every command above that says so."]
    for option in common:
        out += option_lines(option, ctx)
    out += [
        ".TP", "\\fB\\-h\\fR, \\fB\\-\\-help\\fR", "Show the help of certrelay or of one command, and exit.",
        ".TP", "\\fB\\-\\-version\\fR", "Show the version and exit (before the command).",
        ".SH EXIT STATUS",
    ]
    for status, text in EXIT_STATUS:
        out += [".TP", f"\\fB{status}\\fR", escape(text)]
    out += [".SH WHEN RENEWAL FAILS",
            "Each of these is an error on stderr, and \\fBrun\\fR exits 1: at once, then at most once a day; "
            "with an \\fB[alert]\\fR table (certrelay-rules(5)) it is also mailed, paged or pushed, in every "
            "mode, and once more when it is resolved. \\fBcertrelay status\\fR shows when each certificate is "
            "due and whether it is overdue."]
    for said, text in RENEWAL_FAILS:
        out += [".TP", f"\\fB{escape(said)}\\fR", escape(text)]
    out += [".SH FILES"]
    for path, text in FILES:
        out += [".TP", f"\\fI{escape(path)}\\fR", escape(text)]
    out += [
        ".SH EXAMPLES",
        "Check the rules and the setup, then see what a renewal of one certificate would do:",
        ".PP", ".nf", ".RS",
        "certrelay install\\-hook", "certrelay check", "certrelay explain example.org",
        "certrelay run \\-\\-dry\\-run",
        ".RE", ".fi", ".PP",
        "Relay renewals as soon as they land, and retry failures every 15 minutes:",
        ".PP", ".nf", ".RS",
        "systemctl enable \\-\\-now certrelay.path certrelay\\-retry.timer",
        ".RE", ".fi",
        ".SH SEE ALSO",
        ", ".join(escape(page) for page in SEE_ALSO),
        ".PP",
        "/usr/share/doc/certrelay/README.md",
    ]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(manpage())
