"""The GPU check (benchmarks/gpu): its data slice, its wheel set, and `run.sh --tiny` end to end on the CPU."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tinyopt.data import fetch

GPU_CHECK = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu"
STEPS = ("environment", "throughput", "data slice", "data prepare", "sweep finetune", "sweep scratch",
         "best --export", "predict")


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, GPU_CHECK / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_slice_keeps_the_official_layout_and_is_the_same_every_time(tiny_folder, tmp_path):
    make_slice = _module("make_slice")
    outs = [tmp_path / "a.zip", tmp_path / "b.zip"]
    for out in outs:
        make_slice.main(["--source", str(tiny_folder), "--out", str(out), "--classes", "3",
                         "--train-per-class", "4", "--val-per-class", "2"])
    tree = fetch.open_tree(outs[0])
    try:
        layout = fetch.read_layout(tree)
    finally:
        tree.close()
    assert len(layout.wnids) == 3 and len(layout.train_files) == 3 * 4 and len(layout.test_files) == 3 * 2
    assert len(set(hashlib.sha256(out.read_bytes()).hexdigest() for out in outs)) == 1


def test_wheel_set_replaces_mlflow_and_tensorflow_and_skips_what_the_gpu_image_has():
    pins = {line.split("==")[0] for line in _module("deps").pins()}
    assert {"keras", "optuna", "mlflow-skinny", "mlflow-tracing", "sqlalchemy", "alembic"} <= pins
    assert not pins & {"mlflow", "tensorflow", "numpy", "jax", "matplotlib"}


@pytest.mark.slow
def test_tiny_gpu_check_passes_every_step(tmp_path, dev_zip, mobilenet_weights):
    """Under JAX whichever backend the suite runs on: the lent GPU machine has JAX and no TensorFlow."""
    pytest.importorskip("jax", reason="the GPU check runs under JAX (pip install -e '.[jax]')")
    work = tmp_path / "work"
    done = subprocess.run(
        ["bash", str(GPU_CHECK / "run.sh"), "--tiny", "--workdir", str(work), "--source", str(dev_zip),
         "--backbone", "mobilenet", "--weights", str(mobilenet_weights)],
        env={**os.environ, "PYTHON": sys.executable, "KERAS_BACKEND": "jax"}, capture_output=True, text=True,
        timeout=600)
    out = done.stdout
    assert done.returncode == 0, f"{out}\n{done.stderr[-3000:]}"
    assert "[FAIL]" not in out
    for step in STEPS:
        assert len(re.findall(rf"^\[ok\] {re.escape(step)}: ", out, re.MULTILINE)) == 1, f"{step!r}:\n{out}"
    assert "backend jax" in out and re.search(r"^ +32 px +[\d,.]+$", out, re.MULTILINE), out
    assert re.search(r"^\[ok\] sweep scratch: 3 trials \(", out, re.MULTILINE), out
    assert (work / "bundle" / "model.keras").is_file()
    predicted = re.search(r"^\[ok\] predict: val_\d+\.JPEG -> (n\d{8}) ", out, re.MULTILINE)
    assert predicted, out
    classes = (work / "bundle" / "classes.tsv").read_text()
    assert f"\t{predicted.group(1)}\t" in classes
