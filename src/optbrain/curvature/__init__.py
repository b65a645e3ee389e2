"""Curvature estimators: diagonals of the Hessian, the GGN and Fisher-type matrices.

See :mod:`optbrain.curvature.base` for exact definitions of what each estimator computes.
"""

from .base import DiagonalCurvature, DiagonalEstimator
from .blocks import BlockInverse, BlockInverseHessian
from .calibration import LayerHessian, LayerwiseHessian, calibration_hessians
from .exact import ExactHessianDiagonal
from .fisher import EmpiricalFisherDiagonal, MCFisherDiagonal
from .ggn import GGNDiagonal
from .hutchinson import HutchinsonDiagonal
from .inverse import (
    AutoInverse,
    DirectInverse,
    InverseCurvature,
    InverseHessian,
    RecursiveInverse,
)
from .kfac import KFACInverse, KroneckerInverseHessian
from .lecun import LeCunDiagonal
from .paths import Path, explain
from .rules import register, register_elementwise
from .subsampled import SubsampledDiagonal, SubsampledEstimate

ESTIMATORS = {
    "lecun": LeCunDiagonal,
    "ggn": GGNDiagonal,
    "hessian": ExactHessianDiagonal,
    "empirical_fisher": EmpiricalFisherDiagonal,
    "mc_fisher": MCFisherDiagonal,
    "hutchinson": HutchinsonDiagonal,
}

__all__ = [
    "AutoInverse",
    "BlockInverse",
    "BlockInverseHessian",
    "DiagonalCurvature",
    "DirectInverse",
    "DiagonalEstimator",
    "EmpiricalFisherDiagonal",
    "ESTIMATORS",
    "ExactHessianDiagonal",
    "GGNDiagonal",
    "HutchinsonDiagonal",
    "InverseCurvature",
    "InverseHessian",
    "KFACInverse",
    "KroneckerInverseHessian",
    "LayerHessian",
    "LayerwiseHessian",
    "LeCunDiagonal",
    "MCFisherDiagonal",
    "Path",
    "explain",
    "RecursiveInverse",
    "SubsampledDiagonal",
    "SubsampledEstimate",
    "calibration_hessians",
    "register",
    "register_elementwise",
]
