"""policyagent: Windows-style IPsec policy management for fleets of Linux machines."""

__version__ = "0.1.0"
