"""rein: Rein (CVPR 2024) for domain-generalized semantic segmentation on frozen VFMs."""

__version__ = "0.1.0"
