"""diskwatch: watch what a virtual machine does to its disk, live."""

__version__ = "0.1.0"
