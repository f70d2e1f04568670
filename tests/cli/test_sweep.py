"""`tinyopt sweep`: --preset checked as a usage error, merged before --config and --set, passed on to workers."""

from __future__ import annotations

from click.testing import CliRunner

from tinyopt.cli import cli


def test_unknown_preset_is_a_one_line_usage_error_naming_the_presets():
    for approach, preset, fragment in (("scratch", "nosuch", "unknown preset 'nosuch'; presets: "),
                                       ("ensemble", "cpu", "preset 'cpu' has no ensemble config")):
        result = CliRunner().invoke(cli, ["sweep", approach, "--preset", preset, "--trials", "1"])
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and fragment in lines[0] and "--preset" in lines[0] and "cpu" in lines[0], lines


def test_sweep_preset_comes_before_config_and_set_and_reaches_the_workers(tmp_path, monkeypatch):
    import importlib
    from types import SimpleNamespace

    from tinyopt.core.config import load_config
    from tinyopt.sweep import runner
    from tinyopt.sweep.workers import SweepArgs, _worker_command

    seen = {}

    def run_sweep(approach, **kwargs):
        seen["config"] = load_config(approach, kwargs["config_path"], kwargs["overrides"], preset=kwargs["preset"])
        return SimpleNamespace(exit_code=0, top=[], counts={"COMPLETE": 0, "PRUNED": 0, "FAIL": 0}, notes=[],
                               recovered=[], interrupted=None, new_trials=0, storage="-", ui_command="-",
                               study_name=approach)

    # The command's module may hold run_sweep by name, or import it from the runner when it runs.
    monkeypatch.setattr(runner, "run_sweep", run_sweep)
    monkeypatch.setattr(importlib.import_module("tinyopt.cli.sweep"), "run_sweep", run_sweep, raising=False)
    mine = tmp_path / "mine.toml"
    mine.write_text('[train]\nmixed_precision = "off"\n')
    result = CliRunner().invoke(cli, ["sweep", "scratch", "--preset", "cpu", "--config", str(mine),
                                      "--set", "space.stages=2", "--trials", "1"])
    assert result.exit_code == 0, result.output
    config = seen["config"]
    assert config.train.mixed_precision == "off" and config.space["stages"] == 2
    assert config.train.early_stopping_patience == 3  # sweeps/cpu/scratch.toml; the default is 5
    command = _worker_command(SweepArgs("scratch", 1, config_path=str(mine), preset="cpu"), 1, None)
    assert command[command.index("--preset") + 1] == "cpu" and command[command.index("--config") + 1] == str(mine)


def test_the_progress_shows_the_time_left_from_the_forecast_then_from_the_trials(monkeypatch):
    import io

    from rich.console import Console
    from rich.progress import Progress

    from tinyopt.cli import sweep as command

    clock = [1000.0]
    monkeypatch.setattr(command.time, "monotonic", lambda: clock[0])
    with Progress(console=Console(file=io.StringIO()), transient=True) as progress:
        events = command._RichEvents(progress, trials=4, timeout=None, expected=30.0)
        eta = lambda: progress.tasks[events.trials].fields["eta"]  # noqa: E731
        events.sweep_started("cpu", [])
        assert eta() == "about 2m 00s left"  # 4 trials of the forecast's 30 s
        events.trial_started(0, epochs=2)
        clock[0] += 10.0
        events.epoch_ended(0, 0, {})
        assert eta() == "about 1m 50s left"  # the running trial has done 10 s of its 30
        clock[0] += 10.0
        events.trial_ended(0, "COMPLETE", 0.5, None)
        assert eta() == "about 1m 00s left"  # 3 trials at the 20 s the first one took
        bounded = command._RichEvents(progress, trials=4, timeout=45.0, expected=30.0)
        bounded.sweep_started("cpu", [])
        assert progress.tasks[bounded.trials].fields["eta"] == "about 45s left"  # never past --timeout
        unknown = command._RichEvents(progress, trials=4)
        unknown.sweep_started("cpu", [])
        assert progress.tasks[unknown.trials].fields["eta"] == ""  # nothing tells yet
