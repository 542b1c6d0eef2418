"""Using a trained fusion model: load it (`load`, `FusedModel`), predict on image files (`Engine`, `Prediction`,
`mcn.predict`), export it with a parity check (`mcn.inference.export`, `mcn.export`), and its model card
(`mcn.inference.card`)."""

from mcn.inference.model import Engine, FusedModel, Prediction, load

__all__ = ["Engine", "FusedModel", "Prediction", "load"]
