"""The ImageNet-1k class order of Keras ImageNet models, bundled with the package (never downloaded)."""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache
from importlib import resources

from tinyopt.core.errors import DataError


@cache
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ILSVRC-2012 wnids in Keras output order: item k names output k."""
    text = resources.files("tinyopt.data").joinpath("imagenet1k_wnids.txt").read_text()
    return tuple(text.split())


@cache
def _positions() -> dict[str, int]:
    return {wnid: k for k, wnid in enumerate(imagenet_wnids())}


def imagenet_indices(wnids: Iterable[str]) -> list[int]:
    """Map class wnids to the output indices of a Keras ImageNet model.

    Args:
        wnids: class wnids in class-index order (e.g. the 200 Tiny ImageNet classes).

    Returns:
        ``indices[i]`` = the ImageNet-1k output of class ``i``.

    Raises:
        DataError: a wnid is not an ImageNet-1k class.
    """
    positions = _positions()
    wnids = list(wnids)
    unknown = [wnid for wnid in wnids if wnid not in positions]
    if unknown:
        raise DataError(f"{len(unknown)} class wnid(s) are not ImageNet-1k classes (first: {unknown[0]!r}); "
                        "ImageNet classifier outputs need ImageNet classes: use head_init='random' or the "
                        "scratch approach for this dataset")
    return [positions[wnid] for wnid in wnids]
