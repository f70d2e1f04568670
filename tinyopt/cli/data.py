"""``tinyopt data``: prepare and inspect the Tiny ImageNet cache."""

from __future__ import annotations

import click

from tinyopt.cli.options import cache_option, data_option
from tinyopt.core.urls import redact


@click.group()
def data() -> None:
    """Prepare and inspect the Tiny ImageNet cache."""


@data.command()
@data_option
@cache_option
@click.option("--skip-bad", is_flag=True, help="Skip and count undecodable images instead of failing on them.")
@click.option("--selection-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.1,
              show_default=True, help="Share of each train class held out as the selection split.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the selection split.")
@click.option("--md5", default=None,
              help="Expected md5 of the zip (the official URL's is built in); a mismatch is an error.")
@click.option("--force", is_flag=True, help="Rebuild the cache even when it holds this source, intact.")
def prepare(source, cache_dir, skip_bad, selection_fraction, seed, md5, force) -> None:
    """Download or read Tiny ImageNet, verify it and decode it once into the cache.

    Running it again with the same source and options does nothing while the cache is intact, and
    rebuilds a damaged one; an interrupted run resumes its download and leaves any earlier cache intact.
    """
    # numpy and the cache: only the commands that use them pay their import
    from tinyopt.data import build
    from tinyopt.data import cache as dataset


    cache = build.prepare(source, cache_dir, skip_bad=skip_bad, selection_fraction=selection_fraction,
                            seed=seed, md5=md5, force=force)
    _show(dataset.info(cache, checksums=False))  # prepare has just checked or written every byte


@data.command()
@cache_option
def info(cache_dir) -> None:
    """Check the cache and show classes, split sizes, bytes on disk, cache path and source fingerprint.

    A damaged cache (a file missing, truncated or changed since it was prepared) is an error that
    names the file and the command that rebuilds it.
    """
    from tinyopt.data import cache as dataset


    _show(dataset.info(cache_dir))


def _show(summary: dict) -> None:
    from rich.console import Console
    from rich.filesize import decimal
    from rich.table import Table


    table = Table(title="Tiny ImageNet cache", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("classes", f"{summary['classes']:,}")
    for split, count in summary["splits"].items():
        table.add_row(f"{split} images", f"{count:,}")
    table.add_row("skipped images", f"{summary['skipped']:,}")
    table.add_row("bytes on disk", f"{decimal(summary['bytes'])} ({summary['bytes']:,} B)")
    table.add_row("cache", summary["cache"])
    table.add_row("source", redact(summary["source"]))
    table.add_row("fingerprint", summary["fingerprint"])
    table.add_row("options", ", ".join(f"{key}={value}" for key, value in summary["options"].items()))
    table.add_row("created", summary["created"])
    Console().print(table)
