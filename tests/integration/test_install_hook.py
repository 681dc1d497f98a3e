"""`certrelay install-hook` and the hook's status in `certrelay check` (certrelay/hook.py)."""

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from certrelay import hook
from tests.conftest import HOOK, REPOSITORY


def install_hook(config_dir, *arguments):
    return subprocess.run(
        [sys.executable, "-m", "certrelay", "install-hook", "--config-dir", str(config_dir), *arguments],
        env=dict(os.environ, PYTHONPATH=REPOSITORY), capture_output=True, text=True, timeout=60,
    )


@pytest.fixture
def config_dir(tmp_path):
    path = tmp_path / "letsencrypt"
    path.mkdir()
    return path


def test_packaged_hook_is_the_package_data_certrelay_hook():
    assert hook.packaged_hook() == Path(HOOK).read_bytes()
    assert Path(HOOK).parent == Path(hook.__file__).parent


def test_install_copies_the_hook_executable_and_status_is_current(config_dir):
    assert hook.status(config_dir) == "missing"

    result = install_hook(config_dir)

    assert result.returncode == 0, result.stderr
    installed = config_dir / "renewal-hooks" / "deploy" / "certrelay-hook"
    assert f"{installed}: installed" in result.stderr
    assert installed.read_bytes() == Path(HOOK).read_bytes()
    assert stat.S_IMODE(installed.stat().st_mode) == 0o755
    assert hook.status(config_dir) == "current"
    assert os.listdir(installed.parent) == ["certrelay-hook"]  # no temporary file left


def test_install_again_writes_nothing(config_dir):
    hook.install(config_dir)
    before = (config_dir / "renewal-hooks" / "deploy" / "certrelay-hook").stat()

    path, outcome = hook.install(config_dir)

    assert outcome == "current"
    assert path.stat().st_ino == before.st_ino and path.stat().st_mtime_ns == before.st_mtime_ns


def test_outdated_hook_is_replaced_by_a_rename_never_in_place(config_dir):
    path, _ = hook.install(config_dir)
    path.write_bytes(path.read_bytes() + b"# an older version\n")
    assert hook.status(config_dir) == "outdated"
    reader = os.open(path, os.O_RDONLY)  # a certbot reading the old hook right now
    old_inode = os.fstat(reader).st_ino

    path, outcome = hook.install(config_dir)

    assert outcome == "updated"
    assert path.stat().st_ino != old_inode
    assert os.read(reader, 1 << 20).endswith(b"# an older version\n")  # the old file stayed whole
    os.close(reader)
    assert hook.status(config_dir) == "current"


def test_not_executable_hook_is_outdated(config_dir):
    path, _ = hook.install(config_dir)
    path.chmod(0o644)

    assert hook.status(config_dir) == "outdated"
    assert hook.install(config_dir)[1] == "updated"
    assert stat.S_IMODE(path.stat().st_mode) == 0o755


def test_missing_config_dir_is_refused_unless_forced(tmp_path):
    missing = tmp_path / "no-such-dir"

    refused = install_hook(missing)

    assert refused.returncode == 2
    assert "no such directory" in refused.stderr and not missing.exists()
    forced = install_hook(missing, "--force")
    assert forced.returncode == 0, forced.stderr
    assert hook.status(missing) == "current"


def test_someone_elses_file_is_kept_unless_forced(config_dir):
    deploy = config_dir / "renewal-hooks" / "deploy"
    deploy.mkdir(parents=True)
    (deploy / "certrelay-hook").write_text("#!/bin/sh\necho mine\n")

    refused = install_hook(config_dir)

    assert refused.returncode == 2
    assert "is not a certrelay hook" in refused.stderr
    assert (deploy / "certrelay-hook").read_text() == "#!/bin/sh\necho mine\n"
    assert install_hook(config_dir, "--force").returncode == 0
    assert hook.status(config_dir) == "current"


def test_symlink_is_never_followed(config_dir, tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("precious\n")
    deploy = config_dir / "renewal-hooks" / "deploy"
    deploy.mkdir(parents=True)
    (deploy / "certrelay-hook").symlink_to(target)
    assert hook.status(config_dir) == "missing"

    with pytest.raises(hook.HookError, match="symlink"):
        hook.install(config_dir)
    hook.install(config_dir, force=True)

    assert target.read_text() == "precious\n"
    assert not (deploy / "certrelay-hook").is_symlink()
    assert hook.status(config_dir) == "current"


def test_directory_in_the_way_is_refused(config_dir):
    (config_dir / "renewal-hooks" / "deploy" / "certrelay-hook").mkdir(parents=True)

    with pytest.raises(hook.HookError, match="is a directory"):
        hook.install(config_dir, force=True)


@pytest.mark.parametrize("kind", [hook.DEPLOY, hook.POST], ids=["deploy", "post"])
def test_check_reports_missing_outdated_and_current(relay, kind):
    other = hook.POST if kind == hook.DEPLOY else hook.DEPLOY
    hook.install(relay.config_dir, hook=other)
    missing = relay.run(command="check")
    assert missing.returncode == 2
    assert f"the {kind.kind} hook is not installed; install it: certrelay install-hook" in missing.stderr

    path, _ = hook.install(relay.config_dir, hook=kind)
    current = relay.run(command="check")
    assert current.returncode == 0, current.stderr
    assert f"{path}: current" in current.stderr

    path.write_bytes(path.read_bytes() + b"\n")
    outdated = relay.run(command="check")
    assert outdated.returncode == 0, outdated.stderr
    assert f"warning: {path}: outdated" in outdated.stderr
    assert "run certrelay install-hook" in outdated.stderr


def test_install_hook_installs_both_hooks_where_certbot_runs_them(relay):
    done = subprocess.run(
        [sys.executable, "-m", "certrelay", "install-hook", "--config-dir", relay.config_dir],
        env=relay.environment(), capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stderr
    for kind in hook.HOOKS:
        path = Path(relay.config_dir, "renewal-hooks", kind.kind, kind.name)
        assert f"{path}: installed" in done.stderr
        assert path.read_bytes() == hook.packaged_hook(kind) and os.access(path, os.X_OK)
        assert kind.marker in path.read_bytes()


def test_check_without_a_packaged_hook_says_so_and_how_to_fix_it(relay, tmp_path):
    """A certrelay installed without its hook: a problem in words, not a traceback."""
    package = tmp_path / "incomplete" / "certrelay"
    shutil.copytree(Path(REPOSITORY) / "certrelay", package, ignore=shutil.ignore_patterns(hook.HOOK_NAME))
    hook.install(relay.config_dir)

    def certrelay(*arguments):  # from the incomplete copy: neither the work tree nor PYTHONPATH
        return subprocess.run([sys.executable, "-m", "certrelay", *arguments], cwd=package.parent,
                              env=relay.environment(PYTHONPATH=str(package.parent)),
                              capture_output=True, text=True, timeout=60)

    checked = certrelay(*relay.command("check")[3:])
    installed = certrelay("install-hook", "--config-dir", relay.config_dir)

    assert checked.returncode == 2
    assert "Traceback" not in checked.stderr
    assert (f"error: the deploy hook cannot be checked: the certrelay-hook shipped with certrelay cannot be read"
            f" ({package / hook.HOOK_NAME}: No such file or directory): reinstall certrelay") in checked.stderr
    assert installed.returncode == 2 and "Traceback" not in installed.stderr
    assert "shipped with certrelay cannot be read" in installed.stderr


def test_check_with_an_unreadable_installed_hook_says_so_and_how_to_fix_it(config_dir, monkeypatch):
    """Root reads any file, so the read fails by substitution; in-process, through click."""
    from click.testing import CliRunner

    from certrelay import cli

    path, _ = hook.install(config_dir)
    rules = config_dir.parent / "rules.toml"
    rules.write_text('[[rule]]\nmatch = ["*"]\nrestart = ["a.service"]\n')
    read_bytes = Path.read_bytes

    def refuse(self):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", refuse)

    result = CliRunner().invoke(cli.main, ["check", "--config-dir", str(config_dir), "--rules", str(rules),
                                           "--state-dir", str(config_dir.parent / "state")])

    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert (f"the deploy hook cannot be checked: {path}: cannot read it (Permission denied) to compare it with the"
            " hook shipped with certrelay: fix its permissions, or replace it: certrelay install-hook --force"
            in result.output)


def test_check_with_renewal_hooks_not_a_directory_says_so(relay):
    Path(relay.config_dir, "renewal-hooks").write_text("not a directory\n")

    checked = relay.run(command="check")

    assert checked.returncode == 2 and "Traceback" not in checked.stderr
    assert "cannot look at it (Not a directory): renewal-hooks/deploy/ must be a directory" in checked.stderr


@pytest.mark.skipif(not shutil.which("make"), reason="make is not installed")
def test_make_install_layout_finds_its_own_hook(tmp_path):
    """After `make install PREFIX=DIR`, DIR/bin/certrelay installs the hook in its package
    (DIR/lib/certrelay/certrelay/certrelay-hook), which DIR/share/certrelay/ links to."""
    # A copy of the tree: `make` writes build/, which others may be using.
    source, prefix = tmp_path / "source", tmp_path / "prefix"
    skip = {".git", ".cache", ".pybuild", "build", "dist", "debian", "tests", "benchmarks", "demo"}
    shutil.copytree(REPOSITORY, source, ignore=lambda directory, names: (
        [name for name in names if name in skip] if Path(directory) == Path(REPOSITORY) else []))
    made = subprocess.run(
        ["make", "--no-print-directory", "-C", str(source), "install", f"PREFIX={prefix}",
         f"RULES={prefix}/rules.toml"],
        capture_output=True, text=True, timeout=120,
    )
    assert made.returncode == 0, made.stdout + made.stderr
    shipped = prefix / "lib" / "certrelay" / "certrelay" / "certrelay-hook"
    shipped.write_bytes(shipped.read_bytes() + b"# as installed\n")  # tell it from the source tree's
    assert (prefix / "share" / "certrelay" / "certrelay-hook").resolve() == shipped
    config = tmp_path / "letsencrypt"
    config.mkdir()

    done = subprocess.run([str(prefix / "bin" / "certrelay"), "install-hook", "--config-dir", str(config)],
                          env={"PATH": os.defpath}, capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stderr
    assert (config / "renewal-hooks" / "deploy" / "certrelay-hook").read_bytes() == shipped.read_bytes()


def test_check_warns_of_a_hook_that_asks_for_bash_which_the_certbot_image_lacks(relay):
    for kind in hook.HOOKS:
        hook.install(relay.config_dir, hook=kind)
    mine = Path(relay.config_dir, "renewal-hooks", "deploy", "reload-haproxy")
    mine.write_text("#!/usr/bin/env bash\nsystemctl reload haproxy\n")
    mine.chmod(0o755)
    Path(relay.config_dir, "renewal-hooks", "pre", "stop-web").parent.mkdir()
    Path(relay.config_dir, "renewal-hooks", "pre", "stop-web").write_text("#!/bin/sh\n")

    result = relay.run(command="check")

    assert result.returncode == 0, result.stderr
    assert f"warning: {mine} asks for bash (#!...bash): the certbot/dns-cloudflare image has none, so certbot" \
        " in the container gets exit status 127 from it and still exits 0; rewrite it for /bin/sh" in result.stderr
    assert result.stderr.count("asks for bash") == 1  # not the sh hooks, not certrelay's
