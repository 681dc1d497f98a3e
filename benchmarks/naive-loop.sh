#!/bin/sh
# The scale benchmark's baseline: what a hook per certificate does. For each pending
# notification, call systemctl once per unit that certificate needs, then remove it.
# Usage: naive-loop.sh QUEUE PLAN, PLAN holding one line per certificate:
#   NAME VERB:UNIT [VERB:UNIT...]
# The matching of rules to certificates is precomputed into PLAN (a hand-written hook
# knows its units), so this measures the calls alone: a lower bound for the approach.
set -eu
queue=$1
plan=$2
while read -r name actions; do
    [ -e "${queue}/${name}" ] || continue
    for action in ${actions}; do
        systemctl "${action%%:*}" "${action#*:}"
    done
    rm -f -- "${queue}/${name}"
done <"${plan}"
