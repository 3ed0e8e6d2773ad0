"""`ipsecmon`: the IP Security Monitor of one computer, live in a terminal (clients.ipsecmon.main)."""
