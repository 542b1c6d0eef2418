"""Any backbone of timm (PyTorch Image Models) as an expert, by name: `expert=timm expert.name=resnet18`.

Built from scratch by default. Pretrained weights are read from a local file only (nothing is downloaded):
`expert.pretrained=true` with the model's weights at `expert.pretrained_file`; timm fits them to the data's
channels and drops their classifier when the class count differs. Pretrained, the images reach it at its own
resolution and normalisation (`native_input`; the rule for several experts: `mcn.data.prepare.input_transform`).
A PyTorch file (not .safetensors) is read by the safe loader with the harmless metadata other code saves allowed
(`mcn.files.io`); one that needs more is refused.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from mcn.errors import CheckpointError, ConfigError
from mcn.files.io import allowing_harmless_globals, refusal, unsafe_object
from mcn.models.registry import ExpertSpec, register_expert


def _weights_page(name: str) -> str:
    import timm.models

    cfg = timm.models.get_pretrained_cfg(name)
    hub = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    return f"https://huggingface.co/{hub} (model.safetensors)" if hub else f"timm's page for {name}"


def native_input(spec: ExpertSpec) -> dict | None:
    """What an expert's pretrained weights were trained on, when it should be fed that: a pretrained timm backbone
    with its option `native_input` on (timm.data.resolve_data_config of its pretrained config): `input_size`
    (C, H, W), `mean` and `std` (per channel, [0, 1] units), `interpolation`. None otherwise (an expert from
    scratch, or one fed the data as it is, as runs before this option were)."""
    options = spec.options
    if spec.family != "timm" or not options.get("pretrained") or not options.get("native_input"):
        return None
    import timm.models
    from timm.data import resolve_data_config

    cfg = timm.models.get_pretrained_cfg(str(options.get("name", "")))
    found = resolve_data_config(pretrained_cfg=cfg.to_dict() if cfg is not None else {})
    return {k: found[k] for k in ("input_size", "mean", "std", "interpolation")}


class TimmExpert(nn.Module):
    """A timm model behind the uniform interface of `mcn.models.registry`: the features are timm's pre-logits
    (pooled, [B, d]), the head its classifier."""

    def __init__(
        self,
        name: str,
        num_classes: int,
        in_channels: int,
        pretrained: bool = False,
        pretrained_file: str | None = None,
    ):
        super().__init__()
        import timm

        if not name or not timm.is_model(name):
            raise ConfigError(
                f"unknown timm model {name!r}; set expert.name to one of timm.list_models() (e.g. resnet18)"
            )
        kwargs = dict(num_classes=num_classes, in_chans=in_channels)
        if pretrained:
            if not pretrained_file or not Path(pretrained_file).is_file():
                raise ConfigError(
                    f"expert.pretrained=true but timm model {name}'s weights are not at "
                    f"expert.pretrained_file={pretrained_file}; nothing is downloaded here: put the file from "
                    f"{_weights_page(name)} there, or set expert.pretrained=false"
                )
            kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(pretrained_file)))
        try:
            with allowing_harmless_globals():  # timm reads a .pth file with torch's safe loader
                self.model = timm.create_model(name, **kwargs)
        except RuntimeError as e:
            if not pretrained:
                raise
            needs = unsafe_object(e.__cause__) if isinstance(e.__cause__, pickle.UnpicklingError) else None
            if needs:  # timm's words for it name torch's options, which no mcn option reaches
                raise refusal(
                    pretrained_file,
                    needs,
                    "save the model's weights alone (its state_dict, or its .safetensors file) and point "
                    "expert.pretrained_file there",
                ) from None
            raise CheckpointError(  # a weights file of another model
                f"{pretrained_file} does not hold weights of timm model {name}: {str(e).splitlines()[0]}"
            ) from None
        self.architecture = dict(name=name, num_classes=num_classes, in_channels=in_channels)
        self.num_features = getattr(self.model, "head_hidden_size", None) or self.model.num_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.get_classifier()(features)

    def get_classifier(self) -> nn.Module:
        return self.model.get_classifier()

    def last_stage(self) -> list[nn.Module]:
        """timm's last feature stage (`feature_info[-1]`) and every top-level module after it (final norm, pooling,
        classifier)."""
        name = self.model.feature_info[-1]["module"]
        top = name.split(".")[0]
        children = [n for n, _ in self.model.named_children()]
        after = children[children.index(top) + 1 :]
        return [self.model.get_submodule(name), *(self.model.get_submodule(n) for n in after)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_expert("timm", family="timm")
def timm_expert(
    num_classes: int,
    in_channels: int,
    name: str = "",
    pretrained: bool = False,
    pretrained_file: str | None = None,
    native_input: bool = False,
) -> TimmExpert:
    """`native_input` concerns the data, not the module (`native_input`)."""
    return TimmExpert(name, num_classes, in_channels, pretrained, pretrained_file)
