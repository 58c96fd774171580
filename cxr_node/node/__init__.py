"""The daemon's life: service (start, data_dir lock, SIGTERM drain) and scheduler (jobs, hand-offs)."""
