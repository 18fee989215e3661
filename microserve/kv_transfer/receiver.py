"""The receiving side: a small TCP server beside each engine.

Every transfer opens with a header (request id, one-time token, KV layout fingerprint,
positions). It is checked before any byte moves. Data then arrives on the socket (TCP
transport) or is written by the sender straight into this engine's shared-memory KV
pool (shm transport). Only the sender's final commit, after the last byte, makes the
received positions valid; a connection that drops before it leaves them invalid.
"""

from __future__ import annotations

import logging
import socket
import threading

import torch

from microserve.kv_transfer.wire import TransferError, read_json, read_tensor_into, send_json

log = logging.getLogger("microserve.kv")


IDLE_TIMEOUT_S = 120  # longest wait for one read (the sender may be computing a layer)


class KVReceiver:
    def __init__(self, kv, fingerprint: dict, registry, host: str = "127.0.0.1", port: int = 0):
        """`registry.open_transfer(request_id, token, begin, end) -> dst slot list` (raises UserError)
        and `registry.close_transfer(request_id, end, ok)` track the parked requests."""
        self.kv = kv
        self.fingerprint = fingerprint
        self.registry = registry
        self._sock = socket.create_server((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        self._thread = threading.Thread(target=self._serve, name="kv-receiver", daemon=True)
        self._closed = False

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.close()
        except OSError:
            pass

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(IDLE_TIMEOUT_S)  # a peer that goes quiet cannot hold a thread forever
        with conn, conn.makefile("rb") as stream:
            request_id, opened, ok, end = None, False, False, 0
            try:
                head = read_json(stream)
                request_id, begin, end = head["request_id"], int(head["begin"]), int(head["end"])
                if head.get("fingerprint") != self.fingerprint:
                    raise TransferError(f"KV layout mismatch: sender {head.get('fingerprint')}, "
                                        f"receiver {self.fingerprint}")
                if (head.get("transport") == "sim") != getattr(self.kv, "simulated", False):
                    raise TransferError("a simulated transfer goes only between simulated engines")
                slots = self.registry.open_transfer(request_id, head.get("token"), begin, end)
                opened = True
                send_json(conn, {"ok": True})
                received = 0
                if head.get("transport") == "tcp" and end > begin:
                    received = self._receive_layers(stream, torch.tensor(slots), end - begin)
                commit = read_json(stream)
                if not commit.get("commit"):
                    raise TransferError("transfer ended without a commit")
                ok = True
                self.registry.close_transfer(request_id, end, ok=True)
                send_json(conn, {"ok": True, "bytes": received})
            except Exception as e:  # refuse or abandon; the registry forgets partial data
                if opened and not ok:
                    self.registry.close_transfer(request_id, end, ok=False)
                log.info("KV transfer for %s refused or broken: %s", request_id, e)
                try:
                    send_json(conn, {"ok": False, "error": str(e)})
                except OSError:
                    pass

    def _receive_layers(self, stream, slots: torch.Tensor, n: int) -> int:
        k, v = self.kv.k, self.kv.v
        buf = torch.empty((n, k.shape[2], k.shape[3]), dtype=k.dtype)
        received = 0
        for layer in range(k.shape[0]):
            for cache in (k, v):
                received += read_tensor_into(stream, buf)
                cache[layer].index_copy_(0, slots, buf)
        return received
