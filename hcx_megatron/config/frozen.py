"""Freezing a validated config: parse -> resolve -> validate once -> freeze.

The config dataclasses (ModelConfig and the sections of Config) take this mixin. Until `freeze()` they are
ordinary dataclasses that the resolve step may edit; afterwards an assignment raises, so a value cannot change
after the checks that admitted it. A changed config is a new value: `dataclasses.replace` (then validate and
freeze that one).
"""

from __future__ import annotations

import dataclasses


class FrozenConfigError(AttributeError):
    """An assignment to a config after it was validated and frozen."""


class Freezable:
    _frozen = False  # a class attribute, not a dataclass field: asdict/replace/== ignore it

    def __setattr__(self, name, value):
        if self._frozen:
            raise FrozenConfigError(
                f"{type(self).__name__}.{name}: the config is frozen once validated; derive a changed copy with "
                "dataclasses.replace and validate it")
        object.__setattr__(self, name, value)


def freeze(config):
    """Freeze `config` and every config inside it, in place; returns it."""
    if isinstance(config, Freezable) and dataclasses.is_dataclass(config):
        for f in dataclasses.fields(config):
            freeze(getattr(config, f.name))
        object.__setattr__(config, "_frozen", True)
    return config


def is_frozen(config) -> bool:
    return isinstance(config, Freezable) and config._frozen


__all__ = ["Freezable", "FrozenConfigError", "freeze", "is_frozen"]
