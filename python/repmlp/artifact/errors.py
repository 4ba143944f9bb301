"""The exceptions the builder raises for anything it cannot do."""

from typing import Optional

__all__ = ["BuildError", "OptionError"]


class BuildError(ValueError):
    """The build cannot go on (bad input, failed verification, unwritable output)."""


class OptionError(BuildError):
    """Options that are invalid together or against the checkpoint, found before building.
    ``option`` is the keyword at fault (None when several are)."""

    def __init__(self, message: str, option: Optional[str] = None) -> None:
        super().__init__(message)
        self.option = option
