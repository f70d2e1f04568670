"""``tinyopt plan``'s forecast against the sweep it forecasts, for the three CPU presets.

For each preset: prepare the data cache once, run ``tinyopt plan APPROACH --preset cpu --trials N --json``,
then ``tinyopt sweep APPROACH --preset cpu --trials N --forecast plan.json`` with fresh stores, and print
forecast and actual side by side: the sweep's wall time (the command's, start-up included), a trial's
seconds and its epochs. Target: forecast within 0.75x to 1.33x of the actual wall time.

    python benchmarks/bench_plan.py [--approaches pretrained finetune scratch] [--trials 10 5 2]
        [--scratch-epochs 2,4]

The scratch CPU preset trains 8 to 32 epochs of 18,000 images (hours for a few trials on 2 cores);
``--scratch-epochs LOW,HIGH`` narrows its epochs so the check fits in a session (the rest of the preset
is kept). The machine's load is printed before and after: plan and sweep share it, not always equally.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _tinyopt(args: list[str], cwd: Path) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tinyopt", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"tinyopt {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return seconds, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--approaches", nargs="+", default=["pretrained", "finetune", "scratch"])
    parser.add_argument("--trials", nargs="+", type=int, default=[10, 5, 2])
    parser.add_argument("--scratch-epochs", default="2,4")
    parser.add_argument("--zip", default=str(SHARED / "tiny-imagenet-200-dev.zip"))
    parser.add_argument("--weights", default=str(SHARED / "mobilenet_2_5_128_tf.h5"))
    options = parser.parse_args()
    from tinyopt.core.forecast import Actual, Forecast
    from tinyopt.stores import storage

    print(f"load before: {os.getloadavg()[0]:.1f}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cache = root / "cache"
        _tinyopt(["data", "prepare", "--data", options.zip, "--cache", str(cache)], root)
        for approach, trials in zip(options.approaches, options.trials, strict=False):
            work = root / approach
            work.mkdir()
            extra = ["--set", f"model.weights={options.weights}"] if approach != "scratch" else []
            if approach == "scratch" and options.scratch_epochs:
                low, high = options.scratch_epochs.split(",")
                extra += ["--set", f'space.epochs={{type="int", low={low}, high={high}, default={low}}}']
            common = [approach, "--preset", "cpu", "--trials", str(trials), "--cache", str(cache), *extra]
            plan_s, out = _tinyopt(["plan", *common, "--json"], work)
            (work / "plan.json").write_text(out)
            forecast = Forecast.from_dict(json.loads(out))
            sweep_s, _ = _tinyopt(["sweep", *common, "--forecast", "plan.json"], work)
            study = storage.load_study(approach, f"sqlite:///{work}/studies/tinyopt.db")
            actual = Actual.of_study(study.get_trials(deepcopy=False))
            rows.append((approach, trials, plan_s, forecast, sweep_s, actual))
            print(f"{approach}: plan {plan_s:.0f} s, forecast {forecast.wall_s:.0f} s, sweep {sweep_s:.0f} s",
                  flush=True)
    print(f"load after: {os.getloadavg()[0]:.1f}")
    print()
    print("| preset | trials | plan took | forecast wall | actual wall | actual/forecast | forecast s/trial "
          "| actual s/trial | forecast epochs/trial | actual epochs/trial |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for approach, trials, plan_s, forecast, sweep_s, actual in rows:
        print(f"| {approach} | {trials} | {plan_s:.0f} s | {forecast.wall_s:.0f} s | {sweep_s:.0f} s "
              f"| {sweep_s / forecast.wall_s:.2f}x | {forecast.trial_s:.1f} | {actual.trial_s:.1f} "
              f"| {forecast.epochs_per_trial:.2f} | {actual.epochs_per_trial:.2f} |")


if __name__ == "__main__":
    main()
