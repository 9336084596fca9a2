"""laneswitch: a traffic splitter for safe releases."""

__version__ = "0.1.0"
