"""ResNet teachers and Plain-CNN students from one definition."""

from models.dirac import DiracConv2d, fold_batchnorm, fold_dirac
from models.resnet import BLOCKS, SHORTCUTS, STEMS, ResNet, freeze, param_groups, resnet

__all__ = [
    "BLOCKS", "SHORTCUTS", "STEMS", "DiracConv2d", "ResNet", "fold_batchnorm", "fold_dirac",
    "freeze", "param_groups", "resnet",
]
