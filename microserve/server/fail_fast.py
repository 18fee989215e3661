"""What an engine server does when its engine loop dies.

The loop dies only when the forward pass fails (a request's own failure ends that request
alone): the KV cache and the scheduler are then in an unknown state, so the process exits
and its supervisor (`serve`, Ray) starts a fresh engine. Nothing lingers with a dead loop.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger("microserve.server")

FATAL_EXIT_CODE = 70  # EX_SOFTWARE
FATAL_GRACE_S = 0.5  # for the failed requests' error answers to go out first


def exit_on_fatal(*cleanups):
    """An `on_fatal` for AsyncEngine: log, run `cleanups` (shared-memory files), exit the process."""
    def on_fatal(error: BaseException) -> None:
        log.critical("the engine loop failed (%s: %s); exiting so that a fresh engine takes over",
                     type(error).__name__, error, exc_info=error)
        time.sleep(FATAL_GRACE_S)
        for cleanup in cleanups:
            try:
                cleanup()
            except Exception:
                log.exception("cleanup after the engine loop failed")
        os._exit(FATAL_EXIT_CODE)

    return on_fatal
