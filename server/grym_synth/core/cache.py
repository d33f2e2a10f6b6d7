"""A bounded LRU cache for deterministic results.

Analysis of the same audio (same samples after decoding and resampling) and generation with the same prompt,
seed and parameters give the same output, so the orchestrator answers repeats from memory. The cache is bounded
by entries *and* bytes so a burst of long clips cannot grow the process; hits and misses are exported as
``grym_cache_requests_total{cache,result}`` (hit ratio = hit / (hit + miss)).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Generic, TypeVar

from grym_synth.core.metrics import Metrics

V = TypeVar("V")


def digest(*parts: bytes | str) -> str:
    """A collision-resistant key over the request's defining parts."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


class LruCache(Generic[V]):
    """Entries are (value, size_bytes); the least recently used go first when either bound is passed."""

    def __init__(self, name: str, *, max_entries: int, max_bytes: int, metrics: Metrics | None = None) -> None:
        self.name = name
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.metrics = metrics
        self._data: OrderedDict[str, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.max_bytes > 0

    def get(self, key: str) -> V | None:
        if not self.enabled:
            return None
        with self._lock:
            item = self._data.get(key)
            if item is not None:
                self._data.move_to_end(key)
        if self.metrics:
            self.metrics.cache_requests.labels(self.name, "hit" if item else "miss").inc()
        return item[0] if item else None

    def put(self, key: str, value: V, size_bytes: int) -> None:
        if not self.enabled or size_bytes > self.max_bytes:
            return
        with self._lock:
            old = self._data.pop(key, None)
            if old:
                self._bytes -= old[1]
            self._data[key] = (value, size_bytes)
            self._bytes += size_bytes
            self._evict()

    def _evict(self) -> None:
        while self._data and (len(self._data) > self.max_entries or self._bytes > self.max_bytes):
            _, (_, size) = self._data.popitem(last=False)
            self._bytes -= size

    def __len__(self) -> int:
        return len(self._data)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def keys(self) -> Iterable[str]:
        return list(self._data)
