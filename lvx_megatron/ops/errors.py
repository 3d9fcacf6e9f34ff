"""The error of a bad setting, as every config that hands settings to the ops reports it."""


class SettingError(ValueError):
    """``field`` (named as the caller's config names it) holds a value the ops cannot use.

    ``str()`` is ``"<field> <problem>"``; a config that prints its own location takes ``field`` and
    ``problem`` apart.
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field = field
        self.problem = problem
