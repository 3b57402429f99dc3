"""Running a fleet: health, breakers, metrics, admin API, load sources, replicas."""
