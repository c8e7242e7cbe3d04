"""Run by test_distributed in a fresh process: split the CPU into two logical devices before TensorFlow initialises
them, then (1) one optimizer step on a tiny model with one device and mirrored over both, (2) `prodfuse train` on
EMBEDDINGS with one device (OUT/one) and mirrored over both (OUT/two), all in this one process as a notebook would.
Prints one JSON line: the step comparison.

    python tests/two_devices.py EMBEDDINGS OUT [train flags...]
"""

import json
import sys

import tensorflow as tf

DEVICES = ["/cpu:0", "/cpu:1"]


def split_cpu() -> None:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)


def two_steps(devices: list[str], sync_bn: bool = True, clip_sum: bool = True) -> tuple[list, list]:
    """The weights after two steps of prodfuse's optimizer (clipnorm 1, weight decay) on a small model like prodfuse's
    (Dense -> BN, and an Embedding whose gradient is IndexedSlices, as the text CNN's), and each replica's copy of the
    BN moving mean. The first batch's gradient is far above the clip norm, the second near it, and each replica's
    half of a batch has other statistics than the whole: per-replica clipping or batch statistics would show.
    prodfuse's mirrored path synchronises BN (`sync_bn`) and clips the replicas' summed gradient (`clip_sum`)."""
    import keras
    import numpy as np

    from prodfuse.modeling.config import TrainConfig
    from prodfuse.modeling.optimizer import make_optimizer
    from prodfuse.modeling.training import distribution_strategy, synchronize_batch_norm

    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4)).astype("float32")
    x[:8] *= 50  # batch 1: a large gradient, clipped
    x[8:] *= 10  # batch 2: a gradient near the clip norm, so how batch 1 was clipped still shows in Adam's step
    x[4:8] += 100  # replica 1's half of batch 1 sits elsewhere
    tokens = rng.integers(0, 5, size=(16, 3)).astype("int32")
    y = np.eye(2, dtype="float32")[rng.integers(0, 2, 16)]
    # prodfuse's strategy for these devices, which `train` reuses too: a second MirroredStrategy over the same devices
    # in this process would reuse the first one's collective keys, and these runs' collectives differ.
    with distribution_strategy(TrainConfig(strategy="mirrored", devices=tuple(devices), batch_size=8)).scope():
        keras.utils.set_random_seed(0)
        inputs = {"x": keras.Input((4,), name="x"), "tokens": keras.Input((3,), dtype="int32", name="tokens")}
        bn = keras.layers.BatchNormalization(momentum=0.5)
        hidden = bn(keras.layers.Dense(3, use_bias=False)(inputs["x"]))  # no bias before BN: its gradient is ~0
        words = keras.layers.Flatten()(keras.layers.Embedding(5, 2)(inputs["tokens"]))
        # the raw x beside them, as prodfuse's wide path: its large values give batch 1 a gradient above the clip norm
        output = keras.layers.Dense(2, activation="softmax")(keras.layers.Concatenate()([hidden, words, inputs["x"]]))
        model = keras.Model(inputs, output)
        if sync_bn:
            synchronize_batch_norm(model)
        replicas = len(devices) if clip_sum else 1
        model.compile(
            make_optimizer(0.1, "plateau", 1, 2, weight_decay=0.05, replicas=replicas), "categorical_crossentropy"
        )
        model.fit({"x": x, "tokens": tokens}, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    copies = getattr(bn.moving_mean.value, "values", [bn.moving_mean.value])
    return [w.tolist() for w in model.get_weights()], [c.numpy().tolist() for c in copies]


def main(emb: str, out: str, *flags: str) -> None:
    split_cpu()
    steps = {
        "one": two_steps(DEVICES[:1]),
        "two": two_steps(DEVICES),
        "two_keras_clip": two_steps(DEVICES, clip_sum=False),
        "two_keras_bn": two_steps(DEVICES, sync_bn=False),
    }
    from prodfuse.cli import main as prodfuse

    for name, extra in {"one": [], "two": ["--strategy", "mirrored", "--devices", ",".join(DEVICES)]}.items():
        assert prodfuse(["train", "--embeddings", emb, "--out", f"{out}/{name}", "--quiet", *flags, *extra]) == 0
    print(json.dumps({"steps": steps}))


if __name__ == "__main__":
    main(*sys.argv[1:])
