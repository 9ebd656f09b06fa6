"""Model configs: frozen dataclasses parsed from the official ``{"name": ..., "args": {...}}`` JSON.

Each model file defines ``<Model>Config(ModelConfig)`` whose fields are exactly the official constructor
arguments. ``from_args`` rejects unknown keys by name (a typo or a checkpoint of another model must not be
silently ignored) and converts JSON lists to tuples so configs are hashable and immutable. Invariants are
checked in each subclass's ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

import torch

from ..errors import ConfigError

C = TypeVar("C", bound="ModelConfig")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class FrozenDict(dict):
    """A dict that cannot change and can be hashed: JSON objects inside a frozen config (e.g. ``block_args``)."""

    def _readonly(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("config values are immutable; build a new config with dataclasses.replace")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _readonly  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, Mapping):
        return FrozenDict({k: _freeze(v) for k, v in value.items()})
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    return value


def parse_dtype(name: str, *, what: str) -> torch.dtype:
    """Official dtype string ('float32', 'float16', 'bfloat16') to torch dtype."""
    if name not in _DTYPES:
        raise ConfigError(f"{what}: dtype must be one of {sorted(_DTYPES)}; got {name!r}")
    return _DTYPES[name]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Base of every model config. Subclasses add the official constructor arguments as fields."""

    @classmethod
    def from_args(cls: type[C], args: Mapping[str, Any], *, source: str = "config") -> C:
        if not isinstance(args, Mapping):
            raise ConfigError(f"{source}: 'args' must be a JSON object; got {type(args).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - set(fields))
        if unknown:
            raise ConfigError(
                f"{source}: unknown argument(s) {unknown} for {cls.__name__}; "
                f"known arguments are {sorted(fields)}. Is this the config of another model?"
            )
        missing = sorted(
            name
            for name, f in fields.items()
            if name not in args and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        )
        if missing:
            raise ConfigError(f"{source}: missing required argument(s) {missing} for {cls.__name__}")
        try:
            return cls(**{k: _freeze(v) for k, v in args.items()})
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: invalid arguments for {cls.__name__}: {e}") from e

    def to_args(self) -> dict[str, Any]:
        """The official ``args`` dict (tuples back to lists), for writing ``ckpts/<name>.json``."""
        return {f.name: _thaw(getattr(self, f.name)) for f in dataclasses.fields(self)}
