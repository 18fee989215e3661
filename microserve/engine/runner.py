"""The Runner protocol: what the engine needs from whatever runs its forward pass.

The model on CPU or GPU (engine/model_runner.py) and the cost model of a simulated engine
(sim/runner.py) are the same engine with another Runner; `build_runner` is the one place
that chooses between them, so nothing else asks whether it is simulated.
"""

from __future__ import annotations

from typing import Protocol

from microserve.config import EngineConfig
from microserve.engine.request import Request
from microserve.models.loader import LoadedModel, load_model
from microserve.sampling import SampleResult


class Runner(Protocol):
    num_blocks: int  # KV blocks its cache holds
    kv: object  # the KV pool (shared memory, device memory, or a simulated one); has close()

    def execute(self, items: list[tuple[Request, int]]) -> list[SampleResult | None]:
        """Compute KV for each (request, n new tokens); a sampled token for each request
        whose tokens are then all computed, None for the others."""


def build_runner(cfg: EngineConfig, loaded: LoadedModel | None = None,
                 progress: bool = True) -> tuple[LoadedModel, Runner]:
    """The model (loaded here unless given) and the Runner the engine's config asks for."""
    if cfg.simulate:  # only the forward pass is a cost model
        from microserve.sim.runner import SimRunner, load_simulated

        loaded = loaded or load_simulated(cfg)
        return loaded, SimRunner(loaded, cfg)
    from microserve.engine.model_runner import ModelRunner

    loaded = loaded or load_model(cfg.model, cfg.dtype, cfg.device, progress=progress, quantization=cfg.quantization)
    return loaded, ModelRunner(loaded, cfg)
