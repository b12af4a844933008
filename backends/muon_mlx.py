"""Muon+AdamW for MLX, the twin of backends/muon_torch.py: the same groups (from
backends.optim.param_groups), the same update for the same inputs (tested against torch).

Made for an mx.compile'd training step:

    optimizer = MuonAdamW(groups)
    optimizer.init(model.trainable_parameters())
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x, y):
        loss, grads = loss_and_grad(model, x, y)
        optimizer.update(model, grads)
        return loss

    for each step:
        set group["lr"] (and "momentum", "weight_decay") in optimizer.param_groups
        optimizer.sync_schedule()
        loss = step(x, y)

A compiled function runs the Python in update() once, while tracing, so a float read from a group
there would be frozen into the graph. Instead each group's lr, momentum and weight_decay live as
mx.array scalars in `state`, which the compiled step takes as input on every call, and
sync_schedule() copies the group dicts into them. Everything else the update touches (moments,
momentum buffers, the step counter) is in `state` too. Optimizer math runs in float32; results
are stored back in each parameter's own dtype.
"""

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map_with_path

from backends.optim import (POLAR_NORM_EPS, POLAR_NORM_SAFETY, SECOND_MOMENT_FLOOR,
                            muon_lr_scale, normuon_axis, polar_express, second_moment_shape)

# Group entries a schedule may change between steps; each is an mx.array scalar in the state.
SCHEDULED_KEYS = {"adamw": ("lr", "weight_decay"), "muon": ("lr", "momentum", "weight_decay")}


class MuonAdamW:
    """groups: the list from param_groups, kept as self.param_groups (the same dicts).
    orth_dtype: dtype of the Polar Express matmuls, the run's compute dtype (no default, as in
    the torch twin; fp32 also to compare with torch exactly)."""

    def __init__(self, groups, *, orth_dtype):
        self.param_groups = groups
        self.orth_dtype = orth_dtype
        self._state = {"step": mx.array(0), "groups": [{} for _ in groups]}
        self._initialized = False
        self.sync_schedule()

    @property
    def state(self):
        """Every array the update reads or writes, besides the model's parameters."""
        return self._state

    def sync_schedule(self):
        """Copy each group's lr, momentum and weight_decay into the state, where the (compiled)
        update reads them. Call after changing them and before the next step."""
        for group, group_state in zip(self.param_groups, self._state["groups"]):
            for key in SCHEDULED_KEYS[group["kind"]]:
                group_state[key] = mx.array(group[key], dtype=mx.float32)

    def init(self, parameters):
        """Create the zeroed moments and buffers from the parameter tree (e.g.
        model.trainable_parameters()). Call before mx.compile so the state is complete."""
        arrays = dict(tree_flatten(parameters))
        grouped = [name for group in self.param_groups for name in group["names"]]
        missing = sorted(set(arrays) - set(grouped))
        unknown = sorted(set(grouped) - set(arrays))
        if missing or unknown:
            raise ValueError(f"parameters and groups disagree (not in any group: {missing}; "
                             f"not a parameter: {unknown}): build the groups with param_groups "
                             f"from the same named parameters")
        for group, group_state in zip(self.param_groups, self._state["groups"]):
            params = [arrays[name] for name in group["names"]]
            if group["kind"] == "adamw":
                group_state["exp_avg"] = [mx.zeros_like(p) for p in params]
                group_state["exp_avg_sq"] = [mx.zeros_like(p) for p in params]
            else:
                count, (rows, cols) = len(params), params[0].shape
                group_state["momentum_buffer"] = mx.zeros((count, rows, cols), params[0].dtype)
                group_state["second_momentum_buffer"] = mx.zeros(
                    second_moment_shape(count, rows, cols), mx.float32)
        self._initialized = True

    def update(self, model, grads):
        """One optimizer step: grads is the nested dict from nn.value_and_grad."""
        if not self._initialized:
            self.init(grads)
        params = dict(tree_flatten(model.trainable_parameters()))
        grads = dict(tree_flatten(grads))
        self._state["step"] = self._state["step"] + 1
        updated = {}
        for group, group_state in zip(self.param_groups, self._state["groups"]):
            if group["kind"] == "adamw":
                updated.update(self._adamw_step(group, group_state, params, grads))
            else:
                updated.update(self._muon_step(group, group_state, params, grads))
        # Rebuild the tree by mapping over the model's own one: tree_unflatten would turn dicts
        # with numeric keys (value_embeds.1) into lists.
        model.update(tree_map_with_path(lambda name, _: updated[name],
                                        model.trainable_parameters()))

    def _adamw_step(self, group, group_state, params, grads):
        lr, weight_decay = group_state["lr"], group_state["weight_decay"]
        beta1, beta2 = group["betas"]
        step = self._state["step"]
        bias1 = 1 - beta1 ** step
        bias2 = 1 - beta2 ** step
        updated = {}
        for i, name in enumerate(group["names"]):
            p, g = params[name], grads[name]
            exp_avg, exp_avg_sq = group_state["exp_avg"][i], group_state["exp_avg_sq"][i]
            exp_avg = exp_avg + (1 - beta1) * (g - exp_avg)
            exp_avg_sq = exp_avg_sq + (1 - beta2) * (g * g - exp_avg_sq)
            new_p = p * (1 - lr * weight_decay)
            new_p = new_p - (lr / bias1) * exp_avg / (mx.sqrt(exp_avg_sq / bias2) + group["eps"])
            group_state["exp_avg"][i] = exp_avg.astype(p.dtype)
            group_state["exp_avg_sq"][i] = exp_avg_sq.astype(p.dtype)
            updated[name] = new_p.astype(p.dtype)
        return updated

    def _muon_step(self, group, group_state, params, grads):
        names = group["names"]
        stacked = mx.stack([params[name] for name in names])
        update = mx.stack([grads[name] for name in names]).astype(mx.float32)
        count, rows, cols = stacked.shape
        momentum = group_state["momentum"]
        lr = group_state["lr"] * muon_lr_scale(rows, cols)
        weight_decay = group_state["weight_decay"]

        # Nesterov momentum: step along the gradient blended with the updated buffer.
        momentum_buffer = group_state["momentum_buffer"]
        momentum_buffer = momentum_buffer + (1 - momentum) * (update - momentum_buffer)
        group_state["momentum_buffer"] = momentum_buffer.astype(stacked.dtype)
        update = update + momentum * (momentum_buffer - update)

        norm = mx.sqrt(mx.sum(update * update, axis=(-2, -1), keepdims=True))
        X = (update / (norm * POLAR_NORM_SAFETY + POLAR_NORM_EPS)).astype(self.orth_dtype)
        update = polar_express(X, group["ns_steps"]).astype(mx.float32)

        update = self._normuon(update, group_state, group["beta2"])

        # Cautious weight decay: shrink only the entries the update already pushes towards zero.
        decay_mask = (update * stacked) >= 0
        new_stacked = stacked - (lr * update + (lr * weight_decay) * stacked * decay_mask)
        new_stacked = new_stacked.astype(stacked.dtype)
        return {name: new_stacked[i] for i, name in enumerate(names)}

    @staticmethod
    def _normuon(update, group_state, beta2):
        """Per-row (or per-column) adaptive step sizes from a running mean of squared updates,
        rescaled so each matrix keeps the Frobenius norm orthogonalisation gave it."""
        axis = normuon_axis(*update.shape[-2:])
        mean_sq = mx.mean(update * update, axis=axis, keepdims=True)
        buffer = group_state["second_momentum_buffer"]
        buffer = buffer + (1 - beta2) * (mean_sq - buffer)
        group_state["second_momentum_buffer"] = buffer
        step_size = mx.rsqrt(mx.maximum(buffer, SECOND_MOMENT_FLOOR))
        # ||update||² and ||update * step_size||², from the per-row (column) means alone.
        length = update.shape[axis]
        norm_sq = mx.sum(mean_sq * length, axis=(-2, -1), keepdims=True)
        scaled_norm_sq = mx.sum(mean_sq * length * mx.square(step_size), axis=(-2, -1),
                                keepdims=True)
        rescale = mx.sqrt(norm_sq) / mx.maximum(mx.sqrt(scaled_norm_sq), SECOND_MOMENT_FLOOR)
        return update * (step_size * rescale)
