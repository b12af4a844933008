"""Run a training script's own main() for exactly STEPS optimizer steps and save the parameters
each rank ends with, so test_distributed.py can compare a data-parallel run with one process.

    python tests/fixed_steps.py SCRIPT STEPS OUT_DIR
    torchrun --nproc_per_node 2 tests/fixed_steps.py train 3 out/
    mlx.launch -n 2 --python python tests/fixed_steps.py train_mlx 3 out/

SCRIPT is train or train_mlx, imported as a module: everything a real run does happens, under
the real launcher. Two constants change so the run's length does not depend on the clock: every
step but the last is untimed and the time budget is a nanosecond, so the loop's own stopping rule
ends it after step STEPS - 1, with the schedules still at their starting values. Each rank then
writes OUT_DIR/rank<R>.npz ({parameter name: float32 array}).
"""

import importlib
import sys
from pathlib import Path

import numpy as np


def main():
    script, steps, out_dir = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    module = importlib.import_module(script)
    module.UNTIMED_STEPS = steps - 1
    module.TIME_BUDGET = 1e-9

    models = []

    class RecordedGPT(module.GPT):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            models.append(self)

    module.GPT = RecordedGPT
    module.main()

    if script == "train":  # its memory check builds one more GPT, on the meta device
        models = [model for model in models if not next(model.parameters()).is_meta]
    (model,) = models
    if script == "train":
        params = {name: p.detach().float().cpu().numpy() for name, p in model.named_parameters()}
    else:
        from mlx.utils import tree_flatten
        params = {name: np.array(p) for name, p in tree_flatten(model.parameters())}
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez(out_dir / f"rank{module.RANK}.npz", **params)


if __name__ == "__main__":
    main()
