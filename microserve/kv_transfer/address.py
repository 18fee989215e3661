"""What a receiver hands out in `kv_addr_info`, and the KV layout both sides must share."""

from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import asdict, dataclass

from microserve.errors import UserError


def local_node() -> str:
    """The machine (or the Ray node) this process runs on. Two engines use the shm transport
    only when their nodes match: a shared-memory path means the same pool only there."""
    node = os.environ.get("MICROSERVE_NODE_ID")
    if node:
        return node
    try:
        boot = open("/proc/sys/kernel/random/boot_id").read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


# Where engines put their shared KV pools (the shm transport).
KV_POOL_FOLDER = os.path.realpath("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())


def layout_fingerprint(model_name: str, num_layers: int, num_kv_heads: int, head_dim: int,
                       dtype: str, block_size: int) -> dict:
    """Two engines may exchange KV only if every field here is equal."""
    return {"model": model_name, "dtype": dtype, "block_size": block_size, "layers": num_layers,
            "kv_heads": num_kv_heads, "head_dim": head_dim}


@dataclass
class KVAddress:
    """Where and how to write a request's KV on the receiving engine.

    Positions [begin, end) of the prompt go to the receiver's blocks `block_ids`, the
    first of which holds position `begin - offset` at its slot 0.
    """

    request_id: str
    host: str  # the receiver's KV server (control messages, and the data for TCP)
    port: int
    block_ids: list[int]
    begin: int
    end: int
    offset: int
    fingerprint: dict
    token: str
    shm: dict | None = None  # {"k": path, "v": path, "num_slots": n}: the receiver's pool, if on this host
    transport: str = "shm"  # what the receiver prefers: "shm" (falls back to tcp) or "tcp"
    node: str | None = None  # the receiver's node (local_node()): shm only from an engine on the same one

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "KVAddress":
        """Checked field by field: it comes over the network, and says where to write."""
        try:
            addr = cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
        except TypeError as e:
            raise UserError(f"kv_addr_info is incomplete: {e}") from None
        block_ids = addr.block_ids if isinstance(addr.block_ids, list) else [None]
        ints = [addr.port, addr.begin, addr.end, addr.offset, *block_ids]
        if not all(type(v) is int and v >= 0 for v in ints) or not 0 < addr.port < 65536:
            raise UserError("kv_addr_info: port, begin, end, offset and block_ids must be non-negative integers")
        if addr.node is not None and not isinstance(addr.node, str):
            raise UserError("kv_addr_info: node must be a string")
        if not all(isinstance(v, str) for v in (addr.request_id, addr.host, addr.token, addr.transport)):
            raise UserError("kv_addr_info: request_id, host, token and transport must be strings")
        if not isinstance(addr.fingerprint, dict):
            raise UserError("kv_addr_info: fingerprint must be an object")
        if addr.shm is not None and not _is_kv_pool(addr.shm):
            raise UserError("kv_addr_info: shm must name a microserve KV pool in shared memory")
        return addr

    def dst_slots(self, begin: int, end: int, block_size: int) -> list[int]:
        """The receiver's cache slots for positions [begin, end)."""
        base = self.begin - self.offset  # position held by slot 0 of block_ids[0]
        if begin < self.begin or end > self.end or begin > end:
            raise UserError(f"positions [{begin}, {end}) are outside the reserved [{self.begin}, {self.end})")
        return [self.block_ids[(p - base) // block_size] * block_size + (p - base) % block_size
                for p in range(begin, end)]


def _is_kv_pool(shm) -> bool:
    """Only files an engine created as its KV pool may be written through shared memory, so a
    forged address cannot make a sender write KV bytes over some other file."""
    if not isinstance(shm, dict) or type(shm.get("num_slots")) is not int:
        return False
    for name in ("k", "v"):
        path = shm.get(name)
        if not isinstance(path, str):
            return False
        real = os.path.realpath(path)
        if os.path.dirname(real) != KV_POOL_FOLDER or not os.path.basename(real).startswith("microserve-kv-"):
            return False
    return True


@dataclass
class TransferResult:
    tokens: int = 0
    bytes: int = 0
    seconds: float = 0.0
    transport: str = "none"
