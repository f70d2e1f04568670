"""Running a study: the runner, its sampler and pruner, worker processes, recovery of dead trials, the summary."""
