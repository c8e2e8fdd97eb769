"""credex: the points program's administration tool."""

__version__ = "0.1.0"
