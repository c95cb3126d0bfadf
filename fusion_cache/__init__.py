"""fusion-cache: cached multi-layer features of a frozen CNN."""
__version__ = "0.1.0"
