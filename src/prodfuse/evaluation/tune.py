"""Hyperparameter search over the head: Optuna's TPE sampler, each trial scored by K-fold cross-validation.

A trial trains one model per fold (fold k test, fold k+1 val, the rest train, as `train --folds K`) and scores it on
its test fold, which neither its training nor its early stopping saw; the trial's value is the mean accuracy over
the folds. Trial 0 is the current defaults, so the result says what the search found against them. A trial that
is below the median of earlier trials after a fold is pruned. The study is stored in the output folder (SQLite):
running the same search again continues it, with its budget counted afresh.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from prodfuse.evaluation.config import TuneConfig, tune_space
from prodfuse.modeling.config import TrainConfig

log = logging.getLogger(__name__)
STUDY = "prodfuse-tune"
# The settings that must match for a stored study to be continued, with the searched space (the budget and trial
# count may change).
_STUDY_KEYS = ("embeddings", "folds", "fusion", "label_col", "split_col", "epochs", "patience", "seed")


def import_optuna():
    try:
        import optuna
    except ImportError as e:
        raise ImportError("tune needs Optuna: `pip install -e .[tune]` (or `pip install 'optuna>=4'`)") from e
    return optuna


def _suggest(trial, name: str, spec: tuple):
    kind = spec[0]
    if kind == "float":
        return trial.suggest_float(name, spec[1], spec[2], log=spec[3])
    return trial.suggest_categorical(name, list(spec[1]))


def defaults_of(space: dict) -> dict:
    """TrainConfig's default for every searched setting: trial 0."""
    d = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    return {name: d[name] for name in space}


def train_flags(params: dict) -> str:
    """The `prodfuse train` flags that set `params`."""
    out = []
    for name, value in params.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        else:
            out.append(f"{flag} {value:.4g}" if isinstance(value, float) else f"{flag} {value}")
    return " ".join(out)


def _fold_config(config: TuneConfig, params: dict, fold: int, out: Path) -> TrainConfig:
    return TrainConfig(
        embeddings=config.embeddings,
        folds=config.folds,
        fold=fold,
        label_col=config.label_col,
        split_col=config.split_col,
        fusion=config.fusion,
        epochs=config.epochs,
        patience=config.patience,
        seed=config.seed,
        out=str(out),
        overwrite=True,
        verbose=0,
        **params,
    )


def _open_study(config: TuneConfig, out: Path, space: dict):
    optuna = import_optuna()

    settings = {k: getattr(config, k) for k in _STUDY_KEYS} | {"space": sorted(space)}
    settings["embeddings"] = str(Path(config.embeddings).resolve())
    record = out / "tune-settings.json"
    if record.is_file():
        stored = json.loads(record.read_text())
        changed = sorted(k for k in settings if stored.get(k) != settings[k])
        if changed:
            raise ValueError(
                f"{out} holds a search with other settings ({', '.join(f'{k}: {stored.get(k)!r}' for k in changed)}); "
                f"pass overwrite=True (--overwrite) to start afresh, or another out folder."
            )
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(settings, indent=1))
    study = optuna.create_study(
        study_name=STUDY,
        storage=f"sqlite:///{(out / 'study.db').resolve()}",
        load_if_exists=True,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=config.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0),
    )
    # One search owns the folder, so a trial still marked running was left by a killed search: record it as failed
    # (Optuna has no public call for this without heartbeats, which a minutes-long trial would need tuned).
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
    if not study.trials:
        study.enqueue_trial(defaults_of(space))
    return study


def tune(config: TuneConfig) -> dict:
    """Search `config.space` within the time budget; writes trials.csv and tune.json under the output folder and
    returns what tune.json holds: the best settings, their `prodfuse train` flags, and the defaults' score."""
    import keras

    from prodfuse.data import shards
    from prodfuse.modeling.training import train

    optuna = import_optuna()
    shards.read_manifest(config.embeddings)  # a clear error before anything is written
    space = tune_space(config.space, config.fusion)
    out = Path(config.out or Path("runs") / f"tune-{Path(config.embeddings).name}")
    if config.overwrite and out.exists():
        shutil.rmtree(out)
    study = _open_study(config, out, space)
    work = out / "fold-runs"

    def objective(trial) -> float:
        params = {name: _suggest(trial, name, spec) for name, spec in space.items()}
        scores = []
        for k in range(config.folds):
            keras.backend.clear_session()  # each run starts from a clean graph and the same seed
            run = train(_fold_config(config, params, k, work / f"trial{trial.number}-fold{k}"))
            scores.append(float(run.metrics["test"]["accuracy"]))
            log.info("trial %d fold %d/%d: accuracy %.4f", trial.number, k + 1, config.folds, scores[-1])
            trial.set_user_attr("fold_accuracy", scores)
            seconds = trial.user_attrs.get("train_seconds", 0.0) + run.config["train_seconds"]
            trial.set_user_attr("train_seconds", seconds)
            shutil.rmtree(run.path, ignore_errors=True)  # a trial keeps its scores, not its models
            trial.report(float(np.mean(scores)), k)
            if k + 1 < config.folds and trial.should_prune():
                log.info("trial %d pruned after fold %d: %.4f", trial.number, k, np.mean(scores))
                raise optuna.TrialPruned()
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        log.info("trial %d: %.4f ± %.4f (%s)", trial.number, np.mean(scores), np.std(scores, ddof=1), shown)
        return float(np.mean(scores))

    t0 = time.perf_counter()
    study.optimize(
        objective,
        n_trials=config.max_trials,
        timeout=config.budget_minutes * 60,
        gc_after_trial=True,
    )
    shutil.rmtree(work, ignore_errors=True)
    return summarize(study, config, out, space, time.perf_counter() - t0)


def _row(t) -> dict:
    folds = t.user_attrs.get("fold_accuracy", [])
    return {
        "trial": t.number,
        "state": t.state.name.lower(),
        "accuracy": float(np.mean(folds)) if folds else None,
        "accuracy_std": float(np.std(folds, ddof=1)) if len(folds) > 1 else None,
        "fold_accuracy": folds,
        "train_seconds": round(float(t.user_attrs.get("train_seconds", 0.0)), 1),
        **t.params,
    }


def summarize(study, config: TuneConfig, out: Path, space: dict, seconds: float) -> dict:
    """trials.csv (one row per trial) and tune.json (the best trial against trial 0, the defaults)."""
    import pandas as pd

    rows = [_row(t) for t in study.trials]
    pd.DataFrame(rows).to_csv(out / "trials.csv", index=False)
    complete = [r for r in rows if r["state"] == "complete"]
    if not complete:
        raise ValueError(
            f"no trial finished all {config.folds} folds within budget_minutes={config.budget_minutes}; "
            f"raise the budget (one trial trains {config.folds} models)."
        )
    best = max(complete, key=lambda r: r["accuracy"])
    defaults = next((r for r in complete if r["trial"] == 0), None)
    params = {k: best[k] for k in space}
    summary = {
        "embeddings": str(Path(config.embeddings).resolve()),
        "fusion": config.fusion,
        "folds": config.folds,
        "epochs": config.epochs,
        "space": {k: list(v[1]) if v[0] == "categorical" else list(v[1:]) for k, v in space.items()},
        "trials": {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "fail")},
        "seconds": round(seconds, 1),
        "best": best,
        "best_params": params,
        "train_flags": train_flags(params),
        "defaults": defaults,
        "gain_over_defaults": None if defaults is None else best["accuracy"] - defaults["accuracy"],
        "out": str(out),
    }
    (out / "tune.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary
