"""Health checks that gate work: the checks (run as units of their own) and the agent's watch."""
