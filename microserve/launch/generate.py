"""`microserve generate`: one prompt through an engine in this process."""

from __future__ import annotations

import sys

from microserve.launch.spec import GenerateSpec
from microserve.sampling import SamplingParams


def generate(spec: GenerateSpec) -> None:
    from microserve.engine.llm import LLM  # torch and the model: only now

    llm = LLM(model=spec.model, dtype=spec.dtype, device=spec.device, kv_cache_memory=spec.kv_cache_memory,
              num_threads=spec.threads, deterministic=spec.deterministic, quantization=spec.quantization)
    tok = llm.tokenizer
    if tok is not None and tok.chat_template and not spec.raw:
        prompt = llm.chat_prompt([{"role": "user", "content": spec.prompt}])
    else:
        prompt = spec.prompt
    params = SamplingParams(temperature=spec.temperature, max_tokens=spec.max_tokens, seed=spec.seed)
    for out in llm.stream(prompt, params):
        sys.stdout.write(out.outputs[0].delta_text)
        sys.stdout.flush()
    sys.stdout.write("\n")
