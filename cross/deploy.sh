#!/usr/bin/env bash
# cross/deploy.sh TARGET [user@]HOST: builds the .deb, copies it to the Pi over ssh, installs it
# (the unit is enabled and started by the package) and shows the service's status.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:?usage: cross/deploy.sh TARGET [user@]HOST}"
host="${2:?usage: cross/deploy.sh TARGET [user@]HOST}"
deb=$(cross/package.sh "$target" | tail -1)
name=$(basename "$deb")
scp "$deb" "$host:/tmp/$name"
ssh "$host" "sudo apt-get install -y --reinstall /tmp/$name && rm -f /tmp/$name && sudo systemctl restart nightlight && systemctl --no-pager status nightlight"
