"""What a receiver hands out in `kv_addr_info`, and the KV layout both sides must share."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from microserve.errors import UserError


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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "KVAddress":
        try:
            return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
        except TypeError as e:
            raise UserError(f"kv_addr_info is incomplete: {e}") from None

    def dst_slots(self, begin: int, end: int, block_size: int) -> list[int]:
        """The receiver's cache slots for positions [begin, end)."""
        base = self.begin - self.offset  # position held by slot 0 of block_ids[0]
        if begin < self.begin or end > self.end or begin > end:
            raise UserError(f"positions [{begin}, {end}) are outside the reserved [{self.begin}, {self.end})")
        return [self.block_ids[(p - base) // block_size] * block_size + (p - base) % block_size
                for p in range(begin, end)]


@dataclass
class TransferResult:
    tokens: int = 0
    bytes: int = 0
    seconds: float = 0.0
    transport: str = "none"
