"""Hyper-parameter search over the fusion stage (`python -m mcn.tune`): Optuna trials, each an ordinary mcn fusion
run judged on validation, taken by workers that share one study in a journal file.

- `mcn.search.space`: the space, in the notation of Hydra's Optuna sweeper;
- `mcn.search.folder`: the search's folder, manifest and study, and how a worker takes a trial;
- `mcn.search.worker`: the worker (a Slurm array task through submitit, or a local process) and one trial's run;
- `mcn.search.report`: where it stands, the best parameters, plots, the rerun over seeds;
- `mcn.search.launch`: submit the workers, follow them (status, retry, cancel).
"""
