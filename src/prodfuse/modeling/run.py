"""A run folder: the trained model, its classes, the config it was trained with, and what was derived from it.

Anything derived from a model (the temperature, evaluations) records the model's fingerprint (sha256 of
model.keras); a derived file whose fingerprint does not match is ignored with a warning, so a run folder never
calibrates one model with another model's temperature.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from prodfuse.checks import from_dict
from prodfuse.data.catalog import file_sha256
from prodfuse.modeling.config import TrainConfig
from prodfuse.modeling.hierarchy import Hierarchy, load_hierarchy

log = logging.getLogger(__name__)

CONFIG_SCHEMA_VERSION = 2  # 1: prodfuse 0.1, the CLI's flags under "args"; 2: TrainConfig fields under "train"
TEMPERATURE_FILE = "temperature.json"
RUN_FILES = ("model.keras", "labels.json", "config.json")


def model_fingerprint(run: str | os.PathLike) -> str:
    return file_sha256(Path(run) / "model.keras")


def prepare_run_folder(path: str | os.PathLike, overwrite: bool) -> Path:
    """An empty run folder: a new one, or an existing one cleared when `overwrite`; anything else is refused."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"run folder {str(path)!r} is a file; choose another --out")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise ValueError(
                f"run folder {str(path)!r} already exists and is not empty; pass --overwrite to "
                f"replace it (its model, temperature and evaluations are deleted), or choose another "
                f"--out"
            )
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_temperature(run: str | os.PathLike, temperature: float, info: dict | None = None) -> Path:
    path = Path(run) / TEMPERATURE_FILE
    payload = {"temperature": float(temperature), "model_sha256": model_fingerprint(run), **(info or {})}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)
    return path


def load_temperature(run: str | os.PathLike, fingerprint: str | None = None) -> tuple[float, bool]:
    """(T, fitted): the run's temperature, or (1.0, False) when none was fitted for this very model.

    A temperature.json fitted on another model (its model_sha256 differs from `fingerprint`) is ignored with a
    warning; files from prodfuse 0.1 carry no fingerprint and are trusted.
    """
    path = Path(run) / TEMPERATURE_FILE
    if not path.is_file():
        return 1.0, False
    data = json.loads(path.read_text())
    t = data.get("temperature")
    if not isinstance(t, (int, float)) or not t > 0:
        raise ValueError(
            f"{str(path)!r} holds temperature {t!r}, not a positive number; delete it and re-run "
            f"`prodfuse evaluate --run {run}` to fit it again."
        )
    fitted_on = data.get("model_sha256")
    if fitted_on is not None:
        fingerprint = fingerprint or model_fingerprint(run)
        if fitted_on != fingerprint:
            log.warning(
                "%s was fitted on another model than %s (fingerprints differ): ignored, T = 1. Run "
                "`prodfuse evaluate --run %s` to calibrate this model.",
                path,
                Path(run) / "model.keras",
                run,
            )
            return 1.0, False
    return float(t), True


def train_config_of(config: dict) -> TrainConfig | None:
    """The TrainConfig a run was trained with; for prodfuse 0.1 folders, rebuilt from the recorded flags."""
    if "train" in config:
        return from_dict(TrainConfig, config["train"])
    args = dict(config.get("args") or {})
    if not args:
        return None
    args["verbose"] = 2
    args.pop("quiet", None)
    if not args.get("label_col"):
        args["label_col"] = config.get("label_col")
    try:
        return from_dict(TrainConfig, args)
    except ValueError:
        return None  # a 0.1 run trained with values today's checks refuse: the model itself still loads


def read_run_config(path: str | os.PathLike) -> dict:
    """A run folder's config.json, once its files are known to be there: what a command checks (columns, shard
    folders) before it loads the model."""
    path = Path(path)
    missing = [f for f in RUN_FILES if not (path / f).is_file()]
    if missing:
        raise ValueError(
            f"{str(path)!r} is not a complete run folder: it lacks {missing}. Pass the --out folder of `prodfuse train`."
        )
    return json.loads((path / "config.json").read_text())


@dataclass
class Run:
    """A loaded run folder. `temperature` is 1.0 and `calibrated` False until `prodfuse evaluate` fits one."""

    path: Path
    model: object  # keras.Model
    classes: list[str]
    config: dict  # config.json as written by train
    temperature: float = 1.0
    calibrated: bool = False
    fingerprint: str = ""
    metrics: dict = field(default_factory=dict)
    hierarchy: Hierarchy | None = None  # the label tree of a run trained with label_cols (hierarchy.json)

    @property
    def inputs(self) -> list[str]:
        return list(self.config["inputs"])

    @property
    def label_col(self) -> str:
        return self.config["label_col"]

    @property
    def train_config(self) -> TrainConfig | None:
        return train_config_of(self.config)

    @property
    def extraction(self) -> dict:
        """The shard manifest's catalog columns, settings and encoders that the run was trained on."""
        return self.config["extraction"]

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Run":
        """Load model (without optimizer), classes, config and temperature; folders from prodfuse 0.1 too."""
        import keras

        import prodfuse.modeling.fusion  # noqa: F401  (registers the fusion layers for loading)

        path = Path(path)
        config = read_run_config(path)
        fingerprint = model_fingerprint(path)
        recorded = config.get("model_sha256")
        if recorded is not None and recorded != fingerprint:
            log.warning(
                "%s is not the model this run's config.json was written for (fingerprints differ)", path / "model.keras"
            )
        model = keras.models.load_model(path / "model.keras", compile=False)
        classes = [str(c) for c in json.loads((path / "labels.json").read_text())]
        temperature, calibrated = load_temperature(path, fingerprint)
        metrics_path = path / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        return cls(
            path=path,
            model=model,
            classes=classes,
            config=config,
            temperature=temperature,
            calibrated=calibrated,
            fingerprint=fingerprint,
            metrics=metrics,
            hierarchy=load_hierarchy(path),
        )
