"""Shared LPT core: prompt-set format and the prompted-ViT forward used by trainer and service."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lpt-serve")  # the installed distribution's version: pyproject.toml is the one source
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
