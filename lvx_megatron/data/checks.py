"""Argument checks shared by the data modules."""


def check_positive(**values: int) -> None:
    """Raise ValueError naming the first of ``values`` (name=value) below 1."""
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
