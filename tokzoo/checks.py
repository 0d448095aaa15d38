"""Argument checks shared by every component: each raises ConfigError naming the component, the key and the value.

    positive_int("vit encoder", depth=depth, heads=heads)      # "vit encoder: depth=0 must be a positive integer"
    int_at_least(8, "data", image_size=image_size)             # "data: image_size=4 must be an integer >= 8"
    positive_number("text tower", mlp_ratio=mlp_ratio)         # ints and floats > 0
    divides("vit encoder", "width", width, "heads", heads)     # heads must divide width

bool is rejected wherever an integer or a number is expected: YAML's `true` would otherwise pass as 1.
"""

from __future__ import annotations

from tokzoo.errors import ConfigError


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def int_at_least(minimum: int, what: str, **values: object) -> None:
    """Raise ConfigError for the first value that is not an integer >= minimum."""
    wanted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    for key, value in values.items():
        if not is_int(value) or value < minimum:
            raise ConfigError(f"{what}: {key}={value!r} must be {wanted}")


def positive_int(what: str, **values: object) -> None:
    int_at_least(1, what, **values)


def positive_number(what: str, **values: object) -> None:
    """Raise ConfigError for the first value that is not an int or float > 0."""
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"{what}: {key}={value!r} must be a positive number")


def divides(what: str, num_name: str, numerator: int, den_name: str, denominator: int) -> None:
    """Raise ConfigError unless `denominator` divides `numerator`."""
    if numerator % denominator:
        raise ConfigError(
            f"{what}: {num_name}={numerator} is not divisible by {den_name}={denominator}; "
            f"choose values where {den_name} divides {num_name}"
        )
