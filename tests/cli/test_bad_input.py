"""Bad input through the real CLI: one line, a non-zero exit, and every store left exactly as it was.

Each case runs ``python -m tinyopt sweep ...`` in a subprocess against an Optuna storage, an MLflow
store and a data cache that already hold a study, a run and a prepared dataset; the files of all
three are compared byte for byte before and after.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import optuna
import pytest
from fault_helpers import snapshot
from mlflow import MlflowClient

from tinyopt.data import build

# (case id, extra arguments, fragment of the one line printed); <wrong_weights>, <broken_toml>,
# <not_a_zip> and <no_layout> are files made below.
CASES = [
    ("epochs type", ["--set", "space.epochs=abc"], "space.epochs"),
    ("train_per_class type", ["--set", "data.train_per_class=abc"], "data.train_per_class"),
    ("learning_rate type", ["--set", "space.learning_rate=abc"], "space.learning_rate"),
    ("optimizer typo", ["--set", "space.optimizer=adamm"], "adamm"),
    ("initializer typo", ["--set", "space.initializer=foo"], "foo"),
    ("decay typo", ["--set", "space.decay=linear"], "linear"),
    ("augment typo in choices", ["--set", 'space.augment={type="categorical", choices=["flip", "rotate"]}'],
     "rotate"),
    ("sampler typo", ["--set", "study.sampler=cmaes"], "cmaes"),
    ("pruner typo", ["--set", "study.pruner=asha"], "asha"),
    ("run name of a param not searched", ["--set", 'study.run_name=["stages", "lr"]'], "study.run_name: 'lr'"),
    ("precision typo", ["--set", "train.mixed_precision=maybe"], "maybe"),
    ("markup in a value is printed literally", ["--set", "space.optimizer=[red]"], "[red]"),
    ("zero epochs", ["--set", "space.epochs=0"], "space.epochs"),
    ("negative batch", ["--set", "space.batch_size=-8"], "space.batch_size"),
    ("dropout above 1", ["--set", "space.dropout=1.5"], "space.dropout"),
    ("low above high", ["--set", 'space.learning_rate={type="float", low=0.1, high=0.01, log=true}'],
     "learning_rate"),
    ("unknown key", ["--set", "space.nosuch=1"], "space.nosuch"),
    ("unknown section typo", ["--set", "modle.weights=none"], "modle"),
    ("scratch with weights", ["--set", "model.weights=imagenet"], "model.weights"),
    ("missing config file", ["--config", "missing.toml"], "missing.toml"),
    ("broken config file", ["--config", "<broken_toml>"], "not valid TOML"),
    ("unsupported storage", ["--storage", "redis://u:hunter2@127.0.0.1/0"], "unsupported storage URL"),
    ("unreachable database", ["--storage", "postgresql+psycopg://bob:hunter2@127.0.0.1:1/nodb"],
     "cannot reach the Optuna storage"),
    ("unreachable tracking server", ["--tracking-uri", "http://127.0.0.1:1"], "127.0.0.1:1"),
    ("tracking server that never answers", ["--tracking-uri", "http://127.0.0.1:<silent>"], "timed out"),
    ("database that never answers", ["--storage", "postgresql+psycopg://bob:hunter2@127.0.0.1:<silent>/db"],
     "timeout expired"),
    ("unsupported tracking URI", ["--tracking-uri", "ftp://u:hunter2@example.org/x"], "unsupported MLflow"),
    ("missing data zip", ["--data", "nosuch.zip"], "nosuch.zip"),
    ("data file that is no zip", ["--data", "<not_a_zip>"], "not_a_zip"),
    ("data folder without the layout", ["--data", "<no_layout>"], "no_layout"),
    ("unreachable data URL", ["--data", "http://127.0.0.1:1/tiny-imagenet-200.zip"], "127.0.0.1:1"),
    ("zero trials", ["--trials", "0"], "--trials"),
    ("more workers than GPUs", ["--workers", "3", "--gpus", "0,1"], "--gpus"),
    ("finetune: missing weights file", ["finetune", "--set", "model.weights=missing.h5"], "missing.h5"),
    ("finetune: unknown backbone", ["finetune", "--set", "model.backbone=vgg16"], "vgg16"),
    ("finetune: ImageNet MobileNet of an alpha without weights",
     ["finetune", "--set", "model.backbone=mobilenet", "--set", "model.alpha=0.3"], "model.alpha"),
    ("finetune: weights file of no backbone",
     ["finetune", "--set", "model.backbone=mobilenet", "--set", "model.alpha=0.25", "--set",
      "model.weights=<wrong_weights>", "--set", "space.input_size=64"], "wrong_weights"),
    ("ensemble without members", ["ensemble"], "at least 2 members"),
]
SECRET = "hunter2"


@pytest.fixture(scope="module")
def silent_port():
    """A port on loopback whose server accepts every connection and never says a word."""
    listener = socket.create_server(("127.0.0.1", 0))
    held = []

    def accept():
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield str(listener.getsockname()[1])
    listener.close()
    for connection in held:
        connection.close()


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_folder, silent_port):
    """A storage with a study, an MLflow store with a run, a prepared cache, and the files of the cases."""
    root = tmp_path_factory.mktemp("bad_input")
    storage = f"sqlite:///{root}/studies/tinyopt.db"
    (root / "studies").mkdir()
    tracking_uri = f"sqlite:///{root}/mlruns/mlflow.db"
    client = MlflowClient(tracking_uri)
    run = client.create_run(client.create_experiment("tinyopt/scratch"))
    client.log_metric(run.info.run_id, "selection_top1", 0.5)
    client.set_terminated(run.info.run_id)
    study = optuna.create_study(study_name="scratch", storage=storage, direction="maximize")
    study.set_user_attr("approach", "scratch")
    study.add_trial(optuna.trial.create_trial(value=0.5, params={"x": 1.0},
                                              user_attrs={"mlflow_run_id": run.info.run_id},
                                              distributions={"x": optuna.distributions.FloatDistribution(0, 2)}))
    cache = root / "cache"
    build.prepare(tiny_folder, cache, progress=False)
    files = {"wrong_weights": root / "wrong_weights.h5", "broken_toml": root / "broken.toml",
             "not_a_zip": root / "not_a_zip.zip", "no_layout": root / "no_layout"}
    files["wrong_weights"].write_bytes(b"not an HDF5 file")
    files["broken_toml"].write_text("[train\n")
    files["not_a_zip"].write_text("plain text")
    files["no_layout"].mkdir()
    return {"root": root, "storage": storage, "tracking_uri": tracking_uri, "cache": cache,
            "files": {**{k: str(v) for k, v in files.items()}, "silent": silent_port}}


@pytest.mark.parametrize("case, args, fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case, args, fragment, stores):
    _refused("sweep", args, fragment, stores)


# `tinyopt plan` checks what `tinyopt sweep` checks, in the same code: one case of each kind.
PLAN_CASES = [case for case in CASES if case[0] in (
    "optimizer typo", "unknown key", "broken config file", "unsupported storage", "unreachable tracking server",
    "data file that is no zip", "zero trials", "more workers than GPUs", "finetune: missing weights file")]


@pytest.mark.parametrize("case, args, fragment", PLAN_CASES, ids=[c[0] for c in PLAN_CASES])
def test_plan_refuses_what_sweep_refuses(case, args, fragment, stores):
    _refused("plan", args, fragment, stores)


def _refused(program: str, args: list[str], fragment: str, stores) -> None:
    root = stores["root"]
    approach, args = (args[0], args[1:]) if args and not args[0].startswith("-") else ("scratch", args)
    for name, path in stores["files"].items():
        args = [a.replace(f"<{name}>", path) for a in args]
    command = [sys.executable, "-m", "tinyopt", program, approach, "--trials", "1", "--cache", str(stores["cache"]),
               "--storage", stores["storage"], "--tracking-uri", stores["tracking_uri"], *args]
    before = snapshot(root / "studies", root / "mlruns", stores["cache"])
    # An unreachable server must fail within seconds (benchmarks/bench_fail_fast.py times it); 120 s would be a hang.
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "400"})
    output = done.stdout + done.stderr
    lines = [line for line in output.splitlines() if line.strip()]
    assert done.returncode != 0, output
    assert len(lines) == 1, output
    assert fragment in lines[0], output
    assert "Traceback" not in output and SECRET not in output
    assert snapshot(root / "studies", root / "mlruns", stores["cache"]) == before


def test_at_least_twenty_cases():
    assert len(CASES) >= 20 and len(PLAN_CASES) == 9
