"""mcn: Multiple Choice Network fusion training (Wide ResNet experts + fusion module + global head)."""

__version__ = "0.1.0"
