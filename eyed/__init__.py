"""eyed: an edge vision daemon that publishes labels, never pixels."""

__version__ = "0.1.0"
