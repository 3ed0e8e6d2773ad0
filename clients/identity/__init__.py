"""The IdentityAdmin client (`policyagent join-token|host-cert|admin-cert ... -r HOST:PORT`)."""
