"""Shared LPT core: prompt-set format and the prompted-ViT forward used by trainer and service."""

__version__ = "0.1.0"
