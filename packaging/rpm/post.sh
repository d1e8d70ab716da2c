# farmnode %post ($1: 1 on install, 2 on upgrade). Units are enabled through presets
# (/usr/lib/systemd/system-preset/50-farmnode.preset), as %systemd_post does.
[ -e /etc/farmnode/tokens ] || install -m 0600 /dev/null /etc/farmnode/tokens
/opt/farmnode/bin/python3 -m compileall -q -j0 --invalidation-mode checked-hash \
    /opt/farmnode/lib >/dev/null 2>&1 || :
if [ "$1" -eq 1 ]; then
    systemctl --no-reload preset farmnode.service farmnode-api.socket >/dev/null 2>&1 || :
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    busctl call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus \
        ReloadConfig >/dev/null 2>&1 || :
    if [ "$1" -eq 1 ]; then
        systemctl start farmnode-api.socket >/dev/null 2>&1 || :
    fi
fi
