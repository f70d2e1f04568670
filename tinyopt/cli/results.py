"""``tinyopt best | predict | report | ui``: what the sweeps found, as tables, bundles, plots."""

from __future__ import annotations

import json

import click

from tinyopt.cli.options import cache_option, data_option, storage_options
from tinyopt.core import record
from tinyopt.core.errors import TinyoptError
from tinyopt.core.forecast import format_seconds
from tinyopt.core.urls import redact, sqlite_path
from tinyopt.results import pareto
from tinyopt.results.bundle import check_destination
from tinyopt.stores import servers
from tinyopt.stores.storage import open_existing


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def number_column(table, label: str) -> None:
    """A right-aligned column of numbers (scores, trial numbers), its label wrapped ("selection" over "top-1").

    Narrow on purpose: rich shrinks the columns of a table too wide for the terminal evenly, cutting
    words, so the columns of numbers take what they need and the columns of text wrap in the rest.
    """
    table.add_column(label, justify="right", max_width=max(7, *map(len, label.split(" ", 1))))


def _items(values: dict) -> str:
    """``key=value, ...``: a terminal line breaks between the items, never inside one."""
    return ", ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                     for key, value in values.items())


def _details(best) -> list[tuple[str, str]]:
    """What a best trial ran with, as (label, items): its params, or an ensemble's weights and temperatures."""
    if not best.members:
        return [("params", _items(best.params))]
    details = [("weights", _items({m.label: f"{m.weight:.3f}" for m in best.members}))]
    temperatures = {m.label: f"{m.temperature:.3g}" for m in best.members if m.temperature is not None}
    if temperatures:  # trials recorded before calibration have none
        details.append(("temperatures", _items(temperatures)))
    return details


def _labelled(label: str, text: str, style: str = ""):
    """``label: text``, indented, the text's lines wrapped under its first (at spaces) rather than under the label."""
    from rich.padding import Padding
    from rich.table import Table
    from rich.text import Text

    grid = Table.grid(padding=(0, 1, 0, 0))
    grid.add_column(no_wrap=True)
    grid.add_column()
    grid.add_row(Text(f"{label}:", style), Text(text))  # Text: a param's value may hold brackets, not markup
    return Padding(grid, (0, 0, 0, 2))


def _chosen_by(summaries) -> str:
    """Which objective chose each study's best trial, and which way it is better (studies may differ)."""
    studies: dict[str, list[str]] = {}
    for s in summaries:
        studies.setdefault(s.objective.heading, []).append(s.name)
    if len(studies) == 1:
        return f"best trial by {next(iter(studies))}"
    return "best trial by " + "; by ".join(f"{heading} for {', '.join(names)}" for heading, names in studies.items())


def _versus_table(best, title: str):
    """An ensemble's weighted vote beside its best member alone and the uniform vote of the same members."""
    from rich.table import Table

    from tinyopt.results.report import VERSUS_COLUMNS

    table = Table(title=title)
    table.add_column("")
    for _, label in VERSUS_COLUMNS:
        number_column(table, label)
    for name, found in best.versus():
        table.add_row(name, *[_score(found.get(key)) for key, _ in VERSUS_COLUMNS])
    return table


def _best_table(summaries):
    """One row per study: its best trial's objective, under the objective's name, beside its top-1s."""
    from rich.table import Table

    table = Table(title="best trial of each study", caption=_chosen_by(summaries), caption_justify="left")
    table.add_column("study", no_wrap=True)
    table.add_column("trial", justify="right", no_wrap=True)
    table.add_column("objective")  # studies may differ (an ensemble's log loss): each row names its own
    table.add_column("value", justify="right", no_wrap=True)
    shown = (record.SELECTION_TOP1, record.TEST_TOP1, record.TEST_TOP5)
    for key in shown:
        number_column(table, record.SCORE_LABELS[key])
    for s in summaries:
        scores = s.best.scores if s.best else {}
        table.add_row(s.name, str(s.best.number) if s.best else "-", s.objective.label,
                      _score(s.best.value if s.best else None), *[_score(scores.get(key)) for key in shown])
    return table


def _print_best(console, summary) -> None:
    """A study's best trial below the table: its MLflow run's link, what it ran with, an ensemble's votes."""
    from rich.padding import Padding
    from rich.text import Text

    best = summary.best
    if best is None:
        console.print(Text.assemble((summary.name, "bold"), ": no complete trial"))
        return
    if summary.front:
        _print_front(console, summary)
        return
    run = best.run_url or f"MLflow run {best.run_id or '-'}"  # trials recorded before run links have only the id
    # soft_wrap: a link longer than the line stays one link to click or copy, the terminal wraps it.
    console.print(Text.assemble((summary.name, "bold"), f" trial {best.number}: {run}"), soft_wrap=True)
    for label, text in _details(best):
        console.print(_labelled(label, text))
    if best.members:
        console.print(Padding(_versus_table(best, f"{summary.name} trial {best.number} against its best member and "
                                                  "the uniform vote"), (0, 0, 0, 2)))


def _print_front(console, summary) -> None:
    """A study of several objectives: its Pareto front, where a study of one objective shows its best trial."""
    from rich.padding import Padding
    from rich.table import Table
    from rich.text import Text

    traded = " against ".join(o.label for o in summary.objectives)
    console.print(Text.assemble((summary.name, "bold"), f": Pareto front of {traded}, {len(summary.front)} trials; "
                                f"`tinyopt best {summary.name} --trial N --export DIR` exports one"), soft_wrap=True)
    table = Table()
    for label in pareto.HEADER:
        number_column(table, label)
    for cells in pareto.rows(summary):
        table.add_row(*cells)
    console.print(Padding(table, (0, 0, 0, 2)))


@click.command()
@click.argument("studies", nargs=-1, metavar="[STUDY]...")
@click.option("--export", "export_dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Write the winner (best selection top-1 among the studies) as a model bundle to DIR "
                   "(with --refit, the refit model).")
@click.option("--trial", "trial_number", type=click.IntRange(min=0), default=None, metavar="N",
              help="Export (or refit) trial N of the one STUDY named, instead of the winner: a trial of a Pareto "
                   "front, say.")
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
def best(studies, export_dir, trial_number, force, register_name, refit, source, cache_dir, storage,
         tracking_uri) -> None:
    """Show the best trial of each study; with --export, write the winner as a bundle.

    STUDY defaults to every study in the storage; a study is named after its approach unless it
    was swept with --study. A study of two objectives (study.objectives) shows its Pareto front;
    --trial N exports or refits trial N of one STUDY instead of the winner. The bundle (model.keras,
    classes.tsv, params.json, metrics.json, provenance.json, MODEL.md) loads with plain Keras,
    without tinyopt. --force replaces a
    bundle an earlier export wrote, never a folder holding anything else. --refit retrains the
    winner on the data the sweep used (--data, --cache, as for `tinyopt sweep`) and shows its
    test scores beside its trial's.
    """
    # The library (numpy, and optuna or keras when they run) loads with the command that uses it.
    from rich.console import Console

    from tinyopt.results.export import export_best
    from tinyopt.results.refit import refit_best
    from tinyopt.results.report import summarize_studies


    if register_name and not export_dir:
        raise click.UsageError("--register needs --export DIR: the registered model is the exported bundle")
    if not refit and (source or cache_dir):
        raise click.UsageError("--data and --cache are for --refit: the data it retrains on")
    if trial_number is not None and (len(studies) != 1 or not (export_dir or refit)):
        raise click.UsageError("--trial N needs one STUDY and --export DIR (or --refit): the study whose trial N to "
                               "use, e.g. `tinyopt best finetune --trial 3 --export DIR`")
    if export_dir:
        check_destination(export_dir, force)  # a refused folder is one line, before the table and any work
    summaries = summarize_studies(storage, studies)
    # A trial that cannot be exported is one line too, before the table.
    picked = None if trial_number is None else pareto.pick_trial(storage, summaries[0], trial_number)
    console = Console()
    console.print(_best_table(summaries))
    for s in summaries:
        _print_best(console, s)
    if not export_dir and not refit:
        return
    ranked = [s for s in summaries if s.best is not None]
    if not ranked:
        raise TinyoptError(f"no study has a complete trial to {'refit' if refit else 'export'}; "
                           "run `tinyopt sweep APPROACH` first")
    winner = picked or max(ranked, key=lambda s: s.best.scores.get(record.SELECTION_TOP1, float("-inf")))
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

    from tinyopt.results.report import gain_label, write_report


    console = Console()
    with console.status("reading the studies and drawing the plots"):
        result = write_report(storage, tracking_uri, out_dir)
    # Two tables: the scores and the trial counts side by side would not fit 80 columns.
    scores = Table(title="best trial of each study (test scores are only reported)",
                   caption=_chosen_by(result.summaries), caption_justify="left")
    scores.add_column("study", no_wrap=True)
    number_column(scores, "best trial")
    for key in record.SCORES:
        number_column(scores, record.SCORE_LABELS[key])
    trials = Table(title="trials of each study")
    trials.add_column("study", no_wrap=True)
    for column in (*_COUNTED.values(), "compute"):
        trials.add_column(column, justify="right", no_wrap=True)
    for s in result.summaries:
        scores.add_row(s.name, str(s.best.number) if s.best else "-",
                       *[_score(s.best.scores.get(key) if s.best else None) for key in record.SCORES])
        trials.add_row(s.name, *[str(s.counts[state]) for state in _COUNTED], format_seconds(s.compute_seconds))
    console.print(scores)
    console.print(trials)
    for s in result.summaries:
        if not (s.best and s.best.members):
            continue
        console.print(_versus_table(s.best, f"{s.name} trial {s.best.number} against its best member and the "
                                            "uniform vote"))
        gains = ", ".join(f"{gain_label(key)} {value:+.4f}" for key, value in s.best.gains().items())
        console.print(_labelled("gains", gains))
        for line in result.members.get(s.name, []):
            console.print(_labelled("note", line, style="yellow"))
    for note in result.notes:
        console.print(_labelled("note", note, style="yellow"))
    console.print(f"wrote {len(result.files)} files to {out_dir}; MLflow run {result.mlflow_run_id}", highlight=False)


_COUNTED = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}


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
