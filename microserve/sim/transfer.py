"""KV "transfer" between simulated engines: the real handshake, one-time token and commit over
the receiver's KV port, with the data replaced by the time the profile's link needs for it."""

from __future__ import annotations

import socket
import time

from microserve.kv_transfer.address import KVAddress, TransferResult
from microserve.kv_transfer.progress import LayerProgress
from microserve.kv_transfer.wire import TransferError, read_json, send_json


def send_simulated(kv, source: LayerProgress, addr: KVAddress, fingerprint: dict,
                   timeout: float = 600.0) -> TransferResult:
    """Positions [addr.begin, addr.end), layer by layer: layer i leaves once the sender has
    computed it and the link has finished layer i - 1, as the real transports do."""
    begin, end = addr.begin, addr.end
    start = time.perf_counter()
    with socket.create_connection((addr.host, addr.port), timeout=timeout) as conn, conn.makefile("rb") as stream:
        send_json(conn, {"request_id": addr.request_id, "token": addr.token, "fingerprint": fingerprint,
                         "begin": begin, "end": end, "transport": "sim"})
        reply = read_json(stream)
        if not reply.get("ok"):
            raise TransferError(reply.get("error", "refused"))
        sent = 0
        if end > begin:
            cost = kv.cost
            layer_s = (end - begin) * cost.kv_layer_bytes_per_token() / cost.spec.hardware.kv_link_bandwidth
            link_free = time.perf_counter() + cost.spec.hardware.kv_link_latency_s
            for layer in range(source.num_layers):
                try:
                    source.wait_layer(layer, timeout)
                except (RuntimeError, TimeoutError) as e:
                    raise TransferError(f"computing the KV to send failed: {e}") from None
                link_free = max(link_free, time.perf_counter()) + layer_s
            delay = link_free - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            sent = (end - begin) * cost.kv_bytes_per_token()
        send_json(conn, {"commit": True})
        reply = read_json(stream)
        if not reply.get("ok"):
            raise TransferError(reply.get("error", "the receiver did not acknowledge"))
    return TransferResult(tokens=end - begin, bytes=sent, seconds=time.perf_counter() - start, transport="sim")
