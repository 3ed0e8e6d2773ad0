"""`netsh ipsec static`: Windows Server 2003's static IPsec policy commands against the policy server.

Parsing and help come from the setting table (policyagent.model.settings); writes are
checked by the model's planner before they are sent, then applied by the server's
PolicyAdmin API, which runs the same planner in its transaction.
"""
