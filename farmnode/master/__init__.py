"""master: keeping the farm's master informed — announce, reannounce, task reports, the
durable outbox. May import farmnode.config, farmnode.tasks and farmnode.sysinfo.
"""
