"""What the sweeps found, for people: best trials, reports, bundles, refits and predictions."""
