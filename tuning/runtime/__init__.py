"""Keeping Ray healthy: starting or joining a cluster (`ray_cluster`, `worker_setup`), checks
before anything expensive (`preflight`), one command per search folder (`locks`), freeing the
placement groups of dead Ray Train controllers (`placement_groups`) and failing trials that wait
forever (`watchdog`).

May import: `cfcml`, `tuning.records`."""
