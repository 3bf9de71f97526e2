"""Cache methods behind one interface (see :mod:`kvjax.cache.base`)."""

from kvjax.cache.base import Cache, CacheMethod, write_at
from kvjax.cache.dense import Dense
from kvjax.cache.registry import available, get_method, parse_method, register

__all__ = ["Cache", "CacheMethod", "Dense", "available", "get_method", "parse_method", "register", "write_at"]
