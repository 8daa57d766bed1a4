"""vlm: an on-device vision-language model runtime."""

__version__ = "0.1.0"
