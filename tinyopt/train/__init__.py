"""Training on a Keras backend: the backend itself, batches, feeds, compiling and fitting, scores."""
