"""User-facing errors: one line naming the bad value and the fix, never a traceback."""


class LexfineError(Exception):
    """An error caused by user input (config, data, paths). The CLI prints it as one line and exits 2."""


class ConfigError(LexfineError):
    pass


class DataError(LexfineError):
    pass


class ModelError(LexfineError):
    pass
