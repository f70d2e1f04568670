"""`tinyopt ui` on a store made by real sweeps: what a person sees in the MLflow UI, and optuna-dashboard.

The browser test drives Debian's Chromium (/usr/bin/chromium, never a downloaded browser) through
Playwright, and saves a screenshot of every page it checks in ``$TINYOPT_TEST_ARTIFACTS/ui``
(default: ``test-artifacts/ui`` in the repository).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from pathlib import Path

import optuna
import psutil
import pytest
from click.testing import CliRunner
from sweep_helpers import SMALL, failing_build, runs_of

from tinyopt.cli import cli
from tinyopt.core import record
from tinyopt.core.objective import of_study
from tinyopt.stores import servers
from tinyopt.sweep import runner
from tinyopt.track.names import DEFAULT_UI

CHROMIUM = Path("/usr/bin/chromium")
REPOSITORY = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("TINYOPT_TEST_ARTIFACTS") or REPOSITORY / "test-artifacts") / "ui"
TRIALS = {"pretrained": 2, "scratch": 10, "ensemble": 8}
FAILED, PRUNED = 1, 2  # scratch trial numbers
# What MLflow 3 shows of a run or an experiment in its GenAI layout, which tinyopt's links must never open.
GENAI = re.compile(r"Evaluation runs|Evaluations")
EPOCHS = 2  # of a scratch trial (SMALL)
PAGE_TIMEOUT_MS = 60_000  # the UI renders in a second or two; a loaded CI machine may take much longer


@pytest.fixture(scope="module")
def store(tiny_folder, mobilenet_weights_or_none, tmp_path_factory):
    """Three studies swept for real: pretrained (the CPU preset, 2 trials), scratch (10: a failed one, a
    pruned one) and the ensemble of their best trials (8 trials, its objective the selection log loss).

    The pretrained trials run the real MobileNet ImageNet weights when ../shared/data has them.
    """
    root = tmp_path_factory.mktemp("ui_store")
    stores = {"storage": f"sqlite:///{root}/studies.db", "tracking_uri": f"sqlite:///{root}/mlruns/mlflow.db"}
    settings = {
        "pretrained": {"config_path": str(REPOSITORY / "sweeps" / "cpu" / "pretrained.toml"),
                       "overrides": (f"model.weights={mobilenet_weights_or_none}",
                                     "train.eval_batch_size=32")},
        # The learning rate searched, so that the parallel-coordinates chart has a param that varies.
        "scratch": {"overrides": tuple(o for o in SMALL["scratch"] if not o.startswith("space.learning_rate"))},
        "ensemble": {"overrides": ('ensemble.studies=["pretrained", "scratch"]', "ensemble.top_k=3")},
    }
    with pytest.MonkeyPatch.context() as patch:
        failing_build(patch, lambda number: number == FAILED)
        patch.setattr(optuna.trial.Trial, "should_prune", lambda trial: trial.number == PRUNED)
        for approach, trials in TRIALS.items():
            runner.run_sweep(approach, trials=trials, source=str(tiny_folder), cache_dir=str(root / "cache"),
                             progress=False, **settings[approach], **stores)
    states = [t.state.name for t in optuna.load_study(study_name="scratch", storage=stores["storage"]).trials]
    assert states == ["COMPLETE", "FAIL", "PRUNED"] + ["COMPLETE"] * 7
    return stores


class UI:
    """A ``tinyopt ui`` process, its output read line by line in the background."""

    def __init__(self, args):
        self.process = subprocess.Popen([sys.executable, "-m", "tinyopt", "ui", *map(str, args)], text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.output: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def wait_ready(self) -> str:
        """Its output up to the line that says the servers run."""
        deadline = time.monotonic() + servers.READY_TIMEOUT + 60
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            except queue.Empty:
                break
            if line is None:
                pytest.fail(f"tinyopt ui ended (exit code {self.process.wait()}):\n{''.join(self.output)}")
            self.output.append(line)
            if line.startswith("Ctrl-C stops"):
                return "".join(self.output)
        pytest.fail(f"tinyopt ui printed no URLs in time:\n{''.join(self.output)}")

    def interrupt(self) -> tuple[int, str]:
        """Ctrl-C; its exit code and its whole output."""
        self.process.send_signal(signal.SIGINT)
        code = self.process.wait(timeout=2 * servers.STOP_TIMEOUT + 30)
        while (line := self._lines.get(timeout=10)) is not None:
            self.output.append(line)
        return code, "".join(self.output)

    def kill(self) -> None:
        """Kill it and its servers, after a failure."""
        with contextlib.suppress(psutil.NoSuchProcess):
            for process in [*psutil.Process(self.process.pid).children(recursive=True), self.process]:
                with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                    process.kill()
        self.process.wait()


@contextlib.contextmanager
def tinyopt_ui(*args, ports):
    """Run ``tinyopt ui ARGS`` in the body, then check that Ctrl-C stops it and its servers, and frees ``ports``."""
    ui = UI(args)
    try:
        text = ui.wait_ready()
        started = psutil.Process(ui.process.pid).children(recursive=True)
        yield text
    except BaseException:
        ui.kill()
        raise
    code, output = ui.interrupt()
    assert code == 0 and output.rstrip().endswith("stopped") and "Traceback" not in output, output
    _, alive = psutil.wait_procs(started, timeout=10)
    assert not alive, f"server processes left running: {alive}"
    for port in ports:
        servers.check_free("127.0.0.1", port, "--port")


def _study_urls(text: str) -> dict[str, str]:
    return dict(re.findall(r"^\s+(tinyopt/\S+)\s+(http://\S+)$", text, re.M))


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _numbers(text: str) -> list[float]:
    return [float(token) for token in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", text)]


def _browser():
    """Playwright's Chromium, or a skip that says what is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright is not installed: pip install -e '.[dev]'")
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (.ci/run does)")
    return sync_playwright


def test_the_mlflow_ui_shows_each_study_and_its_trials(store, free_port, monkeypatch):
    sync_playwright = _browser()
    # Playwright's driver then copies Chromium's own output to its stderr, which pytest shows when this fails.
    monkeypatch.setenv("DEBUG", "pw:browser")
    port = free_port()
    with tinyopt_ui("--tracking-uri", store["tracking_uri"], "--port", port, ports=[port]) as text:
        urls = _study_urls(text)
        assert sorted(urls) == sorted(f"tinyopt/{study}" for study in TRIALS), text
        with sync_playwright() as playwright:
            try:
                _walk_the_ui(playwright, store, port, urls)
            except BrowserEnded as ended:
                # Chromium itself ended under the test (once in CI, on a loaded machine, the page closed with
                # no check failing): what the UI shows is not in question, so a fresh browser walks it again, once.
                warnings.warn(f"Chromium ended mid-test ({ended}); walking the UI again in a fresh browser",
                              stacklevel=1)
                _walk_the_ui(playwright, store, port, urls)


class BrowserEnded(Exception):
    """Chromium crashed or closed while the test drove it."""


def _walk_the_ui(playwright, store, port, urls):
    """Every check of the MLflow UI, in one fresh browser."""
    from playwright.sync_api import Error, expect

    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
    ended = []
    browser.on("disconnected", lambda _: ended.append("the browser disconnected"))
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.on("crash", lambda _: ended.append("the page crashed"))
    # MLflow's GenAI pages may open an onboarding popover ("Detect Issues in Your Traces") over the
    # whole page, a while after they load: a person closes it, and so does the test, whenever it shows.
    got_it = page.get_by_role("button", name="Got it")
    page.add_locator_handler(got_it, lambda: got_it.click())
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    expect.set_options(timeout=PAGE_TIMEOUT_MS)
    try:
        # A fresh browser, with no layout chosen yet: every link tinyopt writes opens model training.
        for study in TRIALS:
            _check_runs_table(page, expect, urls[f"tinyopt/{study}"], *_runs(store, study))
        for study in ("scratch", "ensemble"):
            _check_stored_links(page, expect, port, *_runs(store, study))
            _check_chart_view(page, expect, urls[f"tinyopt/{study}"], *_runs(store, study))
        # MLflow 3.17 opens a run clicked inside the UI in the layout last chosen with the switch at
        # the top of its sidebar (kept in the browser), not the link's: a person chooses it once.
        _choose_model_training(page, urls["tinyopt/scratch"])
        for study in ("scratch", "ensemble"):
            _check_parent_run(page, expect, urls[f"tinyopt/{study}"], *_runs(store, study))
        _check_trial_run(page, expect, urls["tinyopt/scratch"], *_runs(store, "scratch"))
        _check_pruned_run(page, expect, urls["tinyopt/scratch"], *_runs(store, "scratch"))
    except BaseException as error:
        if isinstance(error, Error) and (ended or page.is_closed()):
            raise BrowserEnded("; ".join(ended) or "the page closed") from error
        _failure_shot(page, error)
        raise
    finally:
        browser.close()


def _failure_shot(page, error: BaseException) -> None:
    """A screenshot of the page a check failed on; its own failure a note on the error, never in its place."""
    try:
        _shot(page, "failure")
    except Exception as failed:  # noqa: BLE001 - the check's error is the one to report
        error.add_note(f"(no screenshot of the failure: {failed})")


def _runs(store, study):
    """The study's name, its best trial, its parent run and its trial runs by number."""
    _, [parent], trials = runs_of(store, study)
    return study, optuna.load_study(study_name=study, storage=store["storage"]), parent, trials


def _row(page, run):
    # The grid draws a row's pinned part (its name) and the rest as two rows, each with the run's id.
    return page.locator(f'[row-id="{run.info.run_id}"]')


def _choose_model_training(page, url):
    """Choose the model-training layout with the UI's switch, as a person does once (the browser keeps it)."""
    page.goto(url)
    page.get_by_text("GenAI", exact=True).first.click()
    page.get_by_text("Model training", exact=True).first.click()
    page.wait_for_url(re.compile("workflowType=machine_learning"))


def _check_layout(page, expect):
    """The page is in MLflow's model-training layout, and names no loss "top-1"."""
    expect(page.get_by_text(GENAI)).to_have_count(0)
    body = page.inner_text("body")
    assert not re.search(r"top-1\W{0,3}-\d", body), body


def _check_runs_table(page, expect, url, name, study, parent, trials):
    """The study's link opens its runs table: the parent first, then the trials ranked by the objective."""
    page.goto(url)
    expect(_row(page, parent).get_by_role("link", name=name, exact=True)).to_be_visible()
    assert "/runs" in page.url, page.url
    for number in range(TRIALS[name]):  # the failed and pruned trials too
        expect(_row(page, trials[number]).get_by_role("link", name=re.compile(rf"^t{number} "))).to_be_visible()
    objective = of_study(study)
    for column in (record.RANK, record.final(objective.name), record.final(record.SELECTION_TOP1), record.TAG_BEST):
        header = page.get_by_role("columnheader", name=column, exact=True).first
        expect(header).to_be_visible()
        # Shown whole, not cut to "final_selec..." (MLflow's default width).
        cut = "cell => [...cell.querySelectorAll('*')].some(part => part.scrollWidth > part.clientWidth)"
        assert not header.evaluate(cut), column
    complete = objective.ranked(t for t in study.trials if t.state.name == "COMPLETE")
    order = sorted((int(_row(page, run).first.get_attribute("row-index")), run.info.run_id)
                   for run in [parent, *trials.values()])
    shown = [run_id for _, run_id in order]
    assert shown[:len(complete) + 1] == [parent.info.run_id, *(trials[t.number].info.run_id for t in complete)]
    assert "true" in "\n".join(_row(page, trials[study.best_trial.number]).all_inner_texts()).split()
    _check_layout(page, expect)
    _shot(page, f"{name}-runs")


def _check_parent_run(page, expect, url, name, study, parent, trials):
    """The parent run of a study: its objective by name, its best-so-far chart, its history plot."""
    page.goto(url)
    _row(page, parent).get_by_role("link", name=name, exact=True).click()
    # Its description (the Overview tab): the command, what is searched, the best trial.
    expect(page.get_by_text(f"Sweep of study {name}").first).to_be_visible()
    page.get_by_text("Show more").first.click()
    objective = of_study(study)
    expect(page.get_by_text(f"Best: trial {study.best_trial.number}").first).to_be_visible()
    expect(page.get_by_text(objective.heading).first).to_be_visible()
    _check_layout(page, expect)
    _shot(page, f"{name}-parent-overview")
    page.get_by_role("tab", name="Model metrics").click()
    points = len(study.trials)  # one per trial that ended, once the first one completed (trial 0 did)
    expect(_chart(page, expect, objective.best_metric).locator(".scatterlayer .point")).to_have_count(points)
    _shot(page, f"{name}-parent-metrics")
    _artifact_image(page, expect, record.HISTORY)
    _shot(page, f"{name}-parent-history")


def _check_chart_view(page, expect, url, name, study, parent, trials):
    """The chart view opens on the parallel coordinates of every trial, then the best-so-far line, unasked.

    MLflow hides a parallel-coordinates chart when no run has every param it shows (scratch searches
    conditional params), and draws only the first 10 rows' runs unless told to draw all.
    """
    page.goto(url)
    page.locator("label:has(input[value=CHART])").first.click()
    card = page.get_by_test_id("experiment-view-compare-runs-card")
    expect(card.first.get_by_text("Parallel Coordinates", exact=True)).to_be_visible()
    expect(card.first.get_by_text("Showing all runs")).to_be_visible()
    # Drawn: an axis of a param every trial has (the learning rate the store's scratch searches, a member's
    # weight, cut to "weight...ined-0" on its axis).
    expect(card.first).to_contain_text("learning_rate" if name == "scratch" else "weight")
    expect(card.nth(1).get_by_text(of_study(study).best_metric, exact=True)).to_be_visible()
    expect(card.nth(1).locator(".js-plotly-plot")).to_be_visible()
    _shot(page, f"{name}-charts")


def _check_trial_run(page, expect, url, name, study, parent, trials):
    """The best trial: its per-epoch selection top-1 chart (step = epoch, from 1) and its learning curve."""
    best = study.best_trial.number
    page.goto(url)
    _row(page, trials[best]).get_by_role("link", name=re.compile(rf"^t{best} ")).click()
    _check_layout(page, expect)
    page.get_by_role("tab", name="Model metrics").click()
    chart = _chart(page, expect, record.SELECTION_TOP1)
    expect(chart.locator(".scatterlayer .point")).to_have_count(EPOCHS)
    ticks = chart.locator(".xtick text").all_text_contents()
    assert ticks[0] == "1" and ticks[-1] == str(EPOCHS), ticks
    _shot(page, f"{name}-trial-metrics")
    _artifact_image(page, expect, record.LEARNING_CURVE)
    _shot(page, f"{name}-trial-learning-curve")


def _check_pruned_run(page, expect, url, name, study, parent, trials):
    """A pruned trial's run says it was pruned, after which epoch, by which pruner; it is no failure."""
    page.goto(url)
    _row(page, trials[PRUNED]).get_by_role("link", name=re.compile(rf"^t{PRUNED} ")).click()
    expect(page.get_by_text(re.compile(r"pruned after epoch 1 of \d+ by")).first).to_be_visible()
    assert trials[PRUNED].info.status == "FINISHED"
    _check_layout(page, expect)
    _shot(page, f"{name}-pruned-trial")


def _check_stored_links(page, expect, port, name, study, parent, trials):
    """The links tinyopt stores (the parent's best run, a trial's Optuna user attr) open the model-training layout."""
    def here(url):  # they name tinyopt ui's default address; this one runs on another port
        return url.replace(DEFAULT_UI, f"http://127.0.0.1:{port}")

    best = study.best_trial
    for url in (parent.data.tags[record.TAG_BEST_RUN_URL], best.user_attrs[record.RUN_URL]):
        page.goto(here(url))
        expect(page.get_by_role("tab", name="Model metrics")).to_be_visible()
        _check_layout(page, expect)
    _shot(page, f"{name}-best-run-link")


def _chart(page, expect, metric):
    """The chart of one metric on a run's "Model metrics" tab, found as a person finds it: by searching."""
    page.get_by_placeholder("Search metric charts").fill(metric)
    chart = page.get_by_test_id("experiment-view-compare-runs-card").filter(
        has=page.get_by_text(metric, exact=True))
    expect(chart.locator(".js-plotly-plot")).to_be_visible()
    return chart


def _artifact_image(page, expect, name):
    page.get_by_role("tab", name="Artifacts").click()
    page.get_by_text(name, exact=True).first.click()
    image = page.get_by_role("img", name=name).first
    expect(image).to_be_visible()
    page.wait_for_function("image => image.complete && image.naturalWidth > 0", arg=image.element_handle())


def test_the_dashboard_lists_the_studies(store, free_port):
    port, dashboard_port = free_port(), free_port()
    with tinyopt_ui("--tracking-uri", store["tracking_uri"], "--port", port, "--storage", store["storage"],
                    "--dashboard", "--dashboard-port", dashboard_port, ports=[port, dashboard_port]) as text:
        [url] = re.findall(r"^optuna-dashboard on (http://\S+)$", text, re.M)
        assert url == f"http://127.0.0.1:{dashboard_port}"
        with urllib.request.urlopen(f"{url}/api/studies", timeout=30) as response:
            studies = json.load(response)["study_summaries"]
        assert sorted(s["study_name"] for s in studies) == sorted(TRIALS)
        # Notes, which the dashboard renders as markdown: the sweep's summary, and each trial's run as a link.
        [scratch] = [s for s in studies if s["study_name"] == "scratch"]
        with urllib.request.urlopen(f"{url}/api/studies/{scratch['study_id']}", timeout=30) as response:
            detail = json.load(response)
        assert detail["note"]["body"].startswith("**Sweep of study `scratch`**")
        assert "Best: trial" in detail["note"]["body"] and "](http://127.0.0.1:5000/#/experiments/" in \
            detail["note"]["body"]
        first = detail["trials"][0]["note"]["body"]
        assert re.fullmatch(r"\[MLflow run of trial 0\]\(http://\S+/runs/\w+\?workflowType=machine_learning\)",
                            first), first


def test_ui_refuses_a_port_in_use(tmp_path, free_port):
    (tmp_path / "mlflow.db").touch()
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        result = CliRunner().invoke(cli, ["ui", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
                                          "--port", str(port)])
    assert result.exit_code == 1
    assert result.output.strip() == (f"error: cannot listen on 127.0.0.1:{port} (Address already in use); "
                                      "stop what runs there or pass another --port")


@pytest.mark.parametrize("dashboard_args, message", [
    (["--dashboard-port", "{port}"], "--dashboard-port and --port are both {port}"),
    (["--dashboard-port", "{other}", "--storage", "journal:missing/journal.log"],
     "no Optuna storage at missing/journal.log"),
])
def test_ui_checks_the_dashboard_before_starting_anything(tmp_path, monkeypatch, free_port, dashboard_args, message):
    monkeypatch.chdir(tmp_path)
    Path("mlflow.db").touch()
    ports = {"port": free_port(), "other": free_port()}
    result = CliRunner().invoke(cli, ["ui", "--tracking-uri", "sqlite:///mlflow.db", "--port", str(ports["port"]),
                                      "--dashboard", *(arg.format(**ports) for arg in dashboard_args)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code in (1, 2) and len(lines) == 1 and message.format(**ports) in lines[0], result.output
    assert not Path("missing").exists()
