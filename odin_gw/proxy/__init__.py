"""The forwarding path: header rules, upstream pools, the catch-all blueprint."""
