"""Command-line clients of the policy server: netsh (static mode); later ipsecmon and the web console."""
