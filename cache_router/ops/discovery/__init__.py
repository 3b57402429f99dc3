"""Service discovery: workers found in Kubernetes (:mod:`.k8s`) or DNS (:mod:`.dns`),
added and drained as they come and go through the admin API's path (:mod:`.common`); see
docs/operations.md, "Service discovery"."""
