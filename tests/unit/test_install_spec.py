"""Unit tests for certrelay.install.parse_install: the examples parse, and every kind of
mistake is reported with its line and a message that says how to fix it."""

import grp
import os
import pwd

import pytest

from certrelay import install

HEADER_LINE = 10
# Each key on its own line below the header, so that a message's line names its key.
KEY_LINES = {key: HEADER_LINE + 1 + index for index, key in enumerate(sorted(install.KEYS | {"colour"}))}
CONFIG_DIR = "/etc/letsencrypt"
USER = pwd.getpwuid(0).pw_name
GROUP = grp.getgrgid(0).gr_name
VALUES = {"name": "example.org", "lineage": "/etc/letsencrypt/live/example.org", "domains": "example.org"}


def parse(table, config_dir=CONFIG_DIR):
    """Return (Install or None, [(line, message), ...]) for the `[[rule.install]]` `table`."""
    problems = []
    result = install.parse_install(
        table, HEADER_LINE, lambda key: KEY_LINES.get(key, HEADER_LINE),
        lambda line, message: problems.append((line, message)), config_dir,
    )
    assert (result is None) == bool(problems), (result, problems)
    return result, problems


def single_problem(table, config_dir=CONFIG_DIR):
    """Return (line, message) of the one problem `table` has; fail if it has another number."""
    _, problems = parse(table, config_dir)
    assert len(problems) == 1, problems
    return problems[0]


def haproxy(**changes):
    """Return the haproxy example table with `changes` (a value None removes the key)."""
    table = {
        "dest": "/etc/haproxy/certs/{name}.pem", "content": ["fullchain", "privkey"],
        "owner": USER, "group": GROUP, "mode": "0640",
    }
    for key, value in changes.items():
        key = key.replace("_", "-")
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value
    return table


# --- accepted ---------------------------------------------------------------------------


def test_haproxy_example_parses_with_everything_set():
    result, _ = parse(haproxy())

    assert result == install.Install(
        line=HEADER_LINE, dest="/etc/haproxy/certs/{name}.pem", content=("fullchain", "privkey"),
        owner=USER, group=GROUP, mode=0o640,
    )
    assert result.describe(VALUES) == (
        f"install fullchain+privkey to /etc/haproxy/certs/example.org.pem ({USER}:{GROUP} 0640)"
    )


def test_minimal_table_gets_the_defaults():
    result, _ = parse({"dest": "/etc/ssl/certs/{name}.pem", "content": ["cert"]})

    assert result == install.Install(line=HEADER_LINE, dest="/etc/ssl/certs/{name}.pem", content=("cert",))
    assert (result.format, result.owner, result.group, result.mode, result.create_dirs) == ("pem", None, None, None, False)
    assert result.describe(VALUES) == "install cert to /etc/ssl/certs/example.org.pem"


def test_der_and_pkcs12_examples_parse():
    der, _ = parse({"dest": "/srv/app/{name}.der", "content": ["cert"], "format": "der", "create-dirs": True})
    pkcs12, _ = parse({
        "dest": "/opt/app/keystore.p12", "content": ["fullchain", "privkey"], "format": "pkcs12",
        "password-file": "/etc/certrelay/keystore.pass", "group": GROUP, "mode": "640",
    })

    assert (der.format, der.create_dirs, der.holds_key, der.sources) == ("der", True, False, ("cert",))
    assert pkcs12.password_file == "/etc/certrelay/keystore.pass"
    assert pkcs12.holds_key and pkcs12.sources == ("cert", "chain", "privkey")
    assert pkcs12.describe(VALUES) == f"install fullchain+privkey as pkcs12 to /opt/app/keystore.p12 (group {GROUP}, mode 0640)"


def test_key_only_delivery_still_reads_cert_to_check_the_key_against():
    result, _ = parse({"dest": "/var/lib/postgresql/server.key", "content": ["privkey"], "owner": USER, "mode": "0600"})

    assert result.sources == ("cert", "privkey")


@pytest.mark.parametrize("dest", [
    "/etc/letsencrypt-copies/{name}.pem",  # shares only a prefix with the config dir
    "/etc/letsencrypt{name}.pem",  # the placeholder may not make it a path inside
    "/srv/{domains}/tls.pem",
    "/srv/{{literal}}/{name}.pem",
])
def test_destinations_outside_the_config_dir_are_accepted(dest):
    assert parse({"dest": dest, "content": ["cert"]})[1] == []


# --- mistakes: one problem each, on the right line ----------------------------------------


@pytest.mark.parametrize("changes, key, fragments", [
    ({"colour": "red"}, "colour", ["unknown key 'colour' in [[rule.install]]", "known: content, create-dirs, dest"]),
    ({"dest": None}, None, ["has no dest", 'dest = "/etc/haproxy/certs/{name}.pem"']),
    ({"content": None}, None, ["has no content", 'content = ["fullchain", "privkey"]']),
    ({"dest": 5}, "dest", ["'dest' must be a non-empty string"]),
    ({"dest": ""}, "dest", ["'dest' must be a non-empty string"]),
    ({"dest": "certs/{name}.pem"}, "dest", ["must be an absolute path"]),
    ({"dest": "/etc/haproxy/../shadow"}, "dest", ["must not have a '..' component"]),
    ({"dest": "/etc/haproxy/certs/"}, "dest", ["names a directory"]),
    ({"dest": "/etc/haproxy/{name.upper}.pem"}, "dest", ["bad placeholder '{name.upper}'", "{{ }} for literal braces"]),
    ({"dest": "/etc/haproxy/{host}.pem"}, "dest", ["bad placeholder '{host}'"]),
    ({"dest": "/etc/haproxy/{name"}, "dest", ["bad placeholder"]),
    ({"dest": "/etc/letsencrypt/live/{name}/haproxy.pem"}, "dest", ["inside the certbot config dir /etc/letsencrypt"]),
    ({"dest": "/etc/letsencrypt/haproxy.pem"}, "dest", ["inside the certbot config dir", "deliver outside it"]),
    ({"content": "fullchain"}, "content", ["'content' must be a non-empty list of part names (cert, chain, fullchain, privkey)"]),
    ({"content": []}, "content", ["non-empty list"]),
    ({"content": ["fullchain", 1]}, "content", ["non-empty list"]),
    ({"content": ["fullchain", "key"]}, "content", ["unknown part(s) 'key' in content; known: cert, chain, fullchain, privkey"]),
    ({"content": ["privkey", "fullchain"]}, "content", ["in the order cert, chain, fullchain, privkey", 'content = ["fullchain", "privkey"]']),
    ({"content": ["cert", "cert", "privkey"]}, "content", ["each once", 'content = ["cert", "privkey"]']),
    ({"format": "jks"}, "format", ["format 'jks' is not one of 'pem', 'der', 'pkcs12'"]),
    ({"format": "der", "mode": None}, "content", ['format "der" holds exactly one certificate: write content = ["cert"]']),
    ({"format": "pkcs12"}, "format", ['format "pkcs12" needs a password: add password-file = ']),
    ({"password-file": "/etc/certrelay/pass"}, "password-file", ['used only with format = "pkcs12"']),
    ({"format": "pkcs12", "password-file": "keystore.pass"}, "password-file", ["'password-file' must be an absolute path"]),
    ({"owner": "no-such-user-certrelay"}, "owner", ["unknown user 'no-such-user-certrelay'", "create it or fix 'owner'"]),
    ({"group": "no-such-group-certrelay"}, "group", ["unknown group 'no-such-group-certrelay'", "create it or fix 'group'"]),
    ({"owner": 0}, "owner", ["'owner' must be a user name string"]),
    ({"group": ""}, "group", ["'group' must be a group name string"]),
    ({"mode": 640}, "mode", ['string of 3 or 4 octal digits, like mode = "0640"', "640 would be read as decimal"]),
    ({"mode": "0o640"}, "mode", ["3 or 4 octal digits"]),
    ({"mode": "0680"}, "mode", ["3 or 4 octal digits"]),
    ({"mode": "00640"}, "mode", ["3 or 4 octal digits"]),
    ({"mode": "0660"}, "mode", ["lets group or others write the file"]),
    ({"mode": "0642", "content": ["cert"]}, "mode", ["lets group or others write the file"]),
    ({"mode": "2640"}, "mode", ["setuid, setgid or sticky"]),
    ({"mode": "0644"}, "mode", ["lets everyone read the private key", 'mode = "0640"']),
    ({"create-dirs": "yes"}, "create-dirs", ["'create-dirs' must be true or false"]),
])
def test_each_mistake_is_reported_on_its_line_with_a_fix(changes, key, fragments):
    line, message = single_problem(haproxy(**changes))

    assert line == (KEY_LINES[key] if key else HEADER_LINE)
    for fragment in fragments:
        assert fragment in message


def test_pkcs12_with_everyone_readable_mode_is_refused_even_without_privkey_in_content():
    table = {"dest": "/opt/app/keystore.p12", "content": ["cert"], "format": "pkcs12",
             "password-file": "/etc/certrelay/keystore.pass", "mode": "0644"}

    line, message = single_problem(table)

    assert line == KEY_LINES["mode"] and "lets everyone read the private key" in message


def test_certificate_only_file_may_be_readable_by_everyone():
    assert parse(haproxy(content=["fullchain"], mode="0644"))[1] == []


def test_a_dest_reaching_the_config_dir_through_a_symlink_is_refused(tmp_path):
    config_dir = tmp_path / "letsencrypt"
    config_dir.mkdir()
    os.symlink(config_dir, tmp_path / "alias")

    line, message = single_problem(haproxy(dest=f"{tmp_path}/alias/live/{{name}}.pem"), config_dir=str(config_dir))

    assert line == KEY_LINES["dest"] and "inside the certbot config dir" in message


def test_a_table_that_is_not_a_table_is_reported_on_its_header():
    assert parse(["dest"])[1] == [(HEADER_LINE, "'install' must be written as [[rule.install]] tables below a [[rule]]")]


def test_every_problem_is_reported_at_once():
    table = {
        "dest": "relative/{nam}.pem", "content": ["privkey", "cert"], "format": "pkcs12",
        "owner": "no-such-user-certrelay", "mode": 644, "colour": "red", "create-dirs": 1,
    }

    _, problems = parse(table)

    lines = sorted(line for line, _ in problems)
    assert lines == sorted([
        KEY_LINES["colour"], KEY_LINES["dest"], KEY_LINES["dest"], KEY_LINES["content"], KEY_LINES["format"],
        KEY_LINES["owner"], KEY_LINES["mode"], KEY_LINES["create-dirs"],
    ]), problems


def test_fixed_part_is_what_no_placeholder_can_change():
    assert install.fixed_part("/etc/haproxy/certs/site.pem") == "/etc/haproxy/certs/site.pem"
    assert install.fixed_part("/etc/haproxy/certs/{name}.pem") == "/etc/haproxy/certs/"
    assert install.fixed_part("/etc/letsencrypt{name}.pem") == "/etc/"
    assert install.fixed_part("/{name}/x.pem") == "/"
