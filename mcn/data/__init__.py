from mcn.data.datasets import DATASETS, ImageSet, load_dataset
from mcn.data.loader import TensorBatches, random_crop_flip

__all__ = ["DATASETS", "ImageSet", "TensorBatches", "load_dataset", "random_crop_flip"]
