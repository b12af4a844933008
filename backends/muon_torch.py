"""Muon+AdamW for PyTorch (CPU, MPS, CUDA): AdamW for embeddings, lm_head and scalars; Muon with
Nesterov momentum, Polar Express orthogonalisation, NorMuon variance reduction and cautious
weight decay for the transformer's matrices.

Groups come from backends.optim.param_groups. The optimizer keeps those very dicts as its
param_groups (adding their "params"), and reads lr, momentum and weight_decay from them at every
step, so a schedule that sets them each step reaches every group. The step runs eagerly with
foreach and batched ops: it works beside a torch.compile'd model (same Parameter objects) and on
MPS, where every op used here exists; the scalars enter as Python floats, never 0-d tensors, so
nothing recompiles or waits on the device, and lerp never needs MPS's tensor-weight variant.
backends/muon_mlx.py is the MLX twin; tests check both give the same parameters for the same
inputs.
"""

import torch

from backends.optim import (POLAR_NORM_EPS, POLAR_NORM_SAFETY, SECOND_MOMENT_FLOOR,
                            muon_lr_scale, normuon_axis, polar_express, second_moment_shape)


class MuonAdamW(torch.optim.Optimizer):
    """named_params: {name: Parameter}, e.g. dict(model.named_parameters()); groups: the list
    from param_groups over the same names. orth_dtype: dtype of the Polar Express matmuls, the
    run's compute dtype (no default: emulated bf16 made them 30x slower than fp32 on an AVX2 CPU;
    fp32 also when comparing frameworks exactly)."""

    def __init__(self, named_params, groups, *, orth_dtype):
        grouped = [name for group in groups for name in group["names"]]
        missing = sorted(set(named_params) - set(grouped))
        unknown = sorted(set(grouped) - set(named_params))
        if missing or unknown:
            raise ValueError(f"parameters and groups disagree (not in any group: {missing}; "
                             f"not a parameter: {unknown}): build the groups with param_groups "
                             f"from the same named parameters")
        for group in groups:
            group["params"] = [named_params[name] for name in group["names"]]
        super().__init__(groups, defaults={})
        self.orth_dtype = orth_dtype

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            if group["kind"] == "adamw":
                self._adamw_step(group)
            else:
                self._muon_step(group)

    def _adamw_step(self, group):
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        states = [self.state[p] for p in params]
        for p, state in zip(params, states):
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
        exp_avgs = [state["exp_avg"] for state in states]
        exp_avg_sqs = [state["exp_avg_sq"] for state in states]
        lr, weight_decay, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        bias1 = [1 - beta1 ** state["step"] for state in states]
        bias2 = [1 - beta2 ** state["step"] for state in states]

        if weight_decay != 0:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_lerp_(exp_avg_sqs, torch._foreach_mul(grads, grads), 1 - beta2)
        denom = torch._foreach_mul(exp_avg_sqs, [1 / b for b in bias2])
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / b for b in bias1])

    def _muon_step(self, group):
        params = group["params"]
        if all(p.grad is None for p in params):
            return
        # A matrix the forward pass did not use has no gradient; it steps with a zero one, as
        # it would in MLX, whose gradients always cover every parameter.
        grads = torch.stack([torch.zeros_like(p) if p.grad is None else p.grad for p in params])
        stacked = torch.stack(params)
        count, rows, cols = stacked.shape
        # One state per group, stacked like the parameters, kept under the group's first one.
        state = self.state[params[0]]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(stacked)
            state["second_momentum_buffer"] = torch.zeros(
                second_moment_shape(count, rows, cols), dtype=torch.float32, device=stacked.device)
        momentum = group["momentum"]
        lr = group["lr"] * muon_lr_scale(rows, cols)
        weight_decay = group["weight_decay"]

        # Nesterov momentum: step along the gradient blended with the updated buffer.
        momentum_buffer = state["momentum_buffer"]
        momentum_buffer.lerp_(grads, 1 - momentum)
        update = grads.lerp_(momentum_buffer, momentum)

        update = update.float()
        norm = torch.linalg.vector_norm(update, dim=(-2, -1), keepdim=True)
        X = (update / (norm * POLAR_NORM_SAFETY + POLAR_NORM_EPS)).to(self.orth_dtype)
        update = polar_express(X, group["ns_steps"]).float()

        update = self._normuon(update, state["second_momentum_buffer"], group["beta2"])

        # Cautious weight decay: shrink only the entries the update already pushes towards zero.
        update = update.to(stacked.dtype)
        decay_mask = (update * stacked) >= 0
        stacked.sub_(lr * update + (lr * weight_decay) * stacked * decay_mask)
        torch._foreach_copy_(params, list(stacked.unbind(0)))

    @staticmethod
    def _normuon(update, second_momentum_buffer, beta2):
        """Per-row (or per-column) adaptive step sizes from a running mean of squared updates,
        rescaled so each matrix keeps the Frobenius norm orthogonalisation gave it."""
        axis = normuon_axis(*update.shape[-2:])
        mean_sq = update.square().mean(dim=axis, keepdim=True)
        second_momentum_buffer.lerp_(mean_sq, 1 - beta2)
        step_size = second_momentum_buffer.clamp_min(SECOND_MOMENT_FLOOR).rsqrt()
        # ||update||² and ||update * step_size||², from the per-row (column) means alone.
        length = update.shape[axis]
        norm_sq = (mean_sq * length).sum(dim=(-2, -1), keepdim=True)
        scaled_norm_sq = (mean_sq * length * step_size.square()).sum(dim=(-2, -1), keepdim=True)
        rescale = norm_sq.sqrt() / scaled_norm_sq.sqrt().clamp_min(SECOND_MOMENT_FLOOR)
        return update * (step_size * rescale)
