"""TEMP stand-in until the i17-cider branch lands."""

from caption.metrics.cider import CiderD, cider_d  # noqa: F401
