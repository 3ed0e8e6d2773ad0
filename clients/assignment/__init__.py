"""`policyagent ou|site|group|computer|gpo|rsop`: the assignment registry and RSoP over AssignmentAdmin."""
