"""What an install is: a `[[rule.install]]` table of the rules file, validated, and the
checks of its destination.

Services that drop root cannot read /etc/letsencrypt (live/ and archive/ are 0700,
keys 0600), so certrelay, root on the host, installs copies: a combined PEM for
haproxy, a key owned by postgres, a PKCS#12 keystore for Java. Each `[[rule.install]]`
table becomes an `Install`; deliver.py writes it. Destinations are refused below any
directory that someone other than root could change (a symlink swapped in there would
make root write wherever that user wants).
"""

import dataclasses
import grp
import os
import pwd
import re
import stat

from certrelay import files, placeholders

PARTS = ("cert", "chain", "fullchain", "privkey")
FORMATS = ("pem", "der", "pkcs12")
KEYS = {"dest", "content", "format", "owner", "group", "mode", "password-file", "create-dirs"}
MODE_TEXT = re.compile(r"[0-7]{3,4}")


@dataclasses.dataclass(frozen=True)
class Install:
    """One `[[rule.install]]`: which parts of a lineage go where, in which format, with
    which owner, group and mode (None: keep the existing file's, else the default).

    pem writes the `content` parts in order; der the leaf certificate; pkcs12 always
    the key, the leaf and the chain, whatever `content` says.
    """

    line: int  # line of its [[rule.install]] header, for messages
    dest: str  # template with {name}, {lineage}, {domains}
    content: tuple
    format: str = "pem"
    owner: str | None = None
    group: str | None = None
    mode: int | None = None
    password_file: str | None = None
    create_dirs: bool = False

    @property
    def holds_key(self):
        """True if the delivered file contains the private key."""
        return "privkey" in self.content or self.format == "pkcs12"

    @property
    def sources(self):
        """The parts read from live/NAME/, in PARTS order: those delivered, those the
        format needs, and cert.pem whenever the key is checked against it."""
        needed = set(self.content)
        if self.format == "der":
            needed = {"cert"}
        elif self.format == "pkcs12":
            needed = {"cert", "chain", "privkey"}
        if "privkey" in needed and not needed & {"cert", "fullchain"}:
            needed.add("cert")
        return tuple(part for part in PARTS if part in needed)

    def destination(self, values):
        """Return the destination path for the placeholder `values` {name, lineage, domains}."""
        return self.dest.format(**values)

    def describe(self, values):
        """Return e.g. "install fullchain+privkey to /etc/haproxy/certs/example.org.pem
        (root:haproxy 0640)", naming only the owner, group and mode the install sets."""
        what = "+".join(self.content) + ("" if self.format == "pem" else f" as {self.format}")
        if self.owner and self.group:
            settings = f"{self.owner}:{self.group}" + ("" if self.mode is None else f" {self.mode:04o}")
        else:
            mode = None if self.mode is None else f"{self.mode:04o}"
            named = (("owner", self.owner), ("group", self.group), ("mode", mode))
            settings = ", ".join(f"{word} {value}" for word, value in named if value)
        suffix = f" ({settings})" if settings else ""
        return f"install {what} to {self.destination(values)}{suffix}"


# ---------------------------------------------------------------------------------
# Parsing a [[rule.install]] table


def parse_install(table, line, key_line, problem, config_dir):
    """Validate one `[[rule.install]]` table (the dict tomllib gave) whose header is on
    `line`; return an `Install`, or None if anything is wrong.

    `key_line(key)` gives the line of a key; `problem(line, message)` reports a problem
    (the caller prefixes the file name). Every problem is reported, not just the first.
    `config_dir` is the certbot config dir, which no destination may be inside.
    """
    found = []

    def report(where, message):
        found.append(message)
        problem(where, message)

    if not isinstance(table, dict):
        report(line, "'install' must be written as [[rule.install]] tables below a [[rule]]")
        return None
    for key in table:
        if key not in KEYS:
            known = ", ".join(sorted(KEYS))
            report(key_line(key), f"unknown key {key!r} in [[rule.install]]; known: {known}")
    values = {
        "dest": parse_dest(table, line, key_line, report, config_dir),
        "content": parse_content(table, line, key_line, report),
        "format": parse_format(table, key_line, report),
        "owner": parse_account(table, "owner", key_line, report),
        "group": parse_account(table, "group", key_line, report),
        "mode": parse_mode(table, key_line, report),
        "password_file": parse_password_file(table, key_line, report),
        "create_dirs": parse_create_dirs(table, key_line, report),
    }
    check_combination(table, values, key_line, report)
    if found:
        return None
    return Install(line=line, **values)


def parse_dest(table, line, key_line, report, config_dir):
    """Return the `dest` template, or None after reporting what is wrong with it."""
    example = 'dest = "/etc/haproxy/certs/{name}.pem"'
    if "dest" not in table:
        report(line, f"[[rule.install]] has no dest: add the file to write, like {example}")
        return None
    dest, where = table["dest"], key_line("dest")
    if not isinstance(dest, str) or not dest:
        report(where, f"'dest' must be a non-empty string, like {example}")
        return None
    reason = placeholders.problem(dest)
    if reason:
        report(
            where,
            f"dest {dest!r} has {reason}; use {{name}}, {{lineage}} or {{domains}}, and {{{{ }}}} for literal braces",
        )
    if not dest.startswith("/"):
        report(where, f"dest {dest!r} must be an absolute path, like {example}")
    elif ".." in dest.split("/"):
        report(where, f"dest {dest!r} must not have a '..' component; write the path it means")
    elif dest.endswith("/"):
        report(where, f"dest {dest!r} names a directory; name the file to write, like {example}")
    elif config_dir is not None and files.is_inside(fixed_part(dest), config_dir):
        report(
            where,
            f"dest {dest!r} is inside the certbot config dir {config_dir}, which the container"
            " can write; deliver outside it, e.g. below /etc/ssl/private or the daemon's own directory",
        )
    return dest


def fixed_part(dest):
    """Return the part of the template `dest` that no placeholder can change: all of it
    without placeholders, else the directories before the first one."""
    brace = dest.find("{")
    return dest if brace < 0 else dest[: dest.rfind("/", 0, brace) + 1] or "/"


def parse_content(table, line, key_line, report):
    """Return `content` as a tuple of parts, or None after reporting what is wrong."""
    example = 'content = ["fullchain", "privkey"]'
    if "content" not in table:
        report(line, f"[[rule.install]] has no content: list the parts to write, like {example}")
        return None
    content, where = table["content"], key_line("content")
    if not isinstance(content, list) or not content or not all(isinstance(part, str) for part in content):
        report(where, f"'content' must be a non-empty list of part names ({', '.join(PARTS)}), like {example}")
        return None
    unknown = [part for part in content if part not in PARTS]
    if unknown:
        shown = ", ".join(map(repr, unknown))
        report(where, f"unknown part(s) {shown} in content; known: {', '.join(PARTS)}")
        return None
    wanted = [part for part in PARTS if part in content]
    if content != wanted:
        report(
            where,
            f"content parts must be in the order {', '.join(PARTS)}, each once (daemons expect the"
            f" certificate first): write content = {format_list(wanted)}",
        )
    return tuple(content)


def format_list(items):
    """Return a TOML list of strings, e.g. ["cert", "privkey"]."""
    return "[" + ", ".join(f'"{item}"' for item in items) + "]"


def parse_format(table, key_line, report):
    """Return `format` ("pem" unless given), or None after reporting it."""
    value = table.get("format", "pem")
    if value not in FORMATS:
        report(key_line("format"), f"format {value!r} is not one of {', '.join(map(repr, FORMATS))}")
        return None
    return value


def parse_account(table, key, key_line, report):
    """Return the `owner` or `group` name (`key`), or None if absent or after reporting
    a name this host does not know."""
    if key not in table:
        return None
    value, where = table[key], key_line(key)
    if not isinstance(value, str) or not value:
        word = "user" if key == "owner" else "group"
        report(where, f"{key!r} must be a {word} name string, like {key} = \"root\"")
        return None
    if key == "owner" and user_id(value) is None:
        report(where, f"unknown user {value!r} (not in the password database); create it or fix 'owner'")
    if key == "group" and group_id(value) is None:
        report(where, f"unknown group {value!r} (not in the group database); create it or fix 'group'")
    return value


def user_id(name):
    """Return the uid of the user `name`, or None if there is no such user."""
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def group_id(name):
    """Return the gid of the group `name`, or None if there is no such group."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def parse_mode(table, key_line, report):
    """Return `mode` as an int, or None if absent or after reporting it."""
    if "mode" not in table:
        return None
    value, where = table["mode"], key_line("mode")
    if not isinstance(value, str) or not MODE_TEXT.fullmatch(value):
        shown = f"; a TOML number like {value} would be read as decimal" if isinstance(value, int) else ""
        report(where, f"'mode' must be a string of 3 or 4 octal digits, like mode = \"0640\"{shown}")
        return None
    mode = int(value, 8)
    if mode & ~0o777:
        report(where, f"mode {value!r} sets setuid, setgid or sticky bits, which no certificate file needs")
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        report(where, f"mode {value!r} lets group or others write the file; use e.g. \"0640\" or \"0644\"")
    return mode


def parse_password_file(table, key_line, report):
    """Return `password-file`, or None if absent or after reporting it."""
    if "password-file" not in table:
        return None
    value, where = table["password-file"], key_line("password-file")
    if not isinstance(value, str) or not value.startswith("/"):
        report(where, "'password-file' must be an absolute path, like \"/etc/certrelay/keystore.pass\"")
        return None
    return value


def parse_create_dirs(table, key_line, report):
    """Return `create-dirs` (False unless given), or False after reporting it."""
    value = table.get("create-dirs", False)
    if not isinstance(value, bool):
        report(key_line("create-dirs"), "'create-dirs' must be true or false")
        return False
    return value


def check_combination(table, values, key_line, report):
    """Report what is wrong only in combination: format and content, format and
    password file, a key file readable by others."""
    content, file_format, mode = values["content"], values["format"], values["mode"]
    if file_format == "der" and content is not None and content != ("cert",):
        report(key_line("content"), 'format "der" holds exactly one certificate: write content = ["cert"]')
    if file_format == "pkcs12" and "password-file" not in table:
        report(
            key_line("format"),
            'format "pkcs12" needs a password: add password-file = "/etc/certrelay/keystore.pass"'
            " (a root-owned 0600 file holding the password)",
        )
    if values["password_file"] is not None and file_format not in (None, "pkcs12"):
        report(key_line("password-file"), "'password-file' is used only with format = \"pkcs12\"; remove it")
    holds_key = file_format == "pkcs12" or (content is not None and "privkey" in content)
    if holds_key and mode is not None and mode & stat.S_IROTH:
        report(
            key_line("mode"),
            f"mode {mode:04o} lets everyone read the private key; give the daemon's group read"
            " access instead: group = \"...\", mode = \"0640\"",
        )


# ---------------------------------------------------------------------------------
# Checking a destination


def destination_problems(install, path):
    """Return what is wrong with writing the expanded destination `path` (a list of
    messages, each naming the path and the fix; empty if it is fine).

    The file must be absent or a regular file; its directory must exist (unless
    `install.create_dirs`), and it and every directory above it must be a real
    directory owned by root and writable by nobody else: otherwise another user could
    swap in a symlink and make root write wherever they like.
    """
    if not path.startswith("/") or ".." in path.split("/") or path.endswith("/"):
        return [f"{path}: the destination must be an absolute file path without '..'; fix dest"]
    problems = []
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        problems.append(f"{path}: cannot check the destination: {error.strerror}")
    else:
        if stat.S_ISLNK(info.st_mode):
            problems.append(
                f"{path} is a symbolic link; certrelay replaces only regular files, never what a link"
                f" points at: remove the link (rm {path}) or set dest to the real path"
            )
        elif not stat.S_ISREG(info.st_mode):
            problems.append(not_regular(path, info))
    directory = os.path.dirname(path)
    problems += directory_problems(directory, install.create_dirs)
    return problems


def not_regular(path, info):
    """Return the message for a destination `path` (lstat `info`) that is not a regular file."""
    return f"{path} is a {files.kind(info.st_mode)}, not a regular file; remove it or fix dest"


def directory_problems(directory, create_dirs):
    """Return what is wrong with `directory` and each directory above it (see
    `destination_problems`); missing ones are fine only with `create_dirs`."""
    problems = []
    current = directory
    while True:
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            if not create_dirs:
                problems.append(
                    f"the destination directory {current} does not exist; create it (root-owned, not"
                    f" writable by group or others: mkdir -p {current}) or set create-dirs = true"
                )
                return problems
        except OSError as error:
            problems.append(f"cannot check the directory {current}: {error.strerror}")
        else:
            problems += unsafe_directory(current, info)
        if current == "/":
            return problems
        current = os.path.dirname(current)


def unsafe_directory(directory, info):
    """Return why root must not write below `directory` (whose lstat is `info`)."""
    if stat.S_ISLNK(info.st_mode):
        return [
            f"the directory {directory} is a symbolic link; write dest with the real path"
            f" (realpath {directory}) so that nobody can redirect it"
        ]
    if not stat.S_ISDIR(info.st_mode):
        return [f"{directory} is a {files.kind(info.st_mode)}, not a directory; fix dest"]
    problems = []
    if info.st_uid != 0:
        problems.append(
            f"the directory {directory} is owned by uid {info.st_uid}, not root, so that user could"
            f" redirect what root writes; fix: chown root {directory}, or deliver elsewhere"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        if mode & stat.S_ISVTX:
            problems.append(
                f"the directory {directory} is writable by others (mode {mode:04o}, sticky like /tmp):"
                " anyone could plant a file or link there before root writes; deliver below a"
                " root-owned directory instead"
            )
        else:
            problems.append(
                f"the directory {directory} is writable by group or others (mode {mode:04o}), so they"
                f" could redirect what root writes; fix: chmod go-w {directory}"
            )
    return problems
