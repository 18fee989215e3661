"""`microserve` command line: generate (and, as they land, serve / engine / router / bench)."""

from __future__ import annotations

import argparse
import sys

from microserve.errors import UserError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="GGUF file or HF folder (default: built-in SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--kv-cache-memory", default="1GiB", help="memory for the paged KV cache, e.g. 512MiB")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the model")


def cmd_generate(args) -> None:
    from microserve import LLM, SamplingParams

    llm = LLM(model=args.model, dtype=args.dtype, device=args.device,
              kv_cache_memory=args.kv_cache_memory, num_threads=args.threads)
    tok = llm.tokenizer
    if tok is not None and tok.chat_template and not args.raw:
        prompt = llm.chat_prompt([{"role": "user", "content": args.prompt}])
    else:
        prompt = args.prompt
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    for out in llm.stream(prompt, params):
        sys.stdout.write(out.outputs[0].delta_text)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_engine(args) -> None:
    from microserve.config import EngineConfig
    from microserve.server.app import run_engine_server

    cfg = EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                       kv_cache_memory=args.kv_cache_memory, num_threads=args.threads,
                       max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                       max_model_len=args.max_model_len, block_size=args.block_size,
                       kv_shared=args.kv_transport == "shm")
    run_engine_server(cfg, host=args.host, port=args.port, model_name=args.served_model_name,
                      max_waiting=args.max_waiting, log_level=args.log_level, kv_transport=args.kv_transport)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="microserve", description="A programmable LLM serving system.")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text for one prompt, streamed to the terminal")
    g.add_argument("prompt")
    _add_model_args(g)
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("engine", help="serve one engine over the OpenAI-compatible HTTP API")
    _add_model_args(e)
    e.add_argument("--host", default="127.0.0.1")
    e.add_argument("--port", type=int, default=8000)
    e.add_argument("--served-model-name", default=None, help="the model id clients send (default: from the path)")
    e.add_argument("--max-num-seqs", type=int, default=64, help="most sequences in one batch")
    e.add_argument("--max-num-batched-tokens", type=int, default=512, help="per-step token budget")
    e.add_argument("--max-model-len", type=int, default=None)
    e.add_argument("--block-size", type=int, default=16)
    e.add_argument("--max-waiting", type=int, default=256, help="queued requests before answering 429")
    e.add_argument("--log-level", default="info")
    e.add_argument("--kv-transport", choices=["shm", "tcp"], default="shm",
                   help="how peers write KV into this engine: shared memory (same host) or TCP")
    e.set_defaults(func=cmd_engine)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"microserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
