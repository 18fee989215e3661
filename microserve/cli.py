"""`microserve` command line: generate, engine, router, serve, bench. It parses flags into a
launch spec and hands it to microserve/launch/."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from microserve.api.security import env_list
from microserve.config import QUANTIZATION_CHOICES
from microserve.errors import UserError
from microserve.launch.spec import EngineSpec, GenerateSpec, RouterSpec, ServeSpec


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="GGUF file or HF folder (default: built-in SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto",
                   help="auto (bfloat16 where it is fast, else float32 on a CPU, float16 on a GPU) | float32 | "
                        "bfloat16 | float16")
    p.add_argument("--device", default="auto", help="auto (cuda if there is one) | cpu | cuda | cuda:N")
    p.add_argument("--kv-cache-memory", default=None,
                   help="memory for the paged KV cache, e.g. 512MiB (default 1GiB; simulated: the profile's free memory)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the model (default: MICROSERVE_THREADS, else torch's choice)")
    p.add_argument("--deterministic", action="store_true", help=DETERMINISTIC_HELP)
    p.add_argument("--quantization", default="auto", choices=QUANTIZATION_CHOICES, help=QUANTIZATION_HELP)


def cmd_generate(args) -> None:
    from microserve.launch.generate import generate

    generate(_spec(GenerateSpec, args))


def cmd_engine(args) -> None:
    from microserve.config import EngineConfig
    from microserve.launch.engine import run_engine

    cfg = EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                       kv_cache_memory=args.kv_cache_memory, num_threads=args.threads,
                       max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                       max_model_len=args.max_model_len, block_size=args.block_size,
                       kv_shared=args.kv_transport == "shm" and not args.simulate, simulate=args.simulate,
                       deterministic=args.deterministic, quantization=args.quantization)
    ports = [int(p) for p in args.ports.split(",")] if args.ports else None
    run_engine(EngineSpec(cfg, host=args.host, port=args.port, ports=ports, model_name=args.served_model_name,
                          max_waiting=args.max_waiting, log_level=args.log_level, kv_transport=args.kv_transport,
                          api_keys=_api_keys(args), cluster_token=_cluster_token(args),
                          max_body_bytes=args.max_body_bytes, otlp_traces_endpoint=args.otlp_traces_endpoint))


def cmd_router(args) -> None:
    from microserve.launch.router import run_router

    run_router(RouterSpec(engines=args.engine, roles=args.roles.split(",") if args.roles else None,
                          follow=args.follow, strategy=args.strategy, model=args.model,
                          served_model_name=args.served_model_name, host=args.host, port=args.port,
                          max_active=args.max_active, max_queued=args.max_queued, api_keys=_api_keys(args),
                          cluster_token=_cluster_token(args), max_body_bytes=args.max_body_bytes,
                          log_level=args.log_level, otlp_traces_endpoint=args.otlp_traces_endpoint))


def cmd_serve(args) -> None:
    from microserve.launch.local import serve

    if args.config:
        _apply_config(args, args.config)
    code = serve(_spec(ServeSpec, args))
    if code:
        raise SystemExit(code)


def _spec(cls, args):
    """A launch spec from the flags of the same names."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def _api_keys(args) -> list[str]:
    return list(args.api_key or []) + env_list("MICROSERVE_API_KEYS")


def _cluster_token(args) -> str | None:
    return (args.cluster_token or os.environ.get("MICROSERVE_CLUSTER_TOKEN")
            or os.environ.get("MICROSERVE_ADMIN_TOKEN") or None)


def _add_security_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-key", action="append", default=None,
                   help="a key clients must send as 'Authorization: Bearer KEY' on /v1 (repeat for several; "
                        "or MICROSERVE_API_KEYS=k1,k2) (default: none, /v1 is open)")
    p.add_argument("--cluster-token", "--admin-token", dest="cluster_token", default=None,
                   help="secret for the admin, microserving and KV-transfer surfaces (default: "
                        "MICROSERVE_CLUSTER_TOKEN, else none: /microserving/ is open and the admin API off)")
    p.add_argument("--max-body-bytes", type=int, default=16 * 1024 * 1024, help="larger request bodies get 413")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default, unless the text already says it in words;
    a switch (store_true/false) defaults to not given. Descriptions and epilogs keep their lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.nargs == 0 or action.default is argparse.SUPPRESS
                or "default" in text.lower()):
            return text
        return f"{text} (default: %(default)s)"


def _add_tracing_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--otlp-traces-endpoint", default=None, metavar="URL",
                   help="send OpenTelemetry traces over OTLP/HTTP (protobuf) to URL, e.g. "
                        "http://127.0.0.1:4318/v1/traces (default: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or "
                        "OTEL_EXPORTER_OTLP_ENDPOINT if set, else no tracing; see docs/tracing.md)")


def _apply_config(args, path: str) -> None:
    """Options from a YAML file, under the same names as the flags (dashes or underscores)."""
    import yaml

    try:
        with open(path) as f:
            options = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read config {path}: {e}") from None
    if not isinstance(options, dict):
        raise UserError(f"{path}: expected a mapping of option: value")
    defaults = vars(build_parser().parse_args(["serve"]))
    for key, value in options.items():
        key = key.replace("-", "_")
        if key not in defaults or key in ("func", "command", "config"):
            raise UserError(f"{path}: unknown option {key!r}")
        if getattr(args, key) == defaults[key]:  # not set on the command line
            setattr(args, key, value)


QUANTIZATION_HELP = ("auto: a GGUF file's weights stay in its own formats (Q8_0, Q4_0, Q4_1, BF16, F16) and run "
                     "on the CPU kernels; none: dequantize them at load (see docs/quantization.md)")
LOG_LEVEL_HELP = "debug | info | warning | error"
STRATEGY_HELP = "a built-in name (round_robin, least_loaded, prefix_aware, disagg, ...) or a path to a .py file"
DETERMINISTIC_HELP = ("batch-invariant kernels: the same tokens and logprobs whatever the batch, prefill chunking, "
                      "prefix cache or strategy (costs speed; see docs/deterministic.md)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="microserve", description="A programmable LLM serving system.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_generate, _add_engine, _add_router, _add_serve, _add_bench):
        add(sub)
    for p in sub.choices.values():
        p.formatter_class = HelpFormatter
    return parser


def _add_generate(sub) -> None:
    """`microserve generate`: one prompt, streamed to the terminal."""
    g = sub.add_parser("generate", help="generate text for one prompt, streamed to the terminal")
    g.add_argument("prompt", help="the prompt: a user message under the chat template, unless --raw")
    _add_model_args(g)
    g.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    g.add_argument("--seed", type=int, default=None, help="sampling seed (default: none, a fresh draw each run)")
    g.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    g.set_defaults(func=cmd_generate)


def _add_engine(sub) -> None:
    """`microserve engine`: one engine server (or simulated engines, one per port)."""
    e = sub.add_parser("engine", help="serve one engine over the OpenAI-compatible HTTP API")
    _add_model_args(e)
    e.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    e.add_argument("--port", type=int, default=8000, help="the HTTP port")
    e.add_argument("--served-model-name", default=None, help="the model id clients send (default: from the path)")
    e.add_argument("--max-num-seqs", type=int, default=64, help="most sequences in one batch")
    e.add_argument("--max-num-batched-tokens", type=int, default=1024, help="per-step token budget")
    e.add_argument("--max-model-len", type=int, default=None,
                   help="most tokens of prompt and output together (default: the model's context window)")
    e.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block (a power of two)")
    e.add_argument("--max-waiting", type=int, default=256, help="queued requests before answering 429")
    e.add_argument("--log-level", default="info", help=LOG_LEVEL_HELP)
    e.add_argument("--kv-transport", choices=["shm", "tcp"], default="shm",
                   help="how peers write KV into this engine: shared memory (same host) or TCP")
    e.add_argument("--simulate", default=None, metavar="PROFILE",
                   help="a simulated engine: the real engine with the forward pass replaced by a cost model "
                        "(profiles: see docs/simulation.md); --model then only names the tokenizer "
                        "(default: none, a real engine)")
    e.add_argument("--ports", default=None, help="with --simulate: comma-separated ports, one simulated engine "
                                                 "each, all in this process (default: one engine on --port)")
    _add_security_args(e)
    _add_tracing_args(e)
    e.set_defaults(func=cmd_engine)


def _add_router(sub) -> None:
    """`microserve router`: one router in front of engines."""
    r = sub.add_parser("router", help="an OpenAI-compatible front that splits requests across engines")
    r.add_argument("--engine", action="append", default=[],
                   help="an engine URL (repeat for each; default: none, engines come with --follow or POST /admin/engines)")
    r.add_argument("--follow", default=None, metavar="ROUTER_URL",
                   help="a replica: take the engines from this router's /admin/engines and follow its changes "
                        "(default: none, a primary router)")
    r.add_argument("--roles", default=None,
                   help="comma-separated role per engine: both, prefill or decode (default: both for each)")
    r.add_argument("--strategy", default="round_robin", help=STRATEGY_HELP)
    r.add_argument("--model", default=None, help="where the tokenizer comes from (default: the built-in model)")
    r.add_argument("--served-model-name", default=None, help="the model id clients send (default: from --model)")
    r.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    r.add_argument("--port", type=int, default=8000, help="the HTTP port")
    r.add_argument("--max-active", type=int, default=None,
                   help="requests running on the engines at once (default: 256 per engine); more wait here")
    r.add_argument("--max-queued", type=int, default=4096, help="requests waiting in the router before 429")
    _add_security_args(r)
    _add_tracing_args(r)
    r.add_argument("--log-level", default="info", help=LOG_LEVEL_HELP)
    r.set_defaults(func=cmd_router)


def _add_serve(sub) -> None:
    """`microserve serve`: engines and routers together, locally or on Ray."""
    s = sub.add_parser("serve", help="start engines and a router on this machine (the main job)")
    s.add_argument("--engines", type=int, default=2, help="how many engines to start (--roles, when given, sets it)")
    s.add_argument("--model", default=None,
                   help="GGUF file or HF folder for every engine (default: built-in SmolLM2-135M-Instruct)")
    s.add_argument("--dtype", default="auto", help="engines: auto | float32 | bfloat16 | float16")
    s.add_argument("--strategy", default="round_robin", help="the router's: " + STRATEGY_HELP)
    s.add_argument("--served-model-name", default=None,
                   help="the model id clients send (default: from --model, or the --simulate profile)")
    s.add_argument("--host", default="127.0.0.1", help="the address the router listens on")
    s.add_argument("--port", type=int, default=8000, help="the router's HTTP port (replicas take the next ones)")
    s.add_argument("--cluster-token", "--admin-token", dest="cluster_token", default=None,
                   help="secret for the admin API and the engines (default: a fresh random one)")
    s.add_argument("--api-key", action="append", default=None,
                   help="a key clients must send (repeat for several; default: MICROSERVE_API_KEYS, else none: "
                        "/v1 is open)")
    s.add_argument("--max-restarts", type=int, default=5, help="restarts of a crashed engine within 5 minutes "
                                                                 "before serve gives up")
    s.add_argument("--max-num-seqs", type=int, default=None, help="engines: most sequences in one batch (default 64)")
    s.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="engines: per-step token budget (default 1024)")
    s.add_argument("--kv-cache-memory", default=None, help="engines: memory for each one's KV cache, e.g. 512MiB "
                                                            "(default 1GiB; simulated: the profile's free memory)")
    s.add_argument("--deterministic", action="store_true", help="engines: " + DETERMINISTIC_HELP)
    s.add_argument("--quantization", default="auto", choices=QUANTIZATION_CHOICES, help="engines: " + QUANTIZATION_HELP)
    s.add_argument("--simulate", default=None, metavar="PROFILE",
                   help="simulated engines (the real engine, forward pass by a cost model): e.g. "
                        "llama-3.1-70b-fp8@h100x4; see docs/simulation.md (default: none, real engines)")
    s.add_argument("--routers", type=int, default=1,
                   help="routers on --port, --port+1, ...: replicas that follow the first one's engines")
    s.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="engines as Ray actors across a Ray cluster's nodes, the router here: no ADDRESS starts "
                        "a local Ray instance, `auto` joins the running one (see docs/deploy.md; default: no Ray, "
                        "engines are processes here)")
    s.add_argument("--roles", default=None, help="comma-separated role per engine (both, prefill, decode); "
                                                 "sets the number of engines too (default: --engines of both)")
    s.add_argument("--engine-cpus", type=float, default=None,
                   help="with --ray: CPUs per engine actor, also its torch threads (default 1; simulated 0)")
    s.add_argument("--engine-gpus", type=float, default=0, help="with --ray: GPUs per engine actor")
    s.add_argument("--engine-host", default=None,
                   help="with --ray: the address engines listen on (default: their node's address)")
    s.add_argument("--placement", action="append", default=None, metavar="ROLE:RESOURCE[=N]",
                   help="with --ray: engines of ROLE go to nodes with this Ray resource (repeatable; "
                        "default: any node)")
    _add_tracing_args(s)
    s.add_argument("--config", default=None,
                   help="a YAML file with any of these options (flags given win; default: none)")
    s.set_defaults(func=cmd_serve)


def _add_bench(sub) -> None:
    """`microserve bench`: a load test of an OpenAI-compatible endpoint."""
    from microserve.bench import cli as bench_cli

    b = sub.add_parser("bench", help="load-test an OpenAI-compatible endpoint: TTFT, TPOT, ITL, JCT, goodput")
    bench_cli.add_arguments(b)
    b.set_defaults(func=bench_cli.run)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None and args.command == "engine":  # a process of its own: start it again under tcmalloc
        from microserve.launch.allocator import reexec_with_tcmalloc

        reexec_with_tcmalloc(sys.argv[1:])
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
