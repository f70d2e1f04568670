"""The Optuna objectives: a model trial (build, train, score, record) and the ensemble's vote of finished trials."""
