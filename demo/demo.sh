#!/bin/sh
# certrelay demo: certbot (as in its container) -> certrelay-hook -> certrelay run.
#
# Run as root on Debian 12:  sh demo/demo.sh   (or: make demo)
# Installs what is missing with apt-get (pebble, busybox-static, Python modules),
# certbot from PyPI into REPO/.cache/certbot-venv (once), then runs demo/demo.py,
# which does everything in a throw-away directory under /var/tmp and removes it.
# Touches no real service: systemctl is a stand-in (demo/systemctl) that only prints.
set -eu

here=$(cd "$(dirname "$0")" && pwd)

if [ "$(id -u)" != 0 ]; then
    echo "demo: run me as root (certbot runs in its own mount namespace)" >&2
    exit 1
fi

packages="pebble busybox-static python3 python3-venv python3-click python3-pyinotify python3-sdnotify openssl util-linux mount"
missing=""
for package in $packages; do
    if ! dpkg-query -W -f '${Status}' "$package" 2>/dev/null | grep -q 'ok installed'; then
        missing="$missing $package"
    fi
done
if [ -n "$missing" ]; then
    echo "==> Installing Debian packages:$missing"
    apt-get update -qq
    # shellcheck disable=SC2086 # one word per package
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# Debian's python3: certrelay runs on it with Debian's packages only, as on a server.
exec /usr/bin/python3 "$here/demo.py" "$@"
