"""zoflat: an experiment runner for zeroth-order optimization research."""

__version__ = "0.1.0"
