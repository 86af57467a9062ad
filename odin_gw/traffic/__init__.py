"""Traffic management (issue 10): rules, splits, breakers and rate limits."""
