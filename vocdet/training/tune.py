"""``vocdet tune``: an Optuna study over keys of the config tree, each trial an ordinary training run.

The search space is ``tune.space`` (``key: kind:args``; kinds ``uniform:LOW:HIGH``, ``loguniform:LOW:HIGH``,
``int:LOW:HIGH[:STEP]``, ``choice:A:B:...``), the objective the best validation fitness of the run (0.1 mAP50 + 0.9
mAP50-95, what ``best.ckpt`` is chosen by), and a median pruner stops trials per epoch through Optuna's Lightning
callback. The study lives in ``tune.storage`` (SQLite in the study folder by default): a stopped ``vocdet tune``
continues where it stopped, and several processes (or machines, with a shared database URL) pointed at one storage
work on one study until it holds ``tune.trials`` trials. Trials in flight send heartbeats; one whose process died is
marked failed by the next process and its parameters are tried again.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import logging
import math
import os
import socket
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from vocdet.config import load_config, run_yaml, to_dict
from vocdet.core.files import write_json, write_text
from vocdet.core.metrics import fitness
from vocdet.core.voc import layout
from vocdet.errors import TrainingStopped, VocdetError

log = logging.getLogger("vocdet")

KINDS = ("uniform", "loguniform", "int", "choice")
RETRY_OF = "retry_of"  # user attr of a trial that repeats the parameters of one that died or was stopped


def flatten_space(space: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{train: {lr0: spec}}`` or ``{"train.lr0": spec}`` -> ``{"train.lr0": spec}``."""
    out: dict[str, Any] = {}
    for key, value in space.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_space(value, full + "."))
        else:
            out[full] = value
    return out


def parse_space(space: Mapping[str, Any], cfg: DictConfig) -> dict[str, Any]:
    """Optuna distributions for ``tune.space``; a bad spelling or a key the config does not have is a one-line
    ``VocdetError``."""
    import optuna.distributions as D

    flat = flatten_space(space)
    if not flat:
        raise VocdetError("tune.space is empty: give at least one key, e.g. tune.space.train.lr0=loguniform:1e-4:1e-1")
    dists: dict[str, Any] = {}
    for key, spec in flat.items():
        spec = str(spec)
        where = f"tune.space.{key}={spec}"
        if key.split(".")[0] in ("tune", "run") or OmegaConf.select(cfg, key, default="\0missing") == "\0missing":
            raise VocdetError(f"{where}: '{key}' is not a config key that a trial can set (see vocdet config)")
        kind, _, rest = spec.partition(":")
        args = [a for a in rest.split(":")] if rest else []
        try:
            if kind in ("uniform", "loguniform"):
                if len(args) != 2:
                    raise ValueError(f"{kind} takes two bounds ({kind}:LOW:HIGH)")
                lo, hi = float(args[0]), float(args[1])
                if not lo < hi or (kind == "loguniform" and lo <= 0):
                    raise ValueError("needs LOW < HIGH" + (", both above 0" if kind == "loguniform" else ""))
                dist: Any = D.FloatDistribution(lo, hi, log=kind == "loguniform")
                samples = [lo, hi]
            elif kind == "int":
                if len(args) not in (2, 3):
                    raise ValueError("int takes two bounds and an optional step (int:LOW:HIGH[:STEP])")
                lo, hi, step = int(args[0]), int(args[1]), int(args[2]) if len(args) == 3 else 1
                if not lo < hi or step < 1:
                    raise ValueError("needs LOW < HIGH and STEP >= 1")
                dist, samples = D.IntDistribution(lo, hi, step=step), [lo, hi]
            elif kind == "choice":
                if not args:
                    raise ValueError("choice takes one or more values (choice:A:B)")
                samples = [_value(a) for a in args]
                dist = D.CategoricalDistribution(samples)
            else:
                raise ValueError(f"unknown kind '{kind}'; use one of {', '.join(k + ':...' for k in KINDS)}")
        except ValueError as e:
            raise VocdetError(f"{where}: {e}") from None
        for value in samples:  # each end of the range must be a value the key takes
            try:
                load_config(None, [f"{key}={value}"], base=to_dict(cfg))
            except VocdetError as e:
                raise VocdetError(f"{where}: {e}") from None
        dists[key] = dist
    return dists


def _value(text: str) -> Any:
    """A choice as the config would read it: 1e-6 is a number (YAML 1.1 alone reads it as a string)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def storage_url(cfg: DictConfig) -> str:
    if cfg.tune.storage:
        return str(cfg.tune.storage)
    return f"sqlite:///{(study_dir(cfg) / 'study.db').resolve()}"


def study_dir(cfg: DictConfig) -> Path:
    return Path(cfg.run.dir) / cfg.tune.study


@contextlib.contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """One process of this machine at a time counts the study's trials and asks for the next one."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _counted(study: Any) -> int:
    """Trials that count toward ``tune.trials``: finished, pruned, failed or running, a repeat counted once."""
    from optuna.trial import TrialState

    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
    trials = study.get_trials(deepcopy=False, states=states)
    return sum(1 for t in trials if RETRY_OF not in t.user_attrs)


def make_sampler(cfg: DictConfig, trial_number: int) -> Any:
    """The sampler for the next trial, seeded by ``tune.seed`` and the trial's number: a study is reproducible, and
    processes sharing it do not draw the same values (Optuna's samplers share nothing but the storage)."""
    import optuna

    t = cfg.tune
    seed = int(t.seed) + trial_number
    if t.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=t.startup_trials)
    if t.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise VocdetError(f"tune.sampler={t.sampler}: use tpe or random")


def open_study(cfg: DictConfig) -> Any:
    import optuna

    t = cfg.tune
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(
        storage_url(cfg),
        heartbeat_interval=int(cfg.tune.heartbeat_s),
        grace_period=3 * int(cfg.tune.heartbeat_s),
        heartbeat_stale_trial_callback=_retry,
        engine_kwargs={"connect_args": {"timeout": 60}} if storage_url(cfg).startswith("sqlite") else None,
    )
    sampler = make_sampler(cfg, 0)
    if t.pruner == "median":
        pruner: Any = optuna.pruners.MedianPruner(n_startup_trials=t.startup_trials, n_warmup_steps=t.warmup_epochs)
    elif t.pruner == "none":
        pruner = optuna.pruners.NopPruner()
    else:
        raise VocdetError(f"tune.pruner={t.pruner}: use median or none")
    return optuna.create_study(
        study_name=t.study,
        storage=storage,
        sampler=sampler,
        pruner=pruner,
        direction="maximize",
        load_if_exists=True,
    )


def _retry(study: Any, trial: Any) -> None:
    """Optuna's failed-trial callback: a trial whose process died (no heartbeat) is tried again, once."""
    if RETRY_OF in trial.user_attrs:
        return
    log.warning("trial %d stopped without a word (its process died): its parameters are queued again", trial.number)
    study.enqueue_trial(trial.params, user_attrs={RETRY_OF: trial.number}, skip_if_exists=False)


def tune(config_files: list[str | Path] | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run trials until the study holds ``tune.trials``; write ``best.yaml``, ``trials.csv`` and the plots in
    ``<run.dir>/<tune.study>/``. Returns the summary written to ``summary.json``."""
    cfg = load_config(config_files, overrides)
    dists = parse_space(cfg.tune.space, cfg)
    if not cfg.data.synthesize or Path(cfg.data.root).exists():
        layout(cfg.data.root)  # a missing dataset is one line before any trial, not a failed trial
    import optuna
    from optuna.storages._heartbeat import get_heartbeat_thread
    from optuna.trial import TrialState

    from vocdet.training.module import NonFiniteLoss
    from vocdet.training.run import train

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    folder = study_dir(cfg)
    with _exclusive(folder):
        study = open_study(cfg)
        if not study.get_trials(deepcopy=False):
            for params in cfg.tune.enqueue:
                study.enqueue_trial(flatten_space(to_dict(params)), skip_if_exists=False)
        optuna.storages.fail_stale_trials(study)
    log.info("study %s in %s: %d of %d trials held", cfg.tune.study, storage_url(cfg), _counted(study), cfg.tune.trials)
    while True:
        with _exclusive(folder):
            waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))  # repeats, enqueued sets
            if _counted(study) >= cfg.tune.trials and not waiting:
                break
            study.sampler = make_sampler(cfg, len(study.get_trials(deepcopy=False)))
            trial = study.ask(dists)
        params = dict(trial.params)
        trial_overrides = [
            *(overrides or []),
            *(f"{k}={v}" for k, v in params.items()),
            f"run.dir={folder}",
            f"run.name=trial-{trial.number}",
            "run.exist_ok=true",
            f"logging.wandb_group={cfg.tune.study}",
        ]
        trial.set_user_attr("overrides", trial_overrides)
        trial.set_user_attr("process", f"{socket.gethostname()}:{os.getpid()}")
        log.info("trial %d: %s", trial.number, ", ".join(f"{k}={v}" for k, v in params.items()))
        run_cfg = load_config(config_files, trial_overrides)
        pruning = _pruning_callback(trial)
        with get_heartbeat_thread(trial._trial_id, study._storage):
            try:
                best = train(run_cfg, callbacks=[pruning])
            except optuna.TrialPruned as e:
                study.tell(trial, state=TrialState.PRUNED)
                log.info("trial %d pruned: %s", trial.number, e)
                continue
            except TrainingStopped:
                study.tell(trial, state=TrialState.FAIL)
                study.enqueue_trial(params, user_attrs={RETRY_OF: trial.number}, skip_if_exists=False)
                raise
            except NonFiniteLoss as e:  # these parameters diverge: a failed trial, the study goes on
                study.tell(trial, state=TrialState.FAIL)
                log.warning("trial %d failed: %s", trial.number, e)
                continue
            except BaseException:
                study.tell(trial, state=TrialState.FAIL)
                raise
        metrics = json.loads((best.parent.parent / "metrics.json").read_text())
        value = float(fitness(metrics))
        trial.set_user_attr("map50", float(metrics["map50"]))
        trial.set_user_attr("map50_95", float(metrics["map50_95"]))
        study.tell(trial, value)
        log.info("trial %d: fitness %.5f (mAP50 %.4f)", trial.number, value, metrics["map50"])
    return report(study, cfg, config_files, overrides)


def _pruning_callback(trial: Any) -> Any:
    """Optuna's Lightning pruning callback, reporting each epoch's validation fitness during ``fit`` only (the final
    scoring of best.ckpt after training is not an epoch)."""
    from lightning.pytorch.trainer.states import TrainerFn
    from optuna_integration import PyTorchLightningPruningCallback

    class EpochPruning(PyTorchLightningPruningCallback):
        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            if trainer.state.fn == TrainerFn.FITTING:
                super().on_validation_end(trainer, pl_module)

    return EpochPruning(trial, monitor="fitness")


def report(
    study: Any, cfg: DictConfig, config_files: list[str | Path] | None, overrides: list[str] | None
) -> dict[str, Any]:
    """``trials.csv``, ``best.yaml``, ``summary.json`` and two plots in the study folder; prints the table."""
    from optuna.trial import TrialState

    folder = study_dir(cfg)
    trials = study.get_trials(deepcopy=False)
    names = sorted({k for t in trials for k in t.params})
    rows = []
    for t in trials:
        steps = sorted(t.intermediate_values)
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name.lower(),
                "fitness": t.value if t.value is not None else "",
                "map50": t.user_attrs.get("map50", ""),
                "epochs": (steps[-1] + 1) if steps else "",
                "seconds": round(t.duration.total_seconds(), 1) if t.duration else "",
                "retry_of": t.user_attrs.get(RETRY_OF, ""),
                **{k: t.params.get(k, "") for k in names},
            }
        )
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "trials.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
        w.writeheader()
        w.writerows(rows)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    summary: dict[str, Any] = {
        "study": cfg.tune.study,
        "storage": storage_url(cfg),
        "trials": len(trials),
        "states": {s: sum(1 for r in rows if r["state"] == s) for s in ("complete", "pruned", "fail", "running")},
    }
    if complete:
        best = max(complete, key=lambda t: t.value)
        best_cfg = load_config(config_files, [*(overrides or []), *(f"{k}={v}" for k, v in best.params.items())])
        best_cfg = load_config(None, [f"run.name={cfg.tune.study}-best"], base=to_dict(best_cfg))
        header = (
            f"# vocdet tune: study {cfg.tune.study}, trial {best.number} of {len(trials)}, fitness {best.value:.5f} "
            f"(mAP50 {best.user_attrs.get('map50', math.nan):.4f})\n# vocdet train --config best.yaml reproduces it\n"
        )
        write_text(folder / "best.yaml", header + run_yaml(best_cfg))
        summary.update(best_trial=best.number, best_fitness=best.value, best_params=best.params)
        _plots(study, folder, len(complete))
    write_json(folder / "summary.json", summary)
    print(_table(rows, names))
    if complete:
        print(f"best: trial {summary['best_trial']}, fitness {summary['best_fitness']:.5f} -> {folder / 'best.yaml'}")
    return summary


def _plots(study: Any, folder: Path, complete: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis
    from optuna.importance import PedAnovaImportanceEvaluator

    ax = vis.plot_optimization_history(study)
    ax.figure.savefig(folder / "history.png", dpi=100, bbox_inches="tight")
    plt.close(ax.figure)
    if complete >= 2 and len(study.best_trial.params) >= 1:
        with contextlib.suppress(ValueError, RuntimeError):  # e.g. every trial scored the same
            ax = vis.plot_param_importances(study, evaluator=PedAnovaImportanceEvaluator())
            ax.figure.savefig(folder / "importances.png", dpi=100, bbox_inches="tight")
            plt.close(ax.figure)


def _table(rows: list[dict[str, Any]], names: list[str]) -> str:
    head = f"{'trial':>5}  {'state':<9}{'fitness':>9}{'mAP50':>8}{'epochs':>7}  " + "  ".join(names)
    lines = [head]
    for r in rows:
        fit = f"{r['fitness']:.4f}" if r["fitness"] != "" else ""
        m = f"{r['map50']:.4f}" if r["map50"] != "" else ""
        params = "  ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in names)
        lines.append(f"{r['trial']:>5}  {r['state']:<9}{fit:>9}{m:>8}{r['epochs']!s:>7}  {params}")
    return "\n".join(lines)


__all__ = ["flatten_space", "open_study", "parse_space", "report", "tune"]
