"""The kit's tools: commands a person or an agent runs (`uv run tools/<name>.py ...`) and the
modules they share. They import each other as `from tools import ledger`; the editable install
(pyproject.toml) puts the repository root on the import path of every `uv run`. Tools may import
the locked harness (prepare.py, datasets.py, backends/); the harness never imports tools.

The experiment runner starts in experiment.py (the command line and the order of things) and is
split by concern: checkout.py (git, the harness check), runner_state.py (lock, state, signals),
kind.py (the kind of a result), training_run.py (one run), serial.py (`run`, `baseline`, verdict
lines), parallel.py (`wait`), with cluster.py and scheduler.py for parallel slots.
"""
