"""Optimizers of the fusion head: Adam with clipping, an optional warm-up + cosine schedule, and BranchRateAdam."""

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


def make_optimizer(
    lr: float, schedule: str, epochs: int, steps: int, branch_rate: float | None = None, weight_decay: float = 0.0
):
    """Adam (clipnorm 1) with an optional cosine schedule; `weight_decay` > 0 adds decoupled weight decay (AdamW:
    each step w -= w * weight_decay * lr)."""
    rate = lr
    if schedule == "cosine":
        total = max(epochs * steps, 2)
        warmup = max(1, min(5 * steps, total // 10))
        rate = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=lr / 100, decay_steps=total - warmup, warmup_target=lr, warmup_steps=warmup
        )
    decay = {"weight_decay": weight_decay} if weight_decay else {}
    if branch_rate is not None:
        return BranchRateAdam(branch_rate=branch_rate, learning_rate=rate, clipnorm=1.0, **decay)
    return keras.optimizers.Adam(learning_rate=rate, clipnorm=1.0, **decay)
