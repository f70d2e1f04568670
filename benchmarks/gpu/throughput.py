"""ResNet50 training throughput (images/s) with and without mixed precision and XLA, side by side.

Random weights and random uint8 images made in memory, so it needs no download. Each setting builds
a fresh ``keras.applications.ResNet50`` behind a uint8 input (as tinyopt's models take images),
compiles it, runs ``--warmup`` untimed steps (tracing, XLA compilation, autotuning), then times
``--steps`` calls of ``train_on_batch``. ``train_on_batch`` returns the loss as a host value, so every
timed step has finished on the device when its call returns; ``fit`` would add callbacks, a progress
bar and epoch ends to the timing. Mixed precision is ``mixed_bfloat16`` where the GPU has bf16
(compute capability 8.0 and up) or on a CPU, ``mixed_float16`` (with loss scaling) on older GPUs.

    python benchmarks/gpu/throughput.py [--sizes 224,128] [--batch 256] [--steps 20] [--warmup 5]
        [--precision both|float32|mixed] [--xla both|on|off|auto] [--classes 1000]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def _sizes(text: str) -> list[int]:
    sizes = [int(part) for part in text.split(",") if part.strip()]
    if not sizes or min(sizes) < 32:
        raise argparse.ArgumentTypeError(f"expected sizes of at least 32 px separated by commas, got {text!r}")
    return sizes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=_sizes, default=[224, 128], help="image sides in px, e.g. 224,128")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="timed train steps per setting")
    parser.add_argument("--warmup", type=int, default=5, help="untimed train steps before timing")
    parser.add_argument("--precision", choices=("both", "float32", "mixed"), default="both")
    parser.add_argument("--xla", choices=("both", "on", "off", "auto"), default="both",
                        help="model.compile(jit_compile=...); auto: what Keras picks (on under JAX and on a GPU)")
    parser.add_argument("--classes", type=int, default=1000)
    args = parser.parse_args(argv)
    if min(args.batch, args.steps, args.warmup) < 1:
        parser.error("--batch, --steps and --warmup must be at least 1 (the first step compiles)")
    return args


def device() -> tuple[str, tuple[int, int] | None]:
    """The device training runs on and its CUDA compute capability (None for a CPU)."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        first = jax.devices()[0]
        if first.platform != "gpu":
            return f"cpu ({os.cpu_count()} cores)", None
        major, minor = (int(part) for part in first.compute_capability.split("."))
        return first.device_kind, (major, minor)
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return f"cpu ({os.cpu_count()} cores)", None
    details = tf.config.experimental.get_device_details(gpus[0])
    return details.get("device_name", "gpu"), details.get("compute_capability")


def mixed_policy(capability: tuple[int, int] | None) -> str:
    """bf16 where the hardware has it (Ampere and later, CPUs); float16 with loss scaling before."""
    return "mixed_float16" if capability is not None and tuple(capability) < (8, 0) else "mixed_bfloat16"


def build(size: int, classes: int):
    import keras

    images = keras.Input((size, size, 3), dtype="uint8", name="images")
    pixels = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(images)
    # Logits out, softmax inside the loss in float32: the usual way to keep mixed precision stable.
    return keras.applications.ResNet50(weights=None, input_tensor=pixels, classes=classes, classifier_activation=None)


def measure(size: int, batch: int, steps: int, warmup: int, policy: str, xla: bool, classes: int
            ) -> tuple[float, float]:
    """Train steps of a fresh ResNet50; return (images/s over the timed steps, seconds of warm-up)."""
    import keras

    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy(policy)
    model = build(size, classes)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=xla)
    rng = np.random.default_rng(0)
    # Two batches taken in turn: each step copies its images to the device, as real training does.
    batches = [(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
                rng.integers(0, classes, batch)) for _ in range(2)]
    started = time.perf_counter()
    for step in range(warmup):
        model.train_on_batch(*batches[step % 2])
    warm = time.perf_counter() - started
    started = time.perf_counter()
    for step in range(steps):
        loss = model.train_on_batch(*batches[step % 2])
    elapsed = time.perf_counter() - started
    if not np.isfinite(loss):
        raise SystemExit(f"ResNet50 at {size} px, {policy}, XLA {'on' if xla else 'off'}: the loss is {loss}")
    return batch * steps / elapsed, warm


def _column(policy: str, xla: bool) -> str:
    return f"{policy}{' + XLA' if xla else ''}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import keras

    backend = keras.backend.backend()
    name, capability = device()
    cc = f", compute capability {capability[0]}.{capability[1]}" if capability else ""
    print(f"device: {name}{cc}; Keras {keras.__version__}, backend {backend}", flush=True)
    policies = {"both": ["float32", mixed_policy(capability)], "float32": ["float32"],
                "mixed": [mixed_policy(capability)]}[args.precision]
    xla_settings = {"both": [False, True], "on": [True], "off": [False],
                    "auto": [backend == "jax" or capability is not None]}[args.xla]
    if backend == "jax" and False in xla_settings:
        print("XLA off: not measured under JAX, where jit_compile=False runs every op eagerly from Python "
              "(a debugging mode, not how anyone trains)", flush=True)
        xla_settings = [True]
    if not xla_settings:
        raise SystemExit("nothing to measure: under JAX, pass --xla on or both")
    print(f"ResNet50 training, batch {args.batch}, {args.classes} classes, {args.steps} timed steps after "
          f"{args.warmup} warm-up steps; images/s:", flush=True)
    columns = [(policy, xla) for policy in policies for xla in xla_settings]
    rows = []
    for size in args.sizes:
        rates = []
        for policy, xla in columns:
            rate, warm = measure(size, args.batch, args.steps, args.warmup, policy, xla, args.classes)
            print(f"  {size} px, {_column(policy, xla)}: {rate:,.1f} images/s (warm-up {warm:.1f} s)", flush=True)
            rates.append(rate)
        rows.append((size, rates))
    headers = ["size"] + [_column(policy, xla) for policy, xla in columns]
    widths = [max(len(h), 10) for h in headers]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    for size, rates in rows:
        cells = [f"{size} px"] + [f"{rate:,.1f}" for rate in rates]
        print("  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)))


if __name__ == "__main__":
    main()
