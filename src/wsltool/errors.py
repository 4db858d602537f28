"""One error tree for wsltool.

Every error the toolkit raises on purpose derives from :class:`WslError`, and each subclass also
inherits the matching built-in exception so callers can catch either.  Messages are one line that
names the file (when there is one) and the problem; the CLI prints ``str(error)`` and exits non-zero.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class WslError(Exception):
    """Base class of every error wsltool raises on purpose."""

    exit_code: int = 2


class SlideError(WslError):
    """A problem with a slide file."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path is not None else problem)

    def __reduce__(self) -> tuple[Any, ...]:
        # picklable as raised (reader processes hand errors to the main process)
        return (type(self), (self.path, self.problem))


class SlideNotFoundError(SlideError, FileNotFoundError):
    """The slide file does not exist."""


class SlideFormatError(SlideError, ValueError):
    """The file is not a slide any backend can read, or it is corrupt or truncated."""


class SlideReadError(SlideError, OSError):
    """Reading pixels from an opened slide failed (corrupt tiles, I/O error)."""


class MppError(SlideError, ValueError):
    """The slide has no usable microns-per-pixel and none was given."""


class ConfigError(WslError, ValueError):
    """An invalid configuration value or configuration file."""


class LabelsError(WslError, ValueError):
    """A labels CSV (``path,label[,split]``) with one or more problems; all are listed in the message."""

    def __init__(self, path: str | Path, problems: list[str]) -> None:
        self.path = Path(path)
        self.problems = list(problems)
        shown = "; ".join(problems[:10])
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        super().__init__(f"{path}: {len(problems)} problem(s): {shown}{more}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.problems))


class CheckpointError(WslError, ValueError):
    """A checkpoint that cannot be loaded or does not fit the task."""


class StoreError(WslError, OSError):
    """A heatmap store that cannot be written or read, or is incomplete."""


class StoreExistsError(StoreError, FileExistsError):
    """A finished store is in the way and ``overwrite`` was not asked for."""


class DataError(WslError, ValueError):
    """Invalid input data (images, masks, test data) other than slides and label files."""
