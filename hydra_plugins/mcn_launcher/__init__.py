"""mcn's Hydra launchers: submitit's, with one-line errors instead of tracebacks (see launcher.py)."""
