# farmnode %postun ($1: 0 after erase, 1 after upgrade), as %systemd_postun_with_restart.
# On upgrade the old package's %postun runs after the new files are in place: try-restart
# the agent (tasks keep running in their scopes and are re-adopted) and the stateless API.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    busctl call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus \
        ReloadConfig >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart farmnode.service farmnode-api.service >/dev/null 2>&1 || :
    fi
fi
if [ "$1" -eq 0 ]; then
    # RPM has no purge: /etc/farmnode (modified config kept as .rpmsave) and
    # /var/lib/farmnode (task history) stay; what is only cache or runtime goes.
    rm -rf /opt/farmnode /var/cache/farmnode /run/farmnode
fi
