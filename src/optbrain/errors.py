"""Exceptions raised by optbrain. Every one names its cause; none is an ``assert``."""

from __future__ import annotations


class OptbrainError(Exception):
    """Base class of every error optbrain raises on purpose."""


class UnsupportedModuleError(OptbrainError, TypeError):
    """A module has no rule in the per-layer registry of a structured estimator."""


class ShapeMismatchError(OptbrainError, ValueError):
    """Shapes do not fit: model output vs. loss target, or a mask vs. its parameter."""


class NonFiniteLossError(OptbrainError, FloatingPointError):
    """The loss (or a curvature quantity derived from it) is NaN or infinite."""


class EmptyDataError(OptbrainError, ValueError):
    """The data of a problem yielded no samples."""


class SingularCurvatureError(OptbrainError, ArithmeticError):
    """A curvature matrix could not be inverted, even with the documented damping fallback."""


class CurvatureTooLargeError(OptbrainError, ValueError):
    """A dense curvature matrix over this many coordinates would not fit the configured limit."""


class TargetUnreachableError(OptbrainError, ValueError):
    """A pruner has no candidate left to delete before reaching the requested target."""


class CalibrationError(OptbrainError, ValueError):
    """Calibration data cannot determine a layer: no input reached it, its inputs are all zero or
    not finite, or its calibration Hessian cannot be factorised."""


class EmptyLayerError(OptbrainError, ValueError):
    """A request would remove every input of the network, every unit/channel of a layer, or (with
    a selector's ``min_kept`` guard) every weight of a layer."""


class UnsupportedArgumentError(OptbrainError, TypeError):
    """A pruner was given an argument it cannot use (precomputed ``scores`` for a pruner that
    re-ranks after every deletion, ``units`` for one that does not remove cells)."""


class NonFiniteDataError(OptbrainError, ValueError):
    """A data batch holds NaN or infinity; the message names the split and the batch."""


class UnsafeFileError(OptbrainError, ValueError):
    """A file holds pickled code or objects; optbrain loads tensors only (weights_only=True)."""


class TooFewSamplesError(OptbrainError, ValueError):
    """The problem's data have too few samples for the measured objective to steer a pruner's
    adaptive sub-steps (:class:`optbrain.pruners.AdaptiveSteps`)."""


class DistributedError(OptbrainError, RuntimeError):
    """A data-parallel problem (``torch.distributed``) cannot go on: the ranks disagree, or one of
    them failed (:mod:`optbrain.distributed`)."""


class ShardMismatchError(DistributedError, ValueError):
    """The ranks of a process group hold data of different sample shapes or dtypes, or use
    different losses (their shards are not parts of one data set)."""


class EmptyShardError(DistributedError, EmptyDataError):
    """A rank of a process group holds no sample of the problem's data."""


class ModelMismatchError(DistributedError, ValueError):
    """The ranks of a process group hold different models (the checksums of their parameters and
    buffers differ)."""


class NotDistributedError(DistributedError, NotImplementedError):
    """A computation cannot run data-parallel; raised instead of returning a per-rank result."""


class RemoteRankError(DistributedError):
    """Another rank of the process group failed during a collective step; the message names the
    rank and its error."""
