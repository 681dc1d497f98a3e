#!/bin/sh
# The latency benchmark's baseline: an inotifywait loop that reloads a unit for every
# file renamed or written into QUEUE, then removes the file.
# Usage: inotify-loop.sh QUEUE UNIT   (systemctl is whatever PATH finds)
set -eu
queue=$1
unit=$2
inotifywait -m -e moved_to,close_write --format '%f' "${queue}" | while read -r name; do
    systemctl reload "${unit}"
    rm -f -- "${queue}/${name}"
done
