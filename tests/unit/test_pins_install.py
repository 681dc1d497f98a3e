"""Pins for certrelay.install that mutation testing (make mutants, docs/mutants.md)
found missing: whole messages where other tests check a fragment, how an install
describes itself, what a destination may be, and when a directory is safe to write
below (checked with made-up stat results, and on the file system as root)."""

import os
import stat

import pytest

from certrelay import install

VALUES = {"name": "example.org", "lineage": "/etc/letsencrypt/live/example.org", "domains": "example.org"}


def problems_of(table, config_dir="/etc/letsencrypt"):
    """Return [message, ...] that parse_install reports for `table` (lines left out)."""
    found = []
    install.parse_install(table, 1, lambda key: 2, lambda line, message: found.append(message), config_dir)
    return found


def a_stat(mode, uid=0):
    """Return an os.stat_result with `mode` and owner `uid`, all else 0."""
    return os.stat_result((mode, 0, 0, 1, uid, 0, 0, 0, 0, 0))


# --- Install.describe ------------------------------------------------------------


@pytest.mark.parametrize(("settings", "shown"), [
    ({"owner": "root", "group": "root"}, " (root:root)"),
    ({"owner": "root", "group": "root", "mode": 0o600}, " (root:root 0600)"),
    ({"owner": "root", "mode": 0o640}, " (owner root, mode 0640)"),
    ({"group": "ssl-cert"}, " (group ssl-cert)"),
    ({"mode": 0o644}, " (mode 0644)"),
    ({}, ""),
])
def test_describe_names_only_what_the_install_sets(settings, shown):
    spec = install.Install(line=1, dest="/etc/ssl/{name}.pem", content=("fullchain", "privkey"), **settings)

    assert spec.describe(VALUES) == f"install fullchain+privkey to /etc/ssl/example.org.pem{shown}"


def test_describe_names_a_format_other_than_pem():
    spec = install.Install(line=1, dest="/srv/{name}.der", content=("cert",), format="der")

    assert spec.describe(VALUES) == "install cert as der to /srv/example.org.der"


# --- parse_install: whole messages ---------------------------------------------------


EXAMPLE_DEST = 'dest = "/etc/haproxy/certs/{name}.pem"'
GOOD = {"dest": "/etc/haproxy/{name}.pem", "content": ["fullchain", "privkey"]}


@pytest.mark.parametrize(("table", "message"), [
    ({"content": ["cert"]}, f"[[rule.install]] has no dest: add the file to write, like {EXAMPLE_DEST}"),
    ({"dest": "", "content": ["cert"]}, f"'dest' must be a non-empty string, like {EXAMPLE_DEST}"),
    ({"dest": "etc/{name}.pem", "content": ["cert"]},
     f"dest 'etc/{{name}}.pem' must be an absolute path, like {EXAMPLE_DEST}"),
    ({"dest": "/etc/letsencrypt/{name}.pem", "content": ["cert"]},
     "dest '/etc/letsencrypt/{name}.pem' is inside the certbot config dir /etc/letsencrypt, which the container"
     " can write; deliver outside it, e.g. below /etc/ssl/private or the daemon's own directory"),
    ({"dest": "/etc/x.pem"},
     '[[rule.install]] has no content: list the parts to write, like content = ["fullchain", "privkey"]'),
    ({"dest": "/etc/x.pem", "content": []},
     "'content' must be a non-empty list of part names (cert, chain, fullchain, privkey),"
     ' like content = ["fullchain", "privkey"]'),
    ({"dest": "/etc/x.pem", "content": ["key", "crt"]},
     "unknown part(s) 'key', 'crt' in content; known: cert, chain, fullchain, privkey"),
    ({**GOOD, "mode": 640},
     "'mode' must be a string of 3 or 4 octal digits, like mode = \"0640\"; a TOML number like 640 would be"
     " read as decimal"),
    ({**GOOD, "mode": "rw-r-----"}, "'mode' must be a string of 3 or 4 octal digits, like mode = \"0640\""),
    ({**GOOD, "password-file": "keystore.pass"},
     "'password-file' must be an absolute path, like \"/etc/certrelay/keystore.pass\""),
    ({**GOOD, "create-dirs": "yes"}, "'create-dirs' must be true or false"),
    ({"dest": "/srv/x.der", "content": ["fullchain"], "format": "der"},
     'format "der" holds exactly one certificate: write content = ["cert"]'),
    ({**GOOD, "format": "pkcs12"},
     'format "pkcs12" needs a password: add password-file = "/etc/certrelay/keystore.pass" (a root-owned 0600'
     " file holding the password)"),
    ({**GOOD, "password-file": "/etc/certrelay/keystore.pass"},
     "'password-file' is used only with format = \"pkcs12\"; remove it"),
    ({**GOOD, "mode": "0644"},
     "mode 0644 lets everyone read the private key; give the daemon's group read access instead:"
     ' group = "...", mode = "0640"'),
])
def test_each_mistake_has_its_whole_message(table, message):
    assert problems_of(table) == [message]


# --- destination_problems ------------------------------------------------------------


@pytest.mark.parametrize("path", ["etc/x.pem", "/etc/../x.pem", "/etc/ssl/"])
def test_a_destination_that_is_not_an_absolute_file_path_is_refused_before_looking(path):
    spec = install.Install(line=1, dest=path, content=("cert",))

    assert install.destination_problems(spec, path) == [
        f"{path}: the destination must be an absolute file path without '..'; fix dest"
    ]


@pytest.mark.skipif(os.geteuid() != 0, reason="owners and modes of directories: as root only")
def test_a_destination_below_a_file_says_what_each_level_is(root):
    below = os.path.join(root, "file")
    open(below, "w").close()
    path = os.path.join(below, "x.pem")
    spec = install.Install(line=1, dest=path, content=("cert",))

    assert install.destination_problems(spec, path) == [
        f"{path}: cannot check the destination: Not a directory",
        f"{below} is a regular file, not a directory; fix dest",
    ]
    assert install.directory_problems(os.path.join(below, "sub"), True) == [
        f"cannot check the directory {below}/sub: Not a directory",
        f"{below} is a regular file, not a directory; fix dest",
    ]


@pytest.mark.skipif(os.geteuid() != 0, reason="owners and modes of directories: as root only")
def test_a_destination_that_is_a_directory_is_named_in_the_message(root):
    path = os.path.join(root, "dest.pem")
    os.mkdir(path)
    spec = install.Install(line=1, dest=path, content=("cert",))

    assert install.destination_problems(spec, path) == [
        f"{path} is a directory, not a regular file; remove it or fix dest"
    ]
    assert install.destination_problems(spec, os.path.join(root, "new.pem")) == []


# --- unsafe_directory ------------------------------------------------------------------


def test_a_root_owned_directory_writable_only_by_root_is_safe():
    for mode in (0o755, 0o700, 0o751, 0o1755):
        assert install.unsafe_directory("/srv/d", a_stat(stat.S_IFDIR | mode)) == []


@pytest.mark.parametrize(("info", "messages"), [
    (a_stat(stat.S_IFDIR | 0o755, uid=1), [
        "the directory /srv/d is owned by uid 1, not root, so that user could redirect what root writes;"
        " fix: chown root /srv/d, or deliver elsewhere"]),
    (a_stat(stat.S_IFDIR | 0o775), [
        "the directory /srv/d is writable by group or others (mode 0775), so they could redirect what root"
        " writes; fix: chmod go-w /srv/d"]),
    (a_stat(stat.S_IFDIR | 0o757), [
        "the directory /srv/d is writable by group or others (mode 0757), so they could redirect what root"
        " writes; fix: chmod go-w /srv/d"]),
    (a_stat(stat.S_IFDIR | 0o1777), [
        "the directory /srv/d is writable by others (mode 1777, sticky like /tmp): anyone could plant a file"
        " or link there before root writes; deliver below a root-owned directory instead"]),
    (a_stat(stat.S_IFDIR | 0o770, uid=1000), [
        "the directory /srv/d is owned by uid 1000, not root, so that user could redirect what root writes;"
        " fix: chown root /srv/d, or deliver elsewhere",
        "the directory /srv/d is writable by group or others (mode 0770), so they could redirect what root"
        " writes; fix: chmod go-w /srv/d"]),
    (a_stat(stat.S_IFREG | 0o644), ["/srv/d is a regular file, not a directory; fix dest"]),
    (a_stat(stat.S_IFIFO | 0o644), ["/srv/d is a FIFO, not a directory; fix dest"]),
    (a_stat(stat.S_IFLNK | 0o777), [
        "the directory /srv/d is a symbolic link; write dest with the real path (realpath /srv/d) so that"
        " nobody can redirect it"]),
])
def test_an_unsafe_directory_is_named_with_its_fix(info, messages):
    assert install.unsafe_directory("/srv/d", info) == messages


@pytest.mark.parametrize(("dest", "fixed"), [
    ("/etc/haproxy/certs/site.pem", "/etc/haproxy/certs/site.pem"),
    ("/etc/{name}/certs/{name}.pem", "/etc/"),
    ("/{name}.pem", "/"),
])
def test_the_fixed_part_of_a_destination_ends_before_its_first_placeholder(dest, fixed):
    assert install.fixed_part(dest) == fixed
