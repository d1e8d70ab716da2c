"""Fleet control: one `farmnode` command against many nodes' agents at once, over sd-bus's
own SSH (`-H`) and machine (`-M`) transports, as `systemctl -H/-M` do."""
