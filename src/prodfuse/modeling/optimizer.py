"""Optimizers of the fusion head: Adam with clipping, an optional warm-up + cosine schedule, and BranchRateAdam; for
several replicas (`train --strategy mirrored`) the same with the clipping moved after the replicas' gradients are summed.
"""

from __future__ import annotations

import keras


@keras.saving.register_keras_serializable(package="prodfuse")
class BranchRateAdam(keras.optimizers.Adam):
    """Adam with a lower learning rate on pre-trained branches (variables of layers named image_* / text_*).

    Adam is invariant to gradient scale, so a lower rate cannot be had by scaling gradients: it must scale the step.
    """

    def __init__(self, branch_rate: float = 0.1, branch_prefixes=("image_", "text_"), **kwargs):
        super().__init__(**kwargs)
        self.branch_rate = branch_rate
        self.branch_prefixes = tuple(branch_prefixes)

    def build(self, var_list):
        super().build(var_list)
        # The backend hands update_step its own variable objects, so remember branch variables by index.
        self._branch_index = {
            i for i, v in enumerate(var_list) if v.path.split("/")[0].startswith(self.branch_prefixes)
        }

    def update_step(self, gradient, variable, learning_rate):
        if self._get_variable_index(variable) in self._branch_index:
            learning_rate = learning_rate * self.branch_rate
        super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        return {**super().get_config(), "branch_rate": self.branch_rate, "branch_prefixes": list(self.branch_prefixes)}


class ClipSummedGradients:
    """Clips (clipnorm) the gradient of the whole batch, summed over the replicas, as one device clips it.

    Keras 3 on TensorFlow clips each replica's gradient before its all-reduce sums them, so with R replicas a clipped
    step could be up to R times what one device takes on the same batch (and clipping engages at another norm). Here
    a dense gradient is summed over the replicas first and clipped, and each replica hands on 1/R of the clipped sum,
    which Keras' all-reduce adds back up. An embedding's gradient (IndexedSlices: one row per looked-up token, which
    Keras' all-reduce concatenates) is scaled by the factor one device would use, from the sum of its rows' squares
    over the replicas. One extra all-reduce per step; with one replica it is the optimizer it extends.
    """

    def _clip_gradients(self, grads):
        import tensorflow as tf

        context = tf.distribute.get_replica_context()  # None in a cross-replica context
        replicas = context.num_replicas_in_sync if context is not None else 1
        present = [g for g in grads if g is not None]
        if replicas == 1 or not present or not self.clipnorm:
            return super()._clip_gradients(grads)
        sparse = [isinstance(g, tf.IndexedSlices) for g in present]
        local = [tf.reduce_sum(tf.square(g.values)) if s else g for g, s in zip(present, sparse)]
        summed = iter(context.all_reduce(tf.distribute.ReduceOp.SUM, local))
        out = []
        for g in grads:
            if g is None:
                out.append(None)
            elif isinstance(g, tf.IndexedSlices):
                # tf.clip_by_norm's factor, clip_norm / max(norm, clip_norm), with the norm of every replica's rows
                clip = tf.cast(self.clipnorm, g.values.dtype)
                factor = clip / tf.maximum(tf.sqrt(next(summed)), clip)
                out.append(tf.IndexedSlices(g.values * factor, g.indices, g.dense_shape))
            else:
                out.append(self._clip_by_norm(next(summed)) * tf.cast(1.0 / replicas, g.dtype))
        return out


@keras.saving.register_keras_serializable(package="prodfuse")
class ReplicatedAdam(ClipSummedGradients, keras.optimizers.Adam):
    """Adam for several replicas: clipping after the replicas' gradients are summed."""


@keras.saving.register_keras_serializable(package="prodfuse")
class ReplicatedBranchRateAdam(ClipSummedGradients, BranchRateAdam):
    """BranchRateAdam for several replicas: clipping after the replicas' gradients are summed."""


def make_optimizer(
    lr: float,
    schedule: str,
    epochs: int,
    steps: int,
    branch_rate: float | None = None,
    weight_decay: float = 0.0,
    replicas: int = 1,
):
    """Adam (clipnorm 1) with an optional cosine schedule; `weight_decay` > 0 adds decoupled weight decay (AdamW:
    each step w -= w * weight_decay * lr). `replicas` > 1 (a distribution strategy's replicas, each computing the
    gradient of its share of the batch): the same, with the clipping moved after the replicas' gradients are summed.
    `steps` is the number of (global) batches per epoch."""
    rate = lr
    if schedule == "cosine":
        total = max(epochs * steps, 2)
        warmup = max(1, min(5 * steps, total // 10))
        rate = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=lr / 100, decay_steps=total - warmup, warmup_target=lr, warmup_steps=warmup
        )
    decay = {"weight_decay": weight_decay} if weight_decay else {}
    if branch_rate is not None:
        cls = ReplicatedBranchRateAdam if replicas > 1 else BranchRateAdam
        return cls(branch_rate=branch_rate, learning_rate=rate, clipnorm=1.0, **decay)
    cls = ReplicatedAdam if replicas > 1 else keras.optimizers.Adam
    return cls(learning_rate=rate, clipnorm=1.0, **decay)
