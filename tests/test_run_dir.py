"""RunDir: atomic writes that survive a kill mid-way, and refusing directories that are not evomerge runs."""

import json
import subprocess
import sys
import textwrap

import pytest

from merge_core.errors import InputError
from search.run_dir import FORMAT, RunDir

# A writer that is killed (SIGKILL, no cleanup) after the new data is on disk but before the rename.
KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from search.run_dir import RunDir
    run = RunDir.open(sys.argv[1])
    os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
    run.write_text(run.summary, "NEW" * 1_000_000)
    """
)


def test_a_writer_killed_mid_way_leaves_the_old_file_whole(tmp_path):
    run = RunDir.create(tmp_path / "run", "search.yml")
    run.write_json(run.summary, {"trials": 3})
    result = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(run.path)], capture_output=True, text=True)
    assert result.returncode == -9, result.stderr  # it really died by the signal, mid-write
    assert json.loads(run.summary.read_text()) == {"trials": 3}
    leftovers = [p.name for p in run.path.iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-summary.json.")
    RunDir.open(run.path)  # the next reader sweeps the dead writer's temporary away
    assert not [p for p in run.path.iterdir() if p.name.startswith(".tmp-")]


def test_a_new_run_refuses_an_old_one_and_resume_needs_one(tmp_path):
    run = RunDir.create(tmp_path / "run", "search.yml")
    assert json.loads(run.marker.read_text())["format"] == FORMAT
    with pytest.raises(InputError, match=r"^search\.yml: output_dir: .*/run holds a previous search; pass --resume"):
        RunDir.create(tmp_path / "run", "search.yml")
    with pytest.raises(InputError, match=r"^search\.yml: output_dir: .*/empty holds no search to resume$"):
        RunDir(tmp_path / "empty").expect_search(True, "search.yml")


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        (None, r"/run: expected an evomerge run directory \(with evomerge-run\.json\), got none$"),
        ("{broken", r"evomerge-run\.json: format: expected evomerge's run marker \(JSON with a format\)$"),
        (json.dumps({"format": 0}), r"evomerge-run\.json: format: expected run format 1, got 0 \(written by an older"),
        (json.dumps({"format": 99}), r"evomerge-run\.json: format: expected run format 1, got 99 \(written by another"),
    ],
)
def test_what_is_not_a_run_of_this_format_is_one_line(tmp_path, marker, message):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "summary.json").write_text("{}")
    if marker is not None:
        (folder / "evomerge-run.json").write_text(marker)
    with pytest.raises(InputError, match=message):
        RunDir.open(folder)
    assert (folder / "summary.json").read_text() == "{}"  # nothing overwritten


def test_reading_a_missing_or_broken_file_names_it(tmp_path):
    run = RunDir.create(tmp_path / "run", "search.yml")
    with pytest.raises(InputError, match=r"/run: expected summary\.json in the run, got none$"):
        run.read_text(run.summary)
    run.summary.write_text("{not json")
    with pytest.raises(InputError, match=r"summary\.json: expected JSON, got a file that does not parse$"):
        run.read_json(run.summary)


def test_a_corrupted_study_is_one_line_and_left_as_it_was(tmp_path):
    from search.optimizers.base import open_study

    storage = tmp_path / "optuna.db"
    storage.write_bytes(b"this is not a sqlite database" * 100)
    with pytest.raises(InputError, match=r"optuna\.db: expected an Optuna sqlite study, got a file that does not open"):
        open_study(storage, "search", ["maximize"], genome=None, resume=True)
    assert storage.read_bytes() == b"this is not a sqlite database" * 100


def test_export_of_a_directory_that_is_not_a_run_is_exit_2(tmp_path, capsys):
    from search.cli import main

    folder = tmp_path / "elsewhere"
    folder.mkdir()
    assert main(["export", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err == f"evomerge: error: {folder}: expected an evomerge run directory (with evomerge-run.json), got none\n"
    assert list(folder.iterdir()) == []
