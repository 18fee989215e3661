"""The KV-moving sub-requests of one engine, as its server calls them: prep_recv (reserve
blocks and hand out their address) and remote_send (compute a prompt's KV and push it into a
peer's reservation, layer by layer). Pool and scheduler changes run in the engine loop
thread through `run_in_loop`; the transfer itself runs in a worker thread."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from microserve.engine.engine import LLMEngine
from microserve.errors import UserError
from microserve.kv_transfer.address import KVAddress, layout_fingerprint, local_node
from microserve.kv_transfer.progress import LayerProgress
from microserve.kv_transfer.receiver import KVReceiver
from microserve.kv_transfer.sender import sender_of
from microserve.kv_transfer.wire import TransferError

RunInLoop = Callable[[Callable], Awaitable]  # runs a function in the engine loop thread, between steps


class TransferFailed(Exception):
    """The peer refused or the transfer broke off (HTTP 502)."""


@dataclass
class Reserved:
    """What prep_recv answers: where to send the KV, and how much of the prompt was cached here."""

    kv_addr_info: dict
    prefix_matched_length: int
    prompt_length: int


@dataclass
class Sent:
    """What remote_send answers once the receiver has acknowledged every byte."""

    tokens: int = 0
    bytes: int = 0
    seconds: float = 0.0
    transfer_seconds: float = 0.0
    transport: str = "none"
    reused_tokens: int = 0  # of [0, end), found in this engine's prefix cache
    computed_tokens: int = 0
    compute_seconds: float = 0.0  # until the KV of [0, end) was complete here (the send overlaps it)


def kv_fingerprint(engine: LLMEngine) -> dict:
    """The KV layout of this engine: a peer must match it exactly to exchange KV."""
    cfg = engine.model_config
    dtype = str(engine.loaded.dtype).removeprefix("torch.")
    if getattr(engine.loaded, "quantization", "none") != "none":  # another model numerically: no KV mixing
        dtype += f"+{engine.loaded.quantization}-weights"
    return layout_fingerprint(cfg.name, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype,
                              engine.runner.kv.block_size)


class SubRequests:
    def __init__(self, engine: LLMEngine, run_in_loop: RunInLoop, host: str, transport: str):
        self.engine = engine
        self.run_in_loop = run_in_loop
        self.kv = kv = engine.runner.kv
        self.send_kv = sender_of(kv)
        self.fingerprint = kv_fingerprint(engine)
        self.receiver = KVReceiver(kv, self.fingerprint, engine.microserving, host=host)
        self.node = local_node()
        self.shm = {"k": kv.paths["k"], "v": kv.paths["v"], "num_slots": kv.num_slots} if kv.paths else None
        self.transport = transport if self.shm else "tcp"

    def address_info(self) -> dict:
        """Where peers reach this engine's KV receiver (for the status)."""
        r = self.receiver
        return {"host": r.host, "port": r.port, "shm": self.shm is not None, "node": self.node}

    async def prep_recv(self, request_id: str, prompt: list[int], end: int, lease_s: float) -> Reserved:
        r = await self.run_in_loop(lambda: self.engine.microserving.prep_recv(request_id, prompt, end, lease_s))
        addr = KVAddress(request_id=request_id, host=self.receiver.host, port=self.receiver.port,
                         block_ids=r["block_ids"], begin=r["begin"], end=r["end"], offset=r["offset"],
                         fingerprint=self.fingerprint, token=r["token"], shm=self.shm, transport=self.transport,
                         node=self.node)
        return Reserved(addr.to_dict(), r["prefix_matched_length"], r["prompt_length"])

    def _checked(self, kv_addr_info: dict, prompt: list[int], begin: int, end: int) -> tuple[KVAddress, int]:
        """The receiver's address, and `end` made non-negative, if the send may go ahead."""
        addr = KVAddress.from_dict(kv_addr_info)
        if addr.fingerprint != self.fingerprint:
            raise UserError(f"KV layout mismatch: receiver {addr.fingerprint}, this engine {self.fingerprint}")
        end = end + len(prompt) if end < 0 else end
        if not (0 <= begin <= end < len(prompt)) or end > addr.end or begin < addr.begin:
            raise UserError(f"[begin, end) = [{begin}, {end}) must lie in the reservation "
                            f"[{addr.begin}, {addr.end}) and below the prompt length")
        return addr, end

    async def remote_send(self, request_id: str, prompt: list[int], begin: int, end: int,
                          kv_addr_info: dict) -> Sent:
        """Compute KV for [0, end) here (reusing the prefix cache) and push [begin, end) into the
        peer's blocks as each layer is done; never samples."""
        addr, end = self._checked(kv_addr_info, prompt, begin, end)
        start = time.perf_counter()
        if begin == end:
            return Sent()
        local_id = f"{request_id}@send-{uuid.uuid4().hex[:8]}"
        loop = asyncio.get_running_loop()
        computed = loop.create_future()

        def on_done(r):  # engine loop thread: the KV of [0, end) is complete
            at = time.perf_counter()
            loop.call_soon_threadsafe(lambda: computed.done() or computed.set_result((r, at)))

        progress = LayerProgress(self.engine.model_config.num_layers)
        await self.run_in_loop(lambda: self.engine.add_prefill_only(local_id, prompt[:end], on_done, progress))
        try:
            addr.begin, addr.end = begin, end
            result = await self._send(progress, addr)  # sends layer i as soon as the engine has computed it
            held, computed_at = await computed
        finally:
            await self.run_in_loop(lambda: self.engine.release_prefill(local_id))
        reused = min(held.num_cached_tokens, end)
        return Sent(result.tokens, result.bytes, time.perf_counter() - start, result.seconds, result.transport,
                    reused, end - reused, computed_at - start)

    async def _send(self, progress: LayerProgress, addr: KVAddress):
        try:
            return await asyncio.to_thread(self.send_kv, self.kv, progress, addr, self.fingerprint, 600.0)
        except (TransferError, OSError) as e:
            raise TransferFailed(f"KV transfer to {addr.host}:{addr.port} failed: {e}") from None

