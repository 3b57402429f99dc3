"""The routing core: prefix tree, workers and leases, policies, routing keys. No HTTP."""
