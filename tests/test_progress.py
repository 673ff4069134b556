"""The progress reporter: plain lines off a terminal, a live rich display on one, worker noise kept in the run dir."""

import io
import re
import subprocess
from types import SimpleNamespace

from rich.console import Console
from test_search_e2e import EVOMERGE, write_config
from test_toy_family import TINY

import search.progress
from evaluators.toy_family import SIZES, build_family
from search.progress import Progress


def tick(monkeypatch, step_s: float) -> None:
    """A clock that moves `step_s` every time it is read: ETAs the test can predict."""
    now = iter(range(10_000))
    monkeypatch.setattr(search.progress, "time", SimpleNamespace(monotonic=lambda: next(now) * step_s))


def report(progress: Progress) -> None:
    trials = progress.task("search", 3, "trials")
    trials.advance(1, "trial 0: 0.6500", failed=0, items=20, best="toy_search=0.6500")
    trials.advance(1, "trial 1: FAILED (ValueError: [boom])", failed=1, items=20, best="toy_search=0.6500")
    progress.line("a message")
    stages = progress.stages("toy family")
    for done in range(1, 5):
        stages("training base", done, 4)
    stages("scoring", 1, 2)


PLAIN = [
    "search (3 trials)",
    "[1/3] trial 0: 0.6500 | failed 0 | items 20 | best toy_search=0.6500 | eta 0:00:20",
    "[2/3] trial 1: FAILED (ValueError: [boom]) | failed 1 | items 20 | best toy_search=0.6500 | eta 0:00:10",
    "a message",
    "toy family: training base (4 steps)",
    "toy family: scoring (2 steps)",
]


def test_plain_reporter_prints_exactly_one_line_per_start_and_described_step(monkeypatch):
    tick(monkeypatch, 10.0)
    lines = []
    with Progress(lines.append) as progress:
        report(progress)
    assert lines == PLAIN


def test_a_console_that_is_no_terminal_gets_the_same_plain_lines(monkeypatch):
    tick(monkeypatch, 10.0)
    out = io.StringIO()
    with Progress(console=Console(file=out)) as progress:
        report(progress)
    assert out.getvalue() == "\n".join(PLAIN) + "\n"
    assert "\r" not in out.getvalue() and "\x1b[" not in out.getvalue()


def test_a_terminal_gets_a_live_rich_display_of_the_totals(monkeypatch):
    tick(monkeypatch, 10.0)
    out = io.StringIO()
    with Progress(console=Console(file=out, force_terminal=True)) as progress:
        assert progress.live is not None
        report(progress)
    # Without rich's cursor moves, and with the wrapping of a long row undone.
    text = " ".join(re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue()).split())
    assert "\x1b[" in out.getvalue()  # drawn by rich, in place
    assert "2/3 trials | failed 1 | items 20 | best toy_search=0.6500 | eta 0:00:10" in text
    assert "last: trial 1: FAILED (ValueError: [boom])" in text  # '[boom]' is shown, not read as markup
    assert "toy family: training base" in text and "4/4 steps" in text
    assert "a message" in text


def test_family_build_reports_each_model_step_by_step_and_the_callback_stays_out_of_the_key(tmp_path, monkeypatch):
    monkeypatch.setitem(SIZES, "tiny", TINY)
    calls = []
    family = build_family(
        size="tiny", skills=["rev", "srt"], cache_dir=tmp_path, on_progress=lambda *call: calls.append(call)
    )
    stages = list(dict.fromkeys(stage for stage, _, _ in calls))
    assert stages == ["training base", "training rev", "training srt", "scoring"]
    totals = {"training base": TINY.base.steps, "training rev": TINY.child.steps, "training srt": TINY.child.steps}
    totals["scoring"] = 3
    for stage in stages:
        done = [d for s, d, t in calls if s == stage and t == totals[stage]]
        assert done == list(range(1, totals[stage] + 1))  # every step, in order, up to the total
    assert len(calls) == sum(totals.values())
    again = build_family(size="tiny", skills=["rev", "srt"], cache_dir=tmp_path)  # a cache hit: same key
    assert again.root == family.root and again.manifest["key"] == family.manifest["key"]


def test_cli_search_prints_plain_trial_lines_and_keeps_worker_output_in_the_run_dir(toy_family, tmp_path):
    config = write_config(
        tmp_path / "search.yml",
        toy_family,
        budget={"trials": 3},
        fitness={"limit": 20},
        held_out={"tasks": [{"task": toy_family.test_tasks["srt"], "metric": "acc"}], "limit": 20},
    )
    result = subprocess.run([EVOMERGE, "run", config], capture_output=True, text=True, timeout=600)
    terminal = result.stdout + result.stderr
    assert result.returncode == 0, terminal[-3000:]
    trial_lines = [line for line in result.stdout.splitlines() if re.match(r"\[\d/3\] trial \d+: ", line)]
    assert len(trial_lines) == 3 and all(" | failed " in line and " | best " in line for line in trial_lines)
    assert "[3/3] trial" in trial_lines[-1]
    assert "\r" not in terminal and "\x1b[" not in terminal
    for noise in ("it/s", "Running loglikelihood requests", "Token authentication", "WorkerHost pid="):
        assert noise not in terminal
    worker_log = (tmp_path / "run" / "logs" / "workers.log").read_text()
    assert "it/s" in worker_log  # lm-eval's per-request bars, from inside the workers
