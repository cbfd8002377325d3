"""The error of a wrong setting."""


class ConfigError(ValueError):
    """A setting of the run's config is wrong; the message names it and says what to do."""
