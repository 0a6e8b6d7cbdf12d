"""The project's exceptions: one root, each message says what to fix.

The CLI turns any :class:`SettlementsError` into one line on stderr and exit code 2.
Subclasses also inherit a builtin so callers can catch either.
"""

from __future__ import annotations

import signal


class SettlementsError(Exception):
    """Root of every error a user can act on."""


class ConfigError(SettlementsError, ValueError):
    """Raised when a pipeline YAML or labels YAML is malformed or invalid."""


class RasterError(SettlementsError, OSError):
    """Raised when an input raster is missing, unreadable or unusable."""


class RegionError(SettlementsError, ValueError):
    """Raised when a region file is missing, empty or does not overlap the imagery."""


class TilingError(SettlementsError, ValueError):
    """Raised when the tile grid cannot be built (tile size vs pixel size, no valid tiles)."""


class BackboneError(SettlementsError, ValueError):
    """Raised when a backbone name or layer is unknown."""


class WeightsError(SettlementsError, OSError):
    """Raised when no usable pretrained weights are found, or a weights file is corrupt."""


class EngineError(SettlementsError, RuntimeError):
    """Raised when an inference engine is not installed or cannot run the exported network."""


class ClusteringError(SettlementsError, ValueError):
    """Raised when k-means cannot run (k out of range, too few tiles)."""


class OutputError(SettlementsError, OSError):
    """Raised when outputs cannot be written (folder not writable, disk full)."""


class StageError(SettlementsError, RuntimeError):
    """Raised when a stage needs an artifact that an earlier stage has not written."""


class RunLockedError(SettlementsError, RuntimeError):
    """Raised when another run of the same pipeline holds its lock (and ``--wait`` ran out)."""


class TrainingError(SettlementsError, ValueError):
    """Raised when training labels cannot train a model (fewer than two classes, no tiles)."""


class ModelFileError(SettlementsError, OSError):
    """Raised when a saved model or checkpoint is unreadable, holds more than tensors and plain data, or
    does not fit the pipeline."""


class ModelMismatchError(SettlementsError, ValueError):
    """Raised when a portable model file was made with another backbone, weights file, layer, input size or
    band count than the pipeline that is given it embeds with."""


class LegendMismatchError(SettlementsError, ValueError):
    """Raised when pipelines to be compared do not share one legend (labels, their order or colours)."""


class ExamplesError(SettlementsError, ValueError):
    """Raised when the example (or negative) tiles of ``settlements similar`` cannot be found: no file or
    layer, nothing drawn, no kept tile under what was drawn, unknown tile ids."""


class Interrupted(BaseException):
    """Raised in the main process when it receives SIGINT or SIGTERM (see :mod:`settlements.interrupts`).

    Not an Exception, so no ``except Exception`` swallows it; the command line exits 128 + the signal.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
