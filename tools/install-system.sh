#!/bin/sh
# Install farmnode's system files (units, D-Bus files, default config) from a source tree
# into a root: used by the test containers and the VM; the packages (packaging/nfpm.yaml)
# install the same files from the same sources.
# usage: install-system.sh SRC ROOT
set -eu
src=$1; root=${2:-/}
install -d "$root/etc/systemd/system" "$root/etc/dbus-1/system.d" \
    "$root/usr/share/dbus-1/system-services" "$root/usr/share/dbus-1/interfaces" \
    "$root/etc/farmnode/conf.d" "$root/etc/farmnode/health.d" "$root/usr/bin"
for u in "$src"/units/*; do install -m 0644 "$u" "$root/etc/systemd/system/"; done
install -m 0644 "$src/dbus/org.farmnode.Agent1.conf" "$root/etc/dbus-1/system.d/"
install -m 0644 "$src/dbus/org.farmnode.Agent1.service" "$root/usr/share/dbus-1/system-services/"
install -m 0644 "$src/dbus/org.farmnode.Agent1.xml" "$root/usr/share/dbus-1/interfaces/"
install -m 0644 "$src/dbus/org.farmnode.Task1.xml" "$root/usr/share/dbus-1/interfaces/"
[ -e "$root/etc/farmnode/farmnode.yaml" ] || install -m 0644 "$src/etc/farmnode.yaml" "$root/etc/farmnode/"
ln -sf /opt/farmnode/bin/farmnode "$root/usr/bin/farmnode"
ln -sf /opt/farmnode/bin/farmnode-fakerender "$root/usr/bin/farmnode-fakerender"
# HTTP API: the generator puts agent_api_port into farmnode-api.socket; the token file is
# root-only (the service gets a copy through LoadCredential=). Nothing is enabled here (the
# callers start farmnode.service, which starts the API units), as the packages start nothing.
install -d "$root/etc/systemd/system-generators"
ln -sf /opt/farmnode/bin/farmnode-generator "$root/etc/systemd/system-generators/farmnode-generator"
[ -e "$root/etc/farmnode/tokens" ] || install -m 0600 /dev/null "$root/etc/farmnode/tokens"
