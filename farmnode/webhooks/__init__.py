"""Webhooks: the agent's task and agent events posted to HTTP receivers.

Owns the on-disk delivery queue (webhooks.db in the state directory), the body and its
signature, and the senders. May import: farmnode.config, farmnode.tasks.model,
farmnode.master.protocol (the backoff) and the standard library; the agent's entry point
connects it to the core's listeners.
"""
