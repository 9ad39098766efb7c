"""The configuration error type, in a module of its own so that every config module can raise it without
importing the flag parser (config/args.py re-exports it)."""


class ConfigError(ValueError):
    """A bad flag combination; the message names the flags involved."""


__all__ = ["ConfigError"]
