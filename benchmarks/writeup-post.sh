#!/bin/sh
# The write-up's post-processing script, what admins ran before certrelay: after
# `docker run certbot renew`, restart the services if a deploy hook left a flag file.
# The benchmark runs it with the flag absent ("nothing to do"), and points CONFIG_DIR
# at a scratch directory; the default is what the write-up used.
CONFIG_DIR="${CONFIG_DIR:-/etc/letsencrypt}"
if [ -e "${CONFIG_DIR}/renewed-flag" ]; then
    systemctl restart dovecot exim4
    systemctl reload apache2
    rm "${CONFIG_DIR}/renewed-flag"
fi
