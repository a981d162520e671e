"""Errors that mean "the user asked for something wrong": the CLI prints them as one line."""


class UserError(ValueError):
    """A bad config value, missing data or an unusable run folder; the message says what to do."""


class UnknownNameError(UserError, KeyError):
    """An unknown dataset, algorithm, model or refiner name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
