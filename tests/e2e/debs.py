"""certrelay's Debian package, built for the end-to-end tests.

`built_deb()` runs `make deb` (without the build's own tests: `make package` runs them)
on the repository, once per test session, into a temporary directory; `built_deb(BUMP)`
builds the same tree with the version `VERSION+BUMP` (debian/changelog and
certrelay/__init__.py changed in a copy), a newer version for the upgrade test.
CERTRELAY_E2E_SOURCE names another tree to build from.
"""

import atexit
import functools
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: What `make deb` leaves out of the source package; a bumped copy leaves out the same.
EXCLUDED = {".git", ".cache", "build", "dist", ".pybuild", "__pycache__", ".pytest_cache", ".hypothesis"}


def skip_reason():
    """Return why the package cannot be built here, or None."""
    for tool in ("make", "dpkg-buildpackage", "dh"):
        if not shutil.which(tool):
            return f"{tool} is not on PATH: apt-get install build-essential debhelper dh-python pybuild-plugin-pyproject"
    return None


def source_tree():
    return Path(os.environ.get("CERTRELAY_E2E_SOURCE") or REPO)


@functools.cache
def work_dir():
    path = Path(tempfile.mkdtemp(prefix="certrelay-e2e-debs-", dir="/var/tmp"))
    atexit.register(shutil.rmtree, path, True)
    return path


def version(tree):
    text = (tree / "certrelay" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.MULTILINE).group(1)


@functools.cache
def built_deb(bump=""):
    """Return the path of certrelay_VERSION_all.deb built from the source tree.

    With `bump` (e.g. "e2e1"), a copy of the tree gets the version VERSION+BUMP first.
    Raises RuntimeError with the build's output if it fails.
    """
    tree = source_tree()
    out = work_dir() / (bump or "plain")
    if bump:
        copy = work_dir() / f"source-{bump}"
        shutil.copytree(tree, copy, symlinks=True, ignore=lambda directory, names: [
            name for name in names if name in EXCLUDED or name.startswith(".venv") or name.endswith(".egg-info")])
        old = version(copy)
        new = f"{old}+{bump}"
        init = copy / "certrelay" / "__init__.py"
        init.write_text(init.read_text().replace(f'__version__ = "{old}"', f'__version__ = "{new}"'))
        changelog = copy / "debian" / "changelog"
        lines = changelog.read_text().splitlines(keepends=True)
        lines[0] = lines[0].replace(f"({old})", f"({new})", 1)
        changelog.write_text("".join(lines))
        tree = copy
    done = subprocess.run(
        ["make", "--no-print-directory", "-C", str(tree), "deb", f"DEB_DIR={out}", "DEB_BUILD_OPTIONS=nocheck"],
        capture_output=True, text=True, timeout=600,
    )
    deb = out / f"certrelay_{version(tree)}_all.deb"
    if done.returncode != 0 or not deb.is_file():
        raise RuntimeError(f"make deb failed ({done.returncode}):\n{done.stdout[-5000:]}{done.stderr[-5000:]}")
    return deb
