"""The sending side: push positions [begin, end) of local KV into a receiver's blocks."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

import torch

from microserve.kv_transfer.address import KVAddress, TransferResult, local_node
from microserve.kv_transfer.progress import LayerProgress
from microserve.kv_transfer.wire import TransferError, read_json, send_json, send_tensor

_shared_pools: dict[str, torch.Tensor] = {}


def _open_shared(path: str, num_elements: int, dtype) -> torch.Tensor:
    """Map a receiver's shared KV pool (one mapping per file, reused)."""
    t = _shared_pools.get(path)
    if t is None:
        t = torch.from_file(path, shared=True, size=num_elements, dtype=dtype)
        _shared_pools[path] = t
    return t


# How a pool's KV goes to a peer: (kv, source, addr, fingerprint, timeout) -> TransferResult.
# `send_kv` for real pools; a pool that moves no bytes (sim/) brings its own as `kv.sender`.
KVSender = Callable[[object, LayerProgress, KVAddress, dict, float], TransferResult]


def sender_of(kv) -> KVSender:
    return getattr(kv, "sender", None) or send_kv


def send_kv(kv, source: LayerProgress, addr: KVAddress, fingerprint: dict, timeout: float = 600.0) -> TransferResult:
    """Push positions [addr.begin, addr.end) of local KV into the receiver, layer by layer.

    Layer i goes out as soon as `source` says it is computed, so the transfer overlaps
    the computation of the later layers. Returns once the receiver has acknowledged
    every byte; raises TransferError otherwise (the receiver then keeps nothing).
    """
    begin, end = addr.begin, addr.end
    # Shared memory only on the receiver's own node (on another, the same path is another file, or none).
    same_node = addr.node is None or addr.node == local_node()
    use_shm = addr.transport == "shm" and addr.shm is not None and same_node and os.path.exists(addr.shm["k"])
    transport = "shm" if use_shm else "tcp"
    start = time.perf_counter()
    with socket.create_connection((addr.host, addr.port), timeout=timeout) as conn, conn.makefile("rb") as stream:
        send_json(conn, {"request_id": addr.request_id, "token": addr.token, "fingerprint": fingerprint,
                         "begin": begin, "end": end, "transport": transport})
        reply = read_json(stream)
        if not reply.get("ok"):
            raise TransferError(reply.get("error", "refused"))
        sent = 0
        if end > begin:
            layers, _, heads, dim = kv.k.shape
            if use_shm:
                dst = torch.tensor(addr.dst_slots(begin, end, kv.block_size))
                n = addr.shm["num_slots"] * heads * dim
                remote = [_open_shared(addr.shm[name], layers * n, kv.k.dtype).view(layers, -1, heads, dim)
                          for name in ("k", "v")]
            src = None
            for layer in range(layers):
                try:
                    source.wait_layer(layer, timeout)
                except (RuntimeError, TimeoutError) as e:
                    raise TransferError(f"computing the KV to send failed: {e}") from None
                if src is None:
                    src = torch.tensor(source.slots(begin, end, kv.block_size))
                for i, cache in enumerate((kv.k, kv.v)):
                    rows = cache[layer].index_select(0, src)
                    if use_shm:
                        remote[i][layer].index_copy_(0, dst, rows)
                        sent += rows.numel() * rows.element_size()
                    else:
                        sent += send_tensor(conn, rows)
        send_json(conn, {"commit": True})
        reply = read_json(stream)
        if not reply.get("ok"):
            raise TransferError(reply.get("error", "the receiver did not acknowledge"))
    return TransferResult(tokens=end - begin, bytes=sent, seconds=time.perf_counter() - start, transport=transport)
