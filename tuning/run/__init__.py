"""One training run: its config (`config`), its step (`step`), the loop that runs it and its
checkpoints (`trainer`, `checkpoint`), and the `tuning.train` command (`train`).

This layer needs PyTorch alone: Ray, MLflow and Optuna are never imported here.
"""
