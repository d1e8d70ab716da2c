# farmnode %preun ($1: 0 on erase, 1 on upgrade). Only an erase stops the agent, which stops
# its tasks gracefully; an upgrade restarts it in %postun and running tasks survive that.
if [ "$1" -eq 0 ]; then
    systemctl --no-reload disable --now farmnode-api.socket farmnode-api.service \
        farmnode.service >/dev/null 2>&1 || :
fi
