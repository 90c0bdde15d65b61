"""ResNet teachers and Plain-CNN students from one definition."""

from models.dirac import DiracConv2d, fold_dirac
from models.folding import fold_batchnorm
from models.repvgg import RepConv, RepVGGBlock, fold_repconv, fold_repvgg
from models.resnet import (
    BLOCK_TYPES,
    BLOCKS,
    SHORTCUTS,
    STEMS,
    ResNet,
    freeze,
    param_groups,
    resnet,
)

__all__ = [
    "BLOCKS", "BLOCK_TYPES", "SHORTCUTS", "STEMS", "DiracConv2d", "RepConv", "RepVGGBlock",
    "ResNet", "fold_batchnorm", "fold_dirac", "fold_repconv", "fold_repvgg", "freeze",
    "param_groups", "resnet",
]
