#!/bin/sh
# certrelay demo: certbot in its container -> certrelay-hook -> certrelay run.
#
# Run as root on Debian 12:  sh demo/demo.sh [--keep] [--docker | --stand-in]   (or: make demo)
# Installs what is missing with apt-get (pebble, busybox-static, Python modules), then
# runs demo/demo.py, which does everything in a throw-away directory under /var/tmp and
# removes it. certbot runs in a real container (docker run, the end-to-end tests' image;
# demo.py has tools/need install docker.io and mmdebstrap) where a Docker engine can run
# and the image is built (`make e2e`, or --docker: one to three minutes, once), else in
# a stand-in (certbot from PyPI, installed once into .cache/certbot-venv); the demo says
# which, and why. Touches no real service: systemctl is a stand-in (demo/systemctl) that
# only prints.
set -eu

here=$(cd "$(dirname "$0")" && pwd)

if [ "$(id -u)" != 0 ]; then
    echo "demo: run me as root (certbot runs in its own mount namespace)" >&2
    exit 1
fi

# python3-cryptography: certrelay reads certificate dates with it (status, alarms).
sh "$here/../tools/need" demo pebble busybox-static python3 python3-venv python3-click \
    python3-pyinotify python3-sdnotify python3-cryptography openssl util-linux mount

# Debian's python3: certrelay runs on it with Debian's packages only, as on a server.
exec /usr/bin/python3 "$here/demo.py" "$@"
