"""Test-session settings; the helpers the tests share are in `tests/helpers`."""

import os

os.environ.setdefault("WANDB_MODE", "disabled")  # no test tracks to wandb unless it asks
