"""mcn: Multiple Choice Network fusion training (Wide ResNet experts + fusion module + global head)."""

__version__ = "0.1.0"


def load(source, fusion_type=None):
    """A finished fusion run's model (`mcn.inference.model.load`): a torch.nn.Module giving the fused logits, with
    `.predict(images)`. Imported on first use: `import mcn` stays light."""
    from mcn.inference.model import load as load_model

    return load_model(source, fusion_type)
