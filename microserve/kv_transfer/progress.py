"""Per-layer progress of a prompt's KV computation, so a transfer can start on layer i
while the model is still computing the layers after it."""

from __future__ import annotations

import threading


class LayerProgress:
    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.block_ids: list[int] | None = None  # the block table, known once the last chunk starts
        self._done = 0
        self._error: str | None = None
        self._cond = threading.Condition()

    def start(self, block_ids: list[int]) -> None:
        """The step computing the prompt's last chunk begins (blocks are final now)."""
        with self._cond:
            self.block_ids = list(block_ids)
            self._cond.notify_all()

    def layer_done(self, layer: int) -> None:
        with self._cond:
            self._done = max(self._done, layer + 1)
            self._cond.notify_all()

    def complete(self, block_ids: list[int]) -> None:
        with self._cond:
            self.block_ids = list(block_ids)
            self._done = self.num_layers
            self._cond.notify_all()

    def fail(self, reason: str) -> None:
        with self._cond:
            self._error = reason
            self._cond.notify_all()

    def wait_layer(self, layer: int, timeout: float) -> None:
        """Block until layer `layer` holds KV for every position; raise TimeoutError or RuntimeError."""
        with self._cond:
            ok = self._cond.wait_for(lambda: self._error or (self.block_ids is not None and self._done > layer),
                                     timeout=timeout)
            if self._error:
                raise RuntimeError(self._error)
            if not ok:
                raise TimeoutError(f"layer {layer} KV not computed within {timeout} s")

    def slots(self, begin: int, end: int, block_size: int) -> list[int]:
        table = self.block_ids
        return [table[p // block_size] * block_size + p % block_size for p in range(begin, end)]
