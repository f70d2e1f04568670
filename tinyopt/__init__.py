"""tinyopt: hyperparameter sweeps for Tiny ImageNet, tracked in MLflow."""

__version__ = "0.1.0"
