"""The config block of a `-m` sweep (`sweep`)."""

from __future__ import annotations

from dataclasses import dataclass

from mcn.schema import key


@dataclass
class SweepConfig:
    """A `-m` sweep's folder under multirun/ (mcn.cluster)."""

    name: str = key(
        "${now:%Y-%m-%d}/${now:%H-%M-%S}",
        "the sweep's folder under multirun/; a name (sweep.name=alpha_study) makes it stable: relaunching skips the "
        "finished jobs and resumes the others",
    )
