"""The MLflow adapter, the only package that imports mlflow (``names`` aside, which is pure): runs, stores, views."""
