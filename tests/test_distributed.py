"""`train --strategy mirrored`: the settings' checks, and training on two logical CPU devices (no GPU here) to the
accuracy of one device on the demo.

TensorFlow's devices can be split only before it initialises them, so the two-device training runs in a fresh
process. The demo shards are the built-in demo's (random-weight ResNet50, RapidOCR, TF-IDF), extracted once into
the test cache outside the clone like test_accuracy's: warm runs only train.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import prodfuse
from prodfuse.checks import as_dict, from_dict
from prodfuse.cli import build_parser
from prodfuse.cli import train as train_cli
from prodfuse.cli.common import ConfigError
from prodfuse.modeling import training
from prodfuse.modeling.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("PRODFUSE_CACHE", Path.home() / ".cache" / "prodfuse")) / "test-embeddings"
DEVICES = "/cpu:0,/cpu:1"

# Few epochs keep the test near a minute: two "devices" sharing 2 cores take ~4x one device's time per epoch. Measured
# with --epochs 8 on the demo (48 test items), where early stopping on val_loss restored epoch 4 or 5 in every run
# (runs are deterministic for a seed, so --epochs 5 makes the same models): the default strategy's test accuracy was
# 0.8958, 0.9167, 0.9583 for seeds 42, 43, 44, a spread of 0.0625 (3 items), which is TOLERANCE; mirrored over the
# two devices 0.8958, 0.9375, 0.9167 (differences 0, +0.021, -0.042).
# A jointly trained fusion: one model per run keeps this test's time (the default product fusion trains two, each
# under the same strategy)
TRAIN_FLAGS = ["--epochs", "5", "--seed", "42", "--fusion", "gated"]
TOLERANCE = 0.0625


def train_config(*argv):
    args = build_parser().parse_args(["train", *argv])
    args.stderr_tty = False
    return train_cli.config(args)


def test_strategy_and_devices_are_checked():
    with pytest.raises(ValueError, match="strategy must be one of .*'horovod'"):
        TrainConfig(strategy="horovod")
    with pytest.raises(ValueError, match="only apply to strategy 'mirrored'"):
        TrainConfig(devices=("/gpu:0",))
    with pytest.raises(ValueError, match="batch_size 33 cannot be split evenly over 2 replicas.*32 or 34"):
        TrainConfig(strategy="mirrored", devices=("/gpu:0", "/gpu:1"), batch_size=33)
    with pytest.raises(ValueError, match="must not repeat"):
        TrainConfig(strategy="mirrored", devices=("/gpu:0", "/gpu:0"))
    with pytest.raises(ConfigError, match="^--batch-size 33 cannot be split evenly over 2 replicas"):
        train_config("--strategy", "mirrored", "--devices", DEVICES, "--batch-size", "33")
    with pytest.raises(SystemExit):  # argparse: not a choice
        train_config("--strategy", "horovod")
    config = train_config("--strategy", "mirrored", "--devices", " /cpu:0, /cpu:1 ")
    assert config.strategy == "mirrored" and config.devices == ("/cpu:0", "/cpu:1")
    assert train_config().strategy == "default" and train_config().devices is None
    assert from_dict(TrainConfig, json.loads(json.dumps(as_dict(config)))) == config  # config.json round trip


def test_replicas_that_cannot_share_the_batch_and_missing_devices_are_refused(monkeypatch):
    # Without --devices the replicas are the visible GPUs, known only once TensorFlow sees them: three, say.
    import tensorflow as tf

    class ThreeReplicas:
        num_replicas_in_sync = 3

        def __init__(self, devices=None):
            assert devices is None
            self.extended = type("Extended", (), {"worker_devices": ("/gpu:0", "/gpu:1", "/gpu:2")})

    monkeypatch.setattr(tf.distribute, "MirroredStrategy", ThreeReplicas)
    monkeypatch.setattr(training, "_MIRRORED", {})
    config = TrainConfig(strategy="mirrored", batch_size=32)
    with pytest.raises(ValueError, match="batch_size 32 cannot be split evenly over 3 replicas.*30 or 33"):
        training.distribution_strategy(config)
    assert training.distribution_strategy(TrainConfig()) is None
    # a device TensorFlow does not have is refused (TensorFlow itself would quietly place its replica elsewhere)
    with pytest.raises(ValueError, match=r"devices \['/gpu:7'\] are not visible to TensorFlow"):
        training.distribution_strategy(TrainConfig(strategy="mirrored", devices=("/cpu:0", "/gpu:7")))


@pytest.fixture(scope="module")
def demo_shards():
    """The built-in demo catalog embedded as `extract_embeddings.py` does offline (its ImageNet fallback is the same
    seeded random ResNet50 as --weights none), cached; the OCR cache is the shared one, so warm runs read no photo."""
    from prodfuse.data.demo import write_demo_catalog

    catalog = write_demo_catalog(CACHE / "demo-catalog")
    out = CACHE / "demo-resnet50-random"
    prodfuse.extract(
        prodfuse.ExtractConfig(
            catalog=str(catalog),
            out=str(out),
            backbone="resnet50",
            weights="none",
            views=1,
            overwrite=True,
            progress=False,
        )
    )
    return out


@pytest.fixture(scope="module")
def two_devices(demo_shards, tmp_path_factory):
    """tests/two_devices.py in a fresh process: its step comparison, and its one- and two-device runs (loaded)."""
    out = tmp_path_factory.mktemp("two-devices")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    cmd = [sys.executable, str(ROOT / "tests" / "two_devices.py"), str(demo_shards), str(out), *TRAIN_FLAGS]
    done = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = {name: prodfuse.Run.load(out / name) for name in ("one", "two")}
    return {"stdout": done.stdout, "steps": json.loads(done.stdout.strip().splitlines()[-1])["steps"], **runs}


def test_mirrored_steps_are_one_device_steps(two_devices):
    # Keras clips each replica's gradient before summing them, and each replica's BatchNormalization follows its own
    # share of the batch: prodfuse clips the sum and synchronises BN, so two replicas take one device's steps.
    steps = two_devices["steps"]
    (one, _), (two, two_copies) = steps["one"], steps["two"]
    for a, b in zip(one, two):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(two_copies[0], two_copies[1], rtol=1e-5, atol=1e-6)  # the replicas agree
    # the check can fail: either of Keras' own ways, kept, changes the steps
    for name in ("two_keras_clip", "two_keras_bn"):
        assert not all(np.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(one, steps[name][0])), name
    assert not np.allclose(*steps["two_keras_bn"][1])  # each replica its own moving mean


def test_mirrored_on_two_devices_trains_to_the_accuracy_of_one(two_devices):
    one, two = two_devices["one"], two_devices["two"]
    assert (one.config["replicas"], one.config["train"]["strategy"]) == (1, "default")
    assert (two.config["replicas"], two.config["train"]["strategy"]) == (2, "mirrored")
    assert two.config["train"]["devices"] == ["/cpu:0", "/cpu:1"] and two.train_config.devices == ("/cpu:0", "/cpu:1")
    assert "mirrored strategy: 2 replica(s), global batch 32 (16 per replica)" in two_devices["stdout"]
    accuracy = {"one": one.metrics["test"]["accuracy"], "two": two.metrics["test"]["accuracy"]}
    assert accuracy["one"] > 0.8, accuracy  # the demo is learnt at all in these few epochs
    assert abs(accuracy["two"] - accuracy["one"]) <= TOLERANCE, accuracy
