"""The policyagent agent: session with the server, cache, enforcer, local admin API."""
