"""`evomerge ui` over a real toy search, in a real headless browser: Debian's chromium driven by Playwright.

One search and one `evomerge ui --optuna` serve the whole module; the Ctrl-C test starts its own. Set
EVOMERGE_SCREENSHOTS=1 to refresh docs/dashboard-run.png (the README's picture) from this run.
"""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import expect, sync_playwright
from test_search_e2e import EVOMERGE, write_config

from search.run_dir import MARKER, RunDir
from search.runner import run_search

TRIALS = 5
LIMIT = 20
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = Path(__file__).parent.parent / "docs" / "dashboard-run.png"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_ports() -> int:
    """A port P with P + 1 free too (optuna-dashboard's)."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port < 65535 and bindable(port) and bindable(port + 1):
            return port


def bindable(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a server restarting on it would
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def start_ui(run_dir: Path, port: int, logs: Path) -> subprocess.Popen:
    """`evomerge ui RUN_DIR --port PORT --optuna`, returned once it says it serves (its servers answered)."""
    command = [str(EVOMERGE), "ui", str(run_dir), "--port", str(port), "--optuna"]
    with (logs / "out").open("w") as out, (logs / "err").open("w") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, start_new_session=True)
    deadline = time.monotonic() + 180
    while "serving on 127.0.0.1" not in (logs / "out").read_text():
        assert process.poll() is None, f"evomerge ui exited {process.returncode}: {(logs / 'err').read_text()}"
        assert time.monotonic() < deadline, "evomerge ui did not start serving within 180 s"
        time.sleep(0.5)
    return process


def stop_ui(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        process.wait(30)


def server_processes(port: int) -> list[str]:
    """Command lines of processes still serving `port` (what a stop that left a server behind would show)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue  # exited while we looked
        if b"--port" in args and str(port).encode() in args:
            found.append(b" ".join(args).decode(errors="replace"))
    return found


@pytest.fixture(scope="module")
def search(toy_family, tmp_path_factory):
    config = write_config(
        tmp_path_factory.mktemp("dashboard") / "search.yml",
        toy_family,
        fitness={"limit": LIMIT},
        held_out={"limit": LIMIT},
        budget={"trials": TRIALS},
    )
    summary = run_search(config)
    run = RunDir(config.parent / "run")
    state = json.loads(run.tracking.read_text())
    client = MlflowClient(state["tracking_uri"])
    children = client.search_runs([state["experiment_id"]], f"tags.`mlflow.parentRunId` = '{state['parent_run_id']}'")
    trials = {int(r.data.tags["evomerge.trial"]): r for r in children}
    assert sorted(trials) == list(range(TRIALS))
    return run, state, summary, trials


@pytest.fixture(scope="module")
def ui(search, tmp_path_factory):
    run, _, _, _ = search
    port = free_ports()
    process = start_ui(run.path, port, tmp_path_factory.mktemp("ui"))
    yield f"http://127.0.0.1:{port}", port
    stop_ui(process)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except PlaywrightError as err:  # no binary, or libraries/sandbox this machine lacks
            pytest.skip(f"chromium cannot start here: {' '.join(str(err).split())[:300]}")
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    """A fresh page per test: the MLflow UI keeps a run's artifact list across a hash-only navigation."""
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.set_default_timeout(30_000)
    yield page
    page.close()


def shown(value: float) -> str:
    """A metric value as the MLflow UI prints it (JavaScript's shortest repr, which writes 0.0 as 0)."""
    return "0" if value == 0 else repr(value)


def items_per_trial(toy_family) -> int:
    # toy_search is a group: one task per skill, LIMIT items each (not LIMIT times the one objective)
    return LIMIT * len(toy_family.children)


def test_the_experiment_page_lists_the_parent_and_one_child_run_per_trial(search, ui, page):
    run, state, _, _ = search
    url, _ = ui
    page.goto(f"{url}/#/experiments/{state['experiment_id']}/runs")
    expect(page.get_by_role("link", name="evomerge", exact=True).first).to_be_visible()  # the experiment name
    parent = page.get_by_role("link", name=run.path.name, exact=True)
    expect(parent).to_be_visible()
    expect(page.get_by_role("link", name="trial-0", exact=True)).to_have_count(0)  # nested: folded under it
    page.locator("[role=gridcell]", has=parent).get_by_role("button").first.click()  # unfold its child runs
    for number in range(TRIALS):
        expect(page.get_by_role("link", name=f"trial-{number}", exact=True)).to_be_visible()
    expect(page.get_by_text(f"{TRIALS + 1} matching runs")).to_be_visible()


def test_the_parent_run_page_shows_the_search_its_trials_and_held_out_scores(search, ui, page, tmp_path):
    run, state, summary, _ = search
    url, _ = ui
    page.goto(f"{url}/#/experiments/{state['experiment_id']}/runs/{state['parent_run_id']}")
    expect(page.get_by_text("Child runs", exact=True)).to_be_visible()
    for number in range(TRIALS):
        expect(page.get_by_role("link", name=f"trial-{number}", exact=True)).to_be_visible()
    best = shown(summary.best.search["toy_search"])
    expect(page.get_by_role("row", name=f"best/toy_search {best}", exact=True)).to_be_visible()
    expect(page.get_by_role("row", name="hypervolume")).to_be_visible()
    expect(page.get_by_role("row", name=f"heldout/evolved _{summary.best.trial}/average")).to_be_visible()
    expect(page.get_by_text("evomerge.config")).to_be_visible()
    close_assistant = page.get_by_role("button", name="Close")  # MLflow 3's chat panel: not part of the picture
    if close_assistant.count():
        close_assistant.first.click()
    shot = SCREENSHOT if os.environ.get("EVOMERGE_SCREENSHOTS") else tmp_path / "dashboard-run.png"
    page.screenshot(path=shot)
    assert shot.read_bytes().startswith(PNG_MAGIC) and 20_000 < shot.stat().st_size < 400_000


def test_every_trial_run_shows_its_metrics_and_recipe(search, ui, page, toy_family):
    run, state, summary, trials = search
    url, _ = ui
    front = {member.trial: member for member in summary.front}
    for number, trial in trials.items():
        page.goto(f"{url}/#/experiments/{state['experiment_id']}/runs/{trial.info.run_id}")
        expect(page.get_by_role("row", name=f"items {items_per_trial(toy_family)}", exact=True)).to_be_visible()
        for metric in ("merge_s", "eval_s"):
            expect(page.get_by_role("row", name=metric)).to_be_visible()
        expect(page.get_by_text("evomerge.status")).to_be_visible()
        if "toy_search" in trial.data.metrics:
            score = shown(trial.data.metrics["toy_search"])
            expect(page.get_by_role("row", name=f"toy_search {score}", exact=True)).to_be_visible()
        if number in front:
            expect(page.get_by_role("row", name="heldout/average")).to_be_visible()
        page.goto(f"{url}/#/experiments/{state['experiment_id']}/runs/{trial.info.run_id}/artifacts")
        page.get_by_text("recipe.yaml", exact=True).click()
        first_line = run.read_text(run.trial_recipe(number)).splitlines()[0]
        expect(page.get_by_text(first_line).first).to_be_visible()
    assert {n for n, t in trials.items() if "heldout/average" in t.data.metrics} == set(front)
    assert all(t.data.metrics["items"] == items_per_trial(toy_family) for t in trials.values())


def test_the_parent_artifacts_show_the_front_the_cost_curve_and_best_yml(search, ui, page):
    run, state, _, _ = search
    url, _ = ui
    page.goto(f"{url}/#/experiments/{state['experiment_id']}/runs/{state['parent_run_id']}/artifacts")
    for name in ("front.csv", "heldout.csv", "config.yaml", "best.yml"):
        expect(page.get_by_text(name, exact=True)).to_be_visible()
    for plot in ("front.png", "best_vs_cost.png"):
        page.get_by_text(plot, exact=True).click()
        image = page.get_by_role("img", name=plot, exact=True)
        expect(image).to_be_visible()
        assert image.evaluate("img => img.naturalWidth") == 640  # decoded: the 6.4-inch figure at 100 dpi
    page.get_by_text("best.yml", exact=True).click()
    # best.yml is the gate's choice: the evolved recipe, or a parent / tuned baseline with the reason on top
    header = run.best.read_text().splitlines()[0]
    assert header.startswith(("# evolved by evomerge", "# not evolved: "))
    expect(page.get_by_text(header[:40]).first).to_be_visible()


def test_optuna_dashboard_serves_the_study(ui):
    _, port = ui
    with LOOPBACK.open(f"http://127.0.0.1:{port + 1}/api/studies", timeout=10) as response:
        studies = json.load(response)["study_summaries"]
    assert [(s["study_name"], s["directions"]) for s in studies] == [("search", ["maximize"])]


def test_a_port_in_use_is_one_line_naming_it(search, ui):
    run, _, _, _ = search
    _, port = ui
    result = subprocess.run([str(EVOMERGE), "ui", str(run.path), "--port", str(port)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr == (
        f"evomerge: error: port {port}: expected a free port on 127.0.0.1 for MLflow, got one in use; "
        "choose another with --port\n"
    )


def test_a_directory_that_is_no_run_is_one_line(tmp_path):
    result = subprocess.run([str(EVOMERGE), "ui", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr == (
        f"evomerge: error: {tmp_path}: expected an evomerge run directory (with {MARKER}), got none\n"
    )


def test_ctrl_c_stops_both_servers_and_frees_the_ports(search, tmp_path):
    run, state, _, _ = search
    port = free_ports()
    process = start_ui(run.path, port, tmp_path)
    assert server_processes(port) and server_processes(port + 1)
    interrupted = time.monotonic()
    process.send_signal(signal.SIGINT)
    assert process.wait(30) == 0
    assert time.monotonic() - interrupted < 15
    out, err = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
    assert "Traceback" not in err and err == ""
    run_url = f"http://127.0.0.1:{port}/#/experiments/{state['experiment_id']}/runs/{state['parent_run_id']}"
    assert out.splitlines() == [
        f"MLflow: {run_url}",
        f"Optuna: http://127.0.0.1:{port + 1}/dashboard",
        "serving on 127.0.0.1; Ctrl-C stops",
        "stopping",
    ]
    assert server_processes(port) == [] and server_processes(port + 1) == []
    assert bindable(port) and bindable(port + 1)
