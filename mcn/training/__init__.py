"""Training: the epoch loop and the dual-path objective (`loop`), optimisers and schedules (`optim`), the device
and speed switches (`runtime`), process groups (`mcn.distributed`), experiment tracking (`tracking`) and the
config checks every stage shares (`config`). The stages themselves are recipes (`mcn.recipes`)."""
