"""What one_jax keeps on disk: `checkpoints` (the one checkpoint layout), `workdirs` (a run's
directory, its config and data, what a run may overwrite), `run_lock` (one live run per
workdir) and `staging` (output outside a run appears complete or not at all)."""
