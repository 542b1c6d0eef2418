"""Sweeps on a cluster: the manifest a -m sweep keeps (`manifest`), what Slurm says (`slurm`), and each job's
state from both and its run folder (`jobs`)."""
