"""Training speed of the scratch CPU preset's CNN: Keras' batch norm or the fused one, float32 or bfloat16.

The preset's first trial (`sweeps/cpu/scratch.toml` defaults: width 32, flips, batch 128) trains on
random uint8 images in four variants, built alike but for the batch normalisation layer
(`keras.layers.BatchNormalization`, or `tinyopt.models.blocks.FusedBatchNormalization`) and the
dtype policy. The variants take turns, `--repeats` rounds of `--steps` training steps each after a
warm-up, so that the machine's slow spells fall on all of them; printed: each variant's median
images per second and its ratio to Keras' batch norm in float32 (what a hand-written Keras model gets).

    python benchmarks/bench_scratch_speed.py [--steps 40] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

VARIANTS = (("keras batch norm", "float32"), ("fused batch norm", "float32"),
            ("keras batch norm", "mixed_bfloat16"), ("fused batch norm", "mixed_bfloat16"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps a round")
    parser.add_argument("--repeats", type=int, default=5, help="rounds per variant, taken in turns")
    args = parser.parse_args()

    import keras
    import numpy as np

    from tinyopt.core import space
    from tinyopt.core.config import load_config, sweeps_dir
    from tinyopt.models import blocks
    from tinyopt.models.approaches import scratch
    from tinyopt.train import training

    params = space.defaults(load_config("scratch", sweeps_dir() / "cpu" / "scratch.toml").space)
    batch = int(params["batch_size"])
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch * args.steps, 64, 64, 3), dtype=np.uint8)
    labels = rng.integers(0, 200, len(images))
    wnids = [f"n{i:08d}" for i in range(200)]
    fused = blocks.FusedBatchNormalization
    models = {}
    try:
        for norm, policy in VARIANTS:
            keras.mixed_precision.set_global_policy(policy)
            keras.utils.set_random_seed(0)
            # The class the builder makes its batch norm layers of, for this variant.
            blocks.FusedBatchNormalization = fused if norm.startswith("fused") else keras.layers.BatchNormalization
            model = scratch.build(params, model={"weights": "none"}, wnids=wnids)
            training.compile_model(model, params)
            model.fit(images[: batch * 4], labels[: batch * 4], batch_size=batch, epochs=1, verbose=0)  # warm-up
            models[(norm, policy)] = model
    finally:
        blocks.FusedBatchNormalization = fused
        keras.mixed_precision.set_global_policy("float32")
    rates: dict[tuple[str, str], list[float]] = {variant: [] for variant in VARIANTS}
    for _ in range(args.repeats):
        for variant in VARIANTS:
            started = time.perf_counter()
            models[variant].fit(images, labels, batch_size=batch, epochs=1, verbose=0, shuffle=False)
            rates[variant].append(len(images) / (time.perf_counter() - started))
    reference = statistics.median(rates[VARIANTS[0]])
    print(f"{args.repeats} rounds of {args.steps} steps of batch {batch}, in turns; median images/s:")
    for variant, found in rates.items():
        median = statistics.median(found)
        print(f"  {variant[0]:17s} {variant[1]:15s} {median:7.0f} images/s  {median / reference:4.2f}x  "
              f"(rounds: {', '.join(f'{r:.0f}' for r in found)})")


if __name__ == "__main__":
    main()
