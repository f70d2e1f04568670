"""Shared by the benchmarks that run whole CPU-preset sweeps on the dev zip: their options and their folders."""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def parser(description: str) -> argparse.ArgumentParser:
    """``--trials``, ``--seed``, ``--data``, ``--weights`` and ``--keep``; a script adds its own."""
    options = argparse.ArgumentParser(description=description)
    options.add_argument("--trials", type=int, default=10)
    options.add_argument("--seed", type=int, default=0)
    options.add_argument("--data", default=str(SHARED / "tiny-imagenet-200-dev.zip"))
    options.add_argument("--weights", default=str(SHARED / "mobilenet_2_5_128_tf.h5"))
    options.add_argument("--keep", default=None, help="keep the stores in this folder (default: a temporary one)")
    return options


@contextlib.contextmanager
def folders(args: argparse.Namespace) -> Iterator[tuple[Path, Path]]:
    """The folder of the stores (``--keep`` or a temporary one) and a data cache prepared from ``--data``."""
    from tinyopt.data import build

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.keep or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        cache = Path(tmp) / "data"
        build.prepare(args.data, cache, progress=False)
        yield workdir, cache
