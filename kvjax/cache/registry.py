"""Every cache method, registered once by name, so CLIs can take ``--method NAME key=value ...``."""

from __future__ import annotations

import dataclasses
from typing import Any

_REGISTRY: dict[str, type] = {}


def register(name: str):
    """Class decorator: makes a method constructible by ``get_method(name, **settings)``."""
    def deco(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"cache method {name!r} registered twice")
        _REGISTRY[name] = cls
        return cls

    return deco


def available() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_method(name: str, **settings: Any):
    """Builds a registered method from its name and settings; unknown names or settings are clear errors."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown cache method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    cls = _REGISTRY[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in settings:
        if key not in fields:
            raise ValueError(f"cache method {name!r} has no setting {key!r}; settings: {', '.join(fields) or 'none'}")
    return cls(**settings)


def parse_method(spec: str):
    """Parses ``"name:key=value,key=value"`` (values as int, float, bool, tuple of ints, or str)."""
    name, _, rest = spec.partition(":")
    settings = {}
    for item in filter(None, rest.split(",")):
        if "=" not in item:
            raise ValueError(f"--method {spec!r}: setting {item!r} is not key=value")
        key, value = item.split("=", 1)
        settings[key.strip()] = _parse_value(value.strip())
    return get_method(name.strip(), **settings)


def _parse_value(value: str):
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    if "+" in value:  # layer lists: 0+1+5
        return tuple(int(x) for x in value.split("+") if x)
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def _load_builtin():
    # Importing the modules registers their methods.
    import kvjax.cache.autoencoder  # noqa: F401
    import kvjax.cache.dense  # noqa: F401
    import kvjax.cache.eviction  # noqa: F401
    import kvjax.cache.kivi  # noqa: F401
    import kvjax.cache.minicache  # noqa: F401
    import kvjax.cache.quantized  # noqa: F401
    import kvjax.cache.reuse  # noqa: F401
