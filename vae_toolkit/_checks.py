"""Argument checks shared by the dataset and evaluate calls: one message for one mistake."""

from __future__ import annotations


def check_int(name: str, value: object, minimum: int, allow_none: bool = False) -> None:
    """``TypeError`` unless ``value`` is an int (not a bool), ``ValueError`` when it is below ``minimum``."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__}: {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
