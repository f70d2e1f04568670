"""``tinyopt best | predict | report | ui``: what the sweeps found, as tables, bundles, plots."""

from __future__ import annotations

import json

import click

from tinyopt.cli.options import cache_option, data_option, storage_options
from tinyopt.core import record
from tinyopt.core.errors import TinyoptError
from tinyopt.core.urls import redact, sqlite_path
from tinyopt.results.bundle import check_destination
from tinyopt.stores import servers
from tinyopt.stores.storage import open_existing


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _params_text(best) -> str:
    if best.members:
        return ", ".join(f"{m.label}={m.weight:.3f}"
                         + (f" (temperature {m.temperature:.3g})" if m.temperature is not None else "")
                         for m in best.members)
    return ", ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                     for key, value in best.params.items())


@click.command()
@click.argument("studies", nargs=-1, metavar="[STUDY]...")
@click.option("--export", "export_dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Write the winner (best selection top-1 among the studies) as a model bundle to DIR "
                   "(with --refit, the refit model).")
@click.option("--force", is_flag=True,
              help="Replace the bundle an earlier --export wrote to DIR (a folder holding other files is refused).")
@click.option("--register", "register_name", metavar="NAME", default=None,
              help="Also register the exported model in the MLflow model registry as NAME (needs --export).")
@click.option("--refit", is_flag=True,
              help="Retrain the winner's configuration (a finetune or scratch study) on train + selection for the "
                   "epochs its trial's early stopping chose, log it as a run of its study, and score it on test.")
@data_option
@cache_option
@storage_options
def best(studies, export_dir, force, register_name, refit, source, cache_dir, storage, tracking_uri) -> None:
    """Show the best trial of each study; with --export, write the winner as a bundle.

    STUDY defaults to every study in the storage; a study is named after its approach unless it
    was swept with --study. The bundle (model.keras, classes.tsv, params.json, metrics.json,
    provenance.json, MODEL.md) loads with plain Keras, without tinyopt. --force replaces a
    bundle an earlier export wrote, never a folder holding anything else. --refit retrains the
    winner on the data the sweep used (--data, --cache, as for `tinyopt sweep`) and shows its
    test scores beside its trial's.
    """
    # The library (numpy, and optuna or keras when they run) loads with the command that uses it.
    from rich.console import Console
    from rich.table import Table

    from tinyopt.results.export import export_best
    from tinyopt.results.refit import refit_best
    from tinyopt.results.report import summarize_studies, versus_lines


    if register_name and not export_dir:
        raise click.UsageError("--register needs --export DIR: the registered model is the exported bundle")
    if not refit and (source or cache_dir):
        raise click.UsageError("--data and --cache are for --refit: the data it retrains on")
    if export_dir:
        check_destination(export_dir, force)  # a refused folder is one line, before the table and any work
    summaries = summarize_studies(storage, studies)
    console = Console()
    table = Table(title="best trial of each study")
    for column in ("study", "trial", "value", "sel top-1", "test top-1", "test top-5"):
        table.add_column(column, justify="left" if column == "study" else "right")
    for s in summaries:
        scores = s.best.scores if s.best else {}
        table.add_row(s.name, str(s.best.number) if s.best else "no complete trial",
                      _score(s.best.value if s.best else None),
                      *[_score(scores.get(key)) for key in (record.SELECTION_TOP1, record.TEST_TOP1, record.TEST_TOP5)])
    console.print(table)
    # Params and run ids are long: one line each below the table, wrapped by the terminal, never folded.
    for s in summaries:
        if s.best:
            label = "weights" if s.best.members else "params"
            console.print(f"[bold]{s.name}[/] MLflow run {s.best.run_id or '-'}; {label}: {_params_text(s.best)}",
                          highlight=False, soft_wrap=True)
            for line in versus_lines(s.best):
                console.print(f"  {line}", highlight=False, soft_wrap=True)
    if not export_dir and not refit:
        return
    ranked = [s for s in summaries if s.best is not None]
    if not ranked:
        raise TinyoptError(f"no study has a complete trial to {'refit' if refit else 'export'}; "
                           "run `tinyopt sweep APPROACH` first")
    winner = max(ranked, key=lambda s: s.best.scores.get(record.SELECTION_TOP1, float("-inf")))
    if refit:
        done = refit_best(winner, storage_url=storage, tracking_uri=tracking_uri, source=source, cache_dir=cache_dir,
                          export_dir=export_dir, overwrite=force,
                          echo=lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True))
        _render_refit(console, done)
        bundle, run_id = done.bundle, done.run_id
    else:
        with console.status(f"exporting {winner.name} trial {winner.best.number}"):
            bundle = export_best(winner, export_dir, storage_url=storage, tracking_uri=tracking_uri,
                                 overwrite=force)
        console.print(f"exported [bold]{winner.name}[/] trial {winner.best.number} to {bundle}", highlight=False)
        run_id = winner.best.run_id
    if register_name:
        from tinyopt.track import store

        version = store.register_model(bundle, register_name, tracking_uri, run_id=run_id)
        console.print(f"registered as {register_name} version {version}", highlight=False)


def _render_refit(console, done) -> None:
    """The trial and its refit side by side, the refit's MLflow run and its bundle."""
    from rich.table import Table

    table = Table(title=f"{done.study} trial {done.trial} and its refit (test scores)")
    for column in ("", f"trial {done.trial}", "refit"):
        table.add_column(column, justify="right" if column else "left")
    table.add_row("trained on", "train", "train + selection")
    table.add_row("images", str(done.trial_train_images), str(done.train_images))
    table.add_row("epochs", f"{done.trial_epochs}, kept epoch {done.epochs}", str(done.epochs))
    for key in (record.TEST_TOP1, record.TEST_TOP5):
        label = record.SCORE_LABELS[key]
        table.add_row(label, _score(done.trial_scores.get(key)), _score(done.scores.get(key)))
    console.print(table)
    console.print(f"refit MLflow run {done.run_id}: {done.run_url}", highlight=False, soft_wrap=True)
    if done.bundle:
        console.print(f"exported the refit of [bold]{done.study}[/] trial {done.trial} to {done.bundle}",
                      highlight=False)


@click.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False), metavar="IMAGE...")
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True, help="Classes shown per image.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def predict(bundle, images, top, as_json) -> None:
    """Classify IMAGE files with the model bundle in BUNDLE (written by `tinyopt best --export`).

    Images of any size are converted to RGB and resized (bilinear) to the model's input.
    """
    from tinyopt.results.predict import predict_images


    results = predict_images(bundle, images, top=top)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in results], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for result in results:
        # The path goes above the table: as its title it would wrap at the table's width.
        console.print(f"[bold]{result.path}[/]", highlight=False, soft_wrap=True)
        table = Table()
        for column, justify in (("#", "right"), ("wnid", "left"), ("class", "left"), ("probability", "right")):
            table.add_column(column, justify=justify)
        for rank, (wnid, name, probability) in enumerate(result.top, start=1):
            table.add_row(str(rank), wnid, name, f"{probability:.4f}")
        console.print(table)


@click.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="report", show_default=True,
              help="Folder for report.md, report.json and the PNG plots.")
@storage_options
def report(out_dir, storage, tracking_uri) -> None:
    """Compare the studies: best scores, ensemble gains, trial counts, compute time, plots.

    Writes the report to --out and logs it to MLflow (experiment tinyopt/report).
    """
    from rich.console import Console
    from rich.table import Table

    from tinyopt.results.report import format_seconds, gain_label, versus_lines, write_report


    console = Console()
    with console.status("reading the studies and drawing the plots"):
        result = write_report(storage, tracking_uri, out_dir)
    table = Table(title="studies side by side (test scores are only reported)")
    for column in ("study", "trial", "sel\ntop-1", "sel\ntop-5", "test\ntop-1", "test\ntop-5", "trials\nc/p/f",
                   "compute"):
        table.add_column(column, justify="left" if column == "study" else "right")
    for s in result.summaries:
        scores = [_score(s.best.scores.get(key) if s.best else None) for key in record.SCORES]
        counts = "/".join(str(s.counts[state]) for state in ("COMPLETE", "PRUNED", "FAIL"))
        table.add_row(s.name, str(s.best.number) if s.best else "-", *scores, counts,
                      format_seconds(s.compute_seconds))
    console.print(table)
    for s in result.summaries:
        for line in versus_lines(s.best) if s.best else []:
            console.print(f"{s.name} {line}", highlight=False, soft_wrap=True)
        for key, value in (s.best.gains() if s.best else {}).items():
            console.print(f"{s.name}: {gain_label(key)} {value:+.4f}", highlight=False)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    console.print(f"wrote {len(result.files)} files to {out_dir}; MLflow run {result.mlflow_run_id}", highlight=False)


@click.command()
@storage_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the servers listen on.")
@click.option("--port", type=int, default=5000, show_default=True, help="Port of the MLflow UI.")
@click.option("--dashboard", is_flag=True, help="Also start optuna-dashboard on the --storage studies.")
@click.option("--dashboard-port", type=int, default=8080, show_default=True, help="Port of optuna-dashboard.")
def ui(storage, tracking_uri, host, port, dashboard, dashboard_port) -> None:
    """Start the MLflow UI on the tracking store and print the link to each study's runs table.

    The table lists the parent run, with the best selection top-1 so far, then every trial; a
    run's page has its metric charts and plots. With --dashboard, optuna-dashboard runs beside it
    on the Optuna studies. Ctrl-C (or SIGTERM) stops both and exits 0: it is how a UI session ends.
    """



    local = sqlite_path(tracking_uri)
    if local is None:
        raise TinyoptError(f"{redact(tracking_uri)} is an MLflow server: open it in a browser")
    if not local.is_file():
        raise TinyoptError(f"no MLflow store at {local}; "
                           "run `tinyopt sweep APPROACH` first or pass --tracking-uri")
    if dashboard and dashboard_port == port:
        raise click.UsageError(f"--dashboard-port and --port are both {port}: give each server its own")
    servers.check_free(host, port, "--port")
    if dashboard:
        servers.check_free(host, dashboard_port, "--dashboard-port")
        open_existing(storage)  # a missing or unreachable storage is an error now, not a dashboard that dies
    from tinyopt.track import views

    # Before the server starts: a store that cannot be read fails at once, not once the server is up.
    studies = views.experiment_urls(tracking_uri, f"http://{host}:{port}")
    try:
        with servers.running() as running:
            lines = [f"MLflow UI on {running.mlflow(tracking_uri, host, port)}; the runs of each study:"]
            width = max((len(name) for name, _ in studies), default=0)
            lines += [f"  {name:<{width}}  {url}" for name, url in studies] or ["  none yet: run `tinyopt sweep`"]
            if dashboard:
                lines.append(f"optuna-dashboard on {running.dashboard(storage, host, dashboard_port)}")
            lines.append("Ctrl-C stops " + ("them" if dashboard else "it"))
            click.echo(redact("\n".join(lines)))
            running.wait()
    except KeyboardInterrupt:
        click.echo("stopped")


COMMANDS = [best, predict, report, ui]
