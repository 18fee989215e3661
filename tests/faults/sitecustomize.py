"""Fault injection for tests, loaded by every Python process that has this folder on its
PYTHONPATH (the tests set it for the servers they start, `serve`'s children included).

MICROSERVE_TEST_POISON="forward:ID,sample:ID": a request whose prompt holds token ID makes
the engine's forward pass raise (as a broken kernel would) or makes sampling fail for that
request alone. Nothing happens without the variable.
"""

import os

_spec = os.environ.get("MICROSERVE_TEST_POISON")


def _poisoned(req, token: int) -> bool:
    return token in req.token_ids[: req.num_prompt_tokens]


def _install(spec: str) -> None:
    faults = {kind: int(token) for kind, token in (part.split(":") for part in spec.split(","))}
    from microserve import sampling
    from microserve.engine import model_runner
    from microserve.sim import runner as sim_runner

    if "forward" in faults:
        for cls in (model_runner.ModelRunner, sim_runner.SimRunner):
            real_execute = cls.execute

            def execute(self, items, _real=real_execute):
                if any(_poisoned(req, faults["forward"]) for req, _ in items):
                    raise RuntimeError("injected fault in the forward pass")
                return _real(self, items)

            cls.execute = execute
    if "sample" in faults:
        real_choose = sampling.Sampler._choose

        def choose(self, logits, rows, raw_logprobs):
            if any(_poisoned(r, faults["sample"]) for r in rows):
                raise RuntimeError("injected fault in sampling")
            return real_choose(self, logits, rows, raw_logprobs)

        sampling.Sampler._choose = choose


if _spec:
    _install(_spec)
