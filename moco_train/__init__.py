"""MoCo pretraining (He et al., CVPR 2020) on a folder of unlabeled images."""

__version__ = "0.1.0"
