"""Framing on a KV transfer connection: JSON control lines and raw tensor bytes."""

from __future__ import annotations

import json
import socket

import torch


class TransferError(Exception):
    """A transfer was refused or broke off; the receiver kept nothing from it."""


def send_json(sock: socket.socket, obj: dict) -> None:
    sock.sendall(json.dumps(obj).encode() + b"\n")


MAX_CONTROL_BYTES = 1 << 20  # a control line is small; anything longer is not a peer of ours


def read_json(stream) -> dict:
    line = stream.readline(MAX_CONTROL_BYTES + 1)
    if not line:
        raise TransferError("the peer closed the connection")
    if len(line) > MAX_CONTROL_BYTES or not line.endswith(b"\n"):
        raise TransferError("control message too long")
    obj = json.loads(line)
    if not isinstance(obj, dict):
        raise TransferError("control message is not an object")
    return obj


def send_tensor(sock: socket.socket, t: torch.Tensor) -> int:
    data = t.contiguous().view(torch.uint8).numpy()
    sock.sendall(memoryview(data))
    return data.nbytes


def read_tensor_into(stream, out: torch.Tensor) -> int:
    """Fill `out` (contiguous) from the stream; raise if the peer stops early."""
    buf = memoryview(out.view(torch.uint8).numpy())
    got = 0
    while got < len(buf):
        n = stream.readinto(buf[got:])
        if not n:
            raise TransferError(f"the sender stopped after {got} of {len(buf)} bytes")
        got += n
    return got
