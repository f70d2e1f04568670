"""Classification scores from class probabilities and integer labels (sklearn.metrics)."""

from __future__ import annotations

import numpy as np


def scores(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Top-1, top-5 and log loss of ``probs`` (N x C) against integer ``labels`` (N,).

    Rows need not sum to one (the 1000-way baseline keeps only the Tiny ImageNet columns of its
    softmax); log loss is computed on the renormalised rows.
    """
    from sklearn.metrics import accuracy_score, log_loss, top_k_accuracy_score

    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    classes = np.arange(probs.shape[1])
    normalised = np.clip(probs, 1e-12, None)
    normalised /= normalised.sum(axis=1, keepdims=True)
    return {
        "top1": float(accuracy_score(labels, probs.argmax(axis=1))),
        # With 5 classes or fewer every label is in the top 5 (sklearn refuses k >= the class count).
        "top5": float(top_k_accuracy_score(labels, probs, k=5, labels=classes)) if len(classes) > 5 else 1.0,
        "log_loss": float(log_loss(labels, normalised, labels=classes)),
    }
