"""Enrollment: proofs (Kerberos, join tokens, the workgroup secret), the Enrollment service and the agent's client."""
