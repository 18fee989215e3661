"""Request ids: unique across processes (a random prefix drawn once per process) and cheap
(a counter after it: no system call per request, unlike uuid4)."""

from __future__ import annotations

import itertools
import secrets

_PREFIX = secrets.token_hex(8)
_COUNTER = itertools.count()


def new_id(kind: str) -> str:
    """e.g. `cmpl-3f9a0c1b2d4e5f60000002a`: 16 random hex digits, then this process's count."""
    return f"{kind}-{_PREFIX}{next(_COUNTER):08x}"
