"""The config block of where things live (`paths`): every key, its default and meaning."""

from __future__ import annotations

from dataclasses import dataclass

from mcn.schema import key


@dataclass
class PathsConfig:
    """Where things live, relative to the directory you launch from (pinned to absolute paths when a run starts)."""

    output_root: str = key("outputs", "run folders (runs/, multirun/), shared splits and pretrained experts")
    data_dir: str = key("data", "where data sets are looked for (and, with data.download=true, fetched)")
    cache_dir: str = key(
        "${paths.output_root}/data_cache", "your own data sets, decoded once into uint8 arrays (mcn.data.cache)"
    )
    split_dir: str = key(
        "${paths.output_root}/splits/${data.name}_${split.scheme}_k${experts.num}_split${split.seed}",
        "the split's folder, shared by both stages",
    )
    experts_dir: str = key(
        "${paths.output_root}/experts/${data.name}_${split.scheme}_k${experts.num}_split${split.seed}"
        "_${mcn.experts_tag:}_seed${seed}",
        "the pretrained experts' folder: one per split, experts' presets and seed",
    )
