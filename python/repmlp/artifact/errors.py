"""The one exception the builder raises for anything it cannot do."""

__all__ = ["BuildError"]


class BuildError(ValueError):
    """The build cannot go on (bad input, failed verification, unwritable output)."""
