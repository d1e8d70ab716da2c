# farmnode %post ($1: 1 on install, 2 on upgrade). The agent is enabled through its preset
# (/usr/lib/systemd/system-preset/50-farmnode.preset), as %systemd_post does; nothing is
# started: the agent, and with it the API's port, starts on `systemctl start farmnode`.
[ -e /etc/farmnode/tokens ] || install -m 0600 /dev/null /etc/farmnode/tokens
/opt/farmnode/bin/python3 -m compileall -q -j0 --invalidation-mode checked-hash \
    /opt/farmnode/lib >/dev/null 2>&1 || :
if [ "$1" -eq 1 ]; then
    systemctl --no-reload preset farmnode.service >/dev/null 2>&1 || :
else
    # Earlier packages enabled farmnode-api.socket on its own (listening at boot with no
    # agent); its units have no [Install] now: the agent starts it and a stop closes it.
    systemctl --no-reload disable farmnode-api.socket >/dev/null 2>&1 || :
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    busctl call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus \
        ReloadConfig >/dev/null 2>&1 || :
fi
