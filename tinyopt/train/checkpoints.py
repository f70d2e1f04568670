"""Per-epoch checkpoints of a training trial, so that a trial whose worker died or was preempted resumes.

A checkpoint holds everything the epochs after it depend on: every variable of the model (weights,
batch-norm statistics and the random layers' seed states, which ``save_weights`` leaves out), the
optimizer's variables (its step count drives nothing else: the learning rate follows the epoch), early
stopping's state and best weights, and the history of the epochs so far. The input pipeline needs
only the epoch: its order follows from the trial's seed and the epoch (``training_batches``). A trial
resumed from epoch k therefore trains the very epochs k+1... an uninterrupted one would.

Each checkpoint is a folder ``epoch-NNNN`` written under another name and renamed when complete
(a killed write leaves a ``.tmp-`` folder that is never read); its ``state.json`` names the SHA-256
of its arrays. The two newest are kept, so that a damaged newest falls back to the one before.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tinyopt.core.urls import first_line

FORMAT = 1
# train.checkpoint = "auto": an epoch this long or longer is checkpointed, which then costs little of it
# (0.07% of a scratch CPU preset epoch, BENCHMARKS.md), while an epoch of a second or two (the finetune
# CPU preset's head on cached activations), which a preemption costs little of, skips it.
AUTO_SECONDS = 10.0
_ARRAYS, _STATE, _PREFIX = "arrays.npz", "state.json", "epoch-"
_KEEP = 2


@dataclass
class Resumed:
    """What a checkpoint restored besides the variables: the epochs done and the state around them."""

    epoch: int
    history: dict[str, list[float]]
    stopping: dict[str, Any]
    best_weights: list[np.ndarray] | None
    notes: list[str] = field(default_factory=list)


class Checkpoints:
    """The checkpoints of one trial in ``folder`` (created on the first save)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def save(self, model: Any, epoch: int, history: dict[str, list[float]], stopping: dict[str, Any],
             best_weights: list[np.ndarray] | None) -> None:
        """Write the checkpoint after ``epoch`` epochs (from 1) of ``model`` (compiled, trained by ``fit``)."""
        import keras

        arrays = {f"model/{i}": keras.ops.convert_to_numpy(v) for i, v in enumerate(model.variables)}
        arrays.update({f"optimizer/{i}": keras.ops.convert_to_numpy(v)
                       for i, v in enumerate(model.optimizer.variables)})
        arrays.update({f"best/{i}": np.asarray(w) for i, w in enumerate(best_weights or ())})
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"{_PREFIX}{epoch:04d}"
        scratch = self.folder / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        try:
            with open(scratch / _ARRAYS, "wb") as out:
                np.savez(out, **arrays)
                out.flush()
                os.fsync(out.fileno())
            state = {"format": FORMAT, "epoch": epoch, "history": history, "stopping": stopping,
                     "best_weights": best_weights is not None, "sha256": _digest(scratch / _ARRAYS),
                     "shapes": _shapes(model), "saved": time.time()}
            (scratch / _STATE).write_text(json.dumps(state))
            if final.exists():  # the same epoch again (a retry that trained it anew): the older goes
                shutil.rmtree(final)
            os.replace(scratch, final)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        for old in self._epochs()[:-_KEEP]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, model: Any) -> Resumed | None:
        """Restore the newest checkpoint that verifies into ``model`` (compiled, built); None if there is none.

        A damaged or mismatched checkpoint is skipped for the one before, with a note saying so.
        """
        notes = []
        for scratch in self.folder.glob(".tmp-*"):  # a write that was killed: one process works on a trial
            shutil.rmtree(scratch, ignore_errors=True)
        for folder in reversed(self._epochs()):
            try:
                return self._restore(folder, model, notes)
            except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as err:
                notes.append(f"checkpoint {folder.name} of {self.folder} is unreadable ({first_line(err)}); "
                             "an earlier one is used")
        if notes:
            notes.append("no checkpoint could be read: the trial trains from epoch 1")
            return Resumed(0, {}, {}, None, notes)
        return None

    def clear(self) -> None:
        """Delete the trial's checkpoints (it has ended), and the study's folder of them once it is empty."""
        shutil.rmtree(self.folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.folder.parent.rmdir()

    def _epochs(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if p.name.startswith(_PREFIX) and p.is_dir())

    def _restore(self, folder: Path, model: Any, notes: list[str]) -> Resumed:
        state = json.loads((folder / _STATE).read_text())
        if state.get("format") != FORMAT:
            raise ValueError(f"format {state.get('format')!r}, not {FORMAT}")
        if state["sha256"] != _digest(folder / _ARRAYS):
            raise ValueError("its arrays do not match their checksum")
        if state["shapes"] != _shapes(model):
            raise ValueError("it was written by another model")
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        with np.load(folder / _ARRAYS) as arrays:
            stored = {key: arrays[key] for key in arrays.files}
        for prefix, variables in (("model", model.variables), ("optimizer", model.optimizer.variables)):
            values = [stored[f"{prefix}/{i}"] for i in range(len(variables))]
            if any(tuple(v.shape) != a.shape for v, a in zip(variables, values, strict=True)):
                raise ValueError(f"its {prefix} variables differ in shape")
            for variable, value in zip(variables, values, strict=True):
                variable.assign(value)
        best = [stored[f"best/{i}"] for i in range(len(model.get_weights()))] if state["best_weights"] else None
        return Resumed(int(state["epoch"]), state["history"], state["stopping"], best, notes)


def _shapes(model: Any) -> list[list[int]]:
    return [list(v.shape) for v in model.variables]


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
