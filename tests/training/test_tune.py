"""``vocdet tune``: a real Optuna study of real training runs on synthetic data — pruning, a killed process whose
trial is repeated and not lost, two processes sharing one SQLite study, ``best.yaml`` re-training to its score, and
one-line errors for a bad search space."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli, start_cli, tiny_overrides
from tests.test_cli import assert_one_line_error


def _study(folder: Path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name="s", storage=f"sqlite:///{folder / 's' / 'study.db'}")


@pytest.fixture(scope="module")
def warm_start(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Trials that start from the trained fixture model (as Ultralytics .pt) on 96 new images of its kind: fitness
    is above 0 from the first epoch, so a median pruner has something to compare."""
    import vocdet
    from vocdet.infer.export import export

    base = tmp_path_factory.mktemp("tune")
    pt = export(checkpoint, overrides=["export.format=ultralytics", f"export.output={base / 'start.pt'}"])
    root = vocdet.synthesize_voc(base / "voc", images=96, seed=1, size=128, val_fraction=0.25)
    return [
        *tiny_overrides(root, base / "unused"),
        f"model.weights={pt}",
        "data.imgsz=128",
        "data.batch_size=16",
        "data.cache=true",
        "train.nbs=16",
        "train.warmup_epochs=0",
        "logging.plots=false",
        "tune.study=s",
    ]


def _tune(args: list[str]) -> subprocess.Popen:
    return start_cli("tune", *args)


@pytest.mark.slow
def test_study_prunes_survives_a_kill_and_best_yaml_reproduces(warm_start: list[str], tmp_path: Path) -> None:
    from optuna.trial import TrialState

    args = [
        *warm_start,
        f"run.dir={tmp_path}",
        "train.epochs=2",
        "tune.trials=4",
        "tune.startup_trials=2",
        "tune.warmup_epochs=0",
        "tune.heartbeat_s=1",
        "tune.space.train.lr0=choice:0.001:0.5",
        # Two trials at a gentle rate, then one that wrecks the model (pruned at its first epoch).
        "tune.enqueue=[{train.lr0: 0.001}, {train.lr0: 0.001}, {train.lr0: 0.5}]",
    ]
    first = _tune(args)
    deadline = time.monotonic() + 300
    try:  # SIGKILL the whole process while its fourth trial runs
        while True:
            assert first.poll() is None, first.stdout.read()
            assert time.monotonic() < deadline, "the fourth trial never started"
            if (tmp_path / "s" / "study.db").exists():
                trials = _study(tmp_path).get_trials(deepcopy=False)
                if len(trials) >= 4 and trials[3].state == TrialState.RUNNING:
                    break
            time.sleep(0.5)
        time.sleep(2)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    time.sleep(4)  # past the grace period of three missed heartbeats (tune.heartbeat_s=1)
    second = _tune(args)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out
    trials = _study(tmp_path).get_trials(deepcopy=False)
    states = [t.state for t in trials]
    assert states[:4] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL], states
    assert len(trials) == 5 and trials[4].user_attrs["retry_of"] == 3 and trials[4].params == trials[3].params
    assert trials[4].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert trials[2].params == {"train.lr0": 0.5} and list(trials[2].intermediate_values) == [0]  # pruned at epoch 0
    assert trials[2].intermediate_values[0] < 0.5 * trials[0].intermediate_values[0]
    assert "stopped without a word" in out and (tmp_path / "s" / "trials.csv").read_text().count("\n") == 6
    assert (tmp_path / "s" / "history.png").is_file() and (tmp_path / "s" / "importances.png").is_file()
    # best.yaml trains the best trial again, to its score (runs are deterministic on the CPU).
    best = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    again = run_cli(
        "train", "--config", str(tmp_path / "s" / "best.yaml"), f"run.dir={tmp_path / 'again'}", timeout=300
    )
    assert again.returncode == 0, again.stderr
    import json

    from vocdet.core.metrics import fitness

    metrics = json.loads(next((tmp_path / "again").glob("*/metrics.json")).read_text())
    assert fitness(metrics) == pytest.approx(best.value, abs=0.01)


@pytest.mark.slow
def test_two_processes_share_one_study(warm_start: list[str], tmp_path: Path) -> None:
    from optuna.trial import TrialState

    args = [
        *warm_start,
        f"run.dir={tmp_path}",
        "train.epochs=1",
        "tune.trials=4",
        "tune.pruner=none",
        "tune.space.train.lr0=loguniform:1e-4:1e-2",
    ]
    procs = [_tune(args), _tune(args)]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    trials = _study(tmp_path).get_trials(deepcopy=False)
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["process"] for t in trials}) == 2, "both processes ran trials"
    assert len({t.params["train.lr0"] for t in trials}) == 4


@pytest.mark.parametrize(
    ("space", "needle"),
    [
        ("tune.space.train.lr0=logunifrom:1e-4:1e-1", "unknown kind 'logunifrom'"),
        ("tune.space.train.lr0=loguniform:1e-4", "two bounds"),
        ("tune.space.train.lr0=loguniform:0:1", "above 0"),
        ("tune.space.train.lr=uniform:0:1", "'train.lr' is not a config key"),
        ("tune.space.data.imgsz=uniform:0.5:1", "data.imgsz"),
        ("tune.space.run.seed=int:0:3", "'run.seed' is not a config key that a trial can set"),
        ("tune.space.train.lr0=int:5:1", "LOW < HIGH"),
    ],
)
def test_bad_search_space_is_an_error_before_any_trial(space: str, needle: str, tmp_path: Path) -> None:
    from vocdet.errors import VocdetError
    from vocdet.training.tune import tune

    with pytest.raises(VocdetError, match=re.escape(needle)):
        tune(None, [f"run.dir={tmp_path}", space])
    assert not (tmp_path / "tune").exists()


def test_bad_search_space_on_the_command_line_is_one_line(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("tune", f"run.dir={tmp_path}", "tune.space.train.lr0=uniform:1"), "two bounds")
    assert_one_line_error(run_cli("tune", f"run.dir={tmp_path}"), "tune.space is empty")
