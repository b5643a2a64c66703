"""Identity-keyed weak caches shared by the vocabulary tables and the attribution's caches."""

from __future__ import annotations

import weakref
from typing import Any


class _IdCache:
    """A cache keyed by object identity that forgets an entry when its key object dies.

    ``weakref.WeakKeyDictionary`` compares keys with ``==``, which tensors overload
    elementwise; identity is what is meant here (the same weight, table or tokenizer).
    """

    def __init__(self) -> None:
        self._data: dict[int, tuple[weakref.ref[Any], Any]] = {}

    def get(self, obj: Any) -> Any:
        entry = self._data.get(id(obj))
        if entry is not None and entry[0]() is obj:
            return entry[1]
        return None

    def put(self, obj: Any, value: Any) -> None:
        key = id(obj)
        data = self._data

        def forget(_: weakref.ref[Any], key: int = key) -> None:
            data.pop(key, None)

        try:
            ref = weakref.ref(obj, forget)
        except TypeError:  # not weak-referenceable: do not cache (ids could be reused)
            return
        data[key] = (ref, value)
