"""argparse value types shared by the `miras` commands: each bad value is one line naming it and what is accepted."""

from __future__ import annotations

import argparse
import math


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer (expected a positive integer)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not positive (expected an integer >= 1)")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(float(text)) if "e" in text.lower() else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer (expected an integer >= 0)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative (expected an integer >= 0)")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (expected a number >= 0)") from None
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number >= 0 (expected a number >= 0)")
    return value


def byte_size(text: str) -> int:
    """'2GB', '500MB', '123456' -> bytes (decimal units, as transformers' max_shard_size)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    units.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30})
    number = text.strip().upper().rstrip()
    digits = number.rstrip("KMGTIB")
    unit = number[len(digits) :]
    try:
        value = float(digits) * units[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (expected e.g. 2GB, 500MB or a byte count)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not positive (expected e.g. 2GB)")
    return int(value)


def open_unit_float(text: str) -> float:
    """A number strictly between 0 and 1 (a rate such as the memory's retention alpha)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (expected a number in (0, 1))") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not strictly between 0 and 1 (expected a number in (0, 1))")
    return value


def positive_float(text: str) -> float:
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("0 is not allowed (expected a number > 0)")
    return value
