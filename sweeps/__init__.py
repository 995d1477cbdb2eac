"""Calibration sweeps run by hand (``python -m sweeps.<name>``); their results live in ``docs/``."""
