"""`microserve serve`: engines and a router on this machine, started and stopped together
(or, with --ray, engines as Ray actors across a Ray cluster and the router here)."""

from __future__ import annotations

import ctypes
import logging
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx

from microserve import tracing
from microserve.config import EngineConfig
from microserve.launch.http import ROUTER_UVICORN
from microserve.launch.spec import EngineSpec

RESTART_WINDOW_S = 300
SIM_ENGINES_PER_PROCESS = 256  # simulated engines hosted by one process


def _numerics_flags(args) -> list[str]:
    """--deterministic and --quantization, passed to every real (not simulated) engine."""
    if args.simulate:
        return []
    flags = ["--deterministic"] if getattr(args, "deterministic", False) else []
    quantization = getattr(args, "quantization", "auto")
    return flags + ([] if quantization == "auto" else ["--quantization", quantization])


def _tracing_flags(args) -> list[str]:
    """--otlp-traces-endpoint, passed to every engine and router (OTEL_* variables reach them anyway)."""
    url = getattr(args, "otlp_traces_endpoint", None)
    return ["--otlp-traces-endpoint", url] if url else []


def _split(items: list, size: int) -> list[list]:
    """`items` in consecutive groups of at most `size`, as even as possible."""
    k = -(-len(items) // size)
    step = -(-len(items) // k)
    return [items[i : i + step] for i in range(0, len(items), step)]


def _free_ports(n: int) -> list[int]:
    """`n` distinct free ports for the engines, below the kernel's ephemeral range.

    Ports the kernel hands out for port 0 (KV receivers, outgoing connections) come from the
    ephemeral range, so a port taken there between now and the engine's bind could collide;
    below it only explicit binds compete. Sockets stay open until all `n` are chosen so none repeats.
    """
    try:
        low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    candidates = list(range(max(1024, low - 12000), low))
    random.shuffle(candidates)
    held: list[socket.socket] = []
    try:
        for port in candidates:
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            held.append(s)
            if len(held) == n:
                break
        if len(held) < n:  # not enough below the range: let the kernel choose the rest
            for _ in range(n - len(held)):
                s = socket.socket()
                s.bind(("127.0.0.1", 0))
                held.append(s)
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def _die_with_parent() -> None:
    """Children get SIGTERM if this process dies, even by SIGKILL: no orphans."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Child:
    def __init__(self, name: str, args: list[str], env: dict | None = None):
        self.name = name
        self.args = args
        self.env = {**os.environ, **(env or {})}
        self.restarts: list[float] = []  # when it was restarted
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "microserve.cli", *self.args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=self.env,
                                     preexec_fn=_die_with_parent, text=True, bufsize=1)
        threading.Thread(target=self._pump, args=(self.proc,), daemon=True).start()

    def _pump(self, proc) -> None:
        for line in proc.stdout:  # every log line, prefixed with who wrote it
            sys.stdout.write(f"[{self.name}] {line}")
            sys.stdout.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()

    def wait(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _wait_healthy(children: list[Child], urls: list[str], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    pending = dict(zip(urls, children))
    while pending:
        for url, child in list(pending.items()):
            if child.proc.poll() is not None:
                raise RuntimeError(f"{child.name} exited with code {child.proc.returncode} while starting")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    del pending[url]
            except httpx.HTTPError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"not healthy after {timeout} s: {', '.join(c.name for c in pending.values())}")
        time.sleep(0.3)


def serve(args) -> int:
    if getattr(args, "ray", None):
        return serve_ray(args)
    n = len(args.roles.split(",")) if args.roles else args.engines
    threads = max(1, (os.cpu_count() or 1) // n)
    token = (args.cluster_token or os.environ.get("MICROSERVE_CLUSTER_TOKEN") or os.environ.get("MICROSERVE_ADMIN_TOKEN")
             or secrets.token_urlsafe(16))
    secret_env = {"MICROSERVE_CLUSTER_TOKEN": token}  # in the environment, not on command lines `ps` shows
    model = ["--model", args.model] if args.model else []
    limits = []  # scheduler limits and KV memory, passed to every engine
    for flag in ("max_num_seqs", "max_num_batched_tokens", "kv_cache_memory"):
        if getattr(args, flag, None):
            limits += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    limits += _numerics_flags(args) + _tracing_flags(args)
    name = args.served_model_name or args.simulate or _default_name(args.model)
    children: list[Child] = []
    stopping = threading.Event()

    def stop_all(*_):
        stopping.set()

    signal.signal(signal.SIGINT, stop_all)
    signal.signal(signal.SIGTERM, stop_all)
    try:
        ports = _free_ports(n)
        engine_urls = [f"http://127.0.0.1:{p}" for p in ports]
        # engines' own /v1 is for the cluster too: user keys go through the router
        engine_env = {**secret_env, "MICROSERVE_API_KEYS": token}
        if args.simulate:  # simulated engines sleep through their steps: many share one process
            groups = _split(ports, SIM_ENGINES_PER_PROCESS)
            for i, group in enumerate(groups):
                children.append(Child(f"sim-{i}", ["engine", *model, *limits, "--simulate", args.simulate,
                                                   "--ports", ",".join(map(str, group)), "--served-model-name", name,
                                                   "--log-level", "warning"], env=engine_env))
            engine_children = [c for c, g in zip(children, groups) for _ in g]
        else:
            for i, port in enumerate(ports):
                children.append(Child(f"engine-{i}", ["engine", *model, *limits, "--port", str(port), "--threads", str(threads),
                                                      "--dtype", args.dtype, "--served-model-name", name,
                                                      "--log-level", "warning"], env=engine_env))
            engine_children = children
        _wait_healthy(engine_children, engine_urls)
        router_args = ["router", *model, "--port", str(args.port), "--host", args.host, "--strategy", args.strategy,
                       "--served-model-name", name, "--log-level", "warning"]
        for url in engine_urls:
            router_args += ["--engine", url]
        if args.roles:
            router_args += ["--roles", args.roles]
        router_args += _tracing_flags(args)
        keys = ",".join(args.api_key or []) or os.environ.get("MICROSERVE_API_KEYS", "")
        router = Child("router", router_args, env={**secret_env, "MICROSERVE_API_KEYS": keys})
        children.append(router)
        url = f"http://{args.host}:{args.port}"
        _wait_healthy([router], [url])
        children += _start_replicas(args, url, {**secret_env, "MICROSERVE_API_KEYS": keys}, model, name)
        what = (f"{n} simulated {args.simulate} engines" if args.simulate
                else f"{n} engines ({threads} thread{'s' if threads != 1 else ''} each)")
        print(_banner(url, name, what, args.strategy, token, keys.split(",")[0] if keys else "none"),
              flush=True)
        while not stopping.is_set():
            for c in children:
                if c.proc.poll() is None:
                    continue
                # A crash: start it again on the same port; the router takes it back once healthy.
                now = time.monotonic()
                c.restarts = [t for t in c.restarts if now - t < RESTART_WINDOW_S] + [now]
                if len(c.restarts) > args.max_restarts:
                    print(f"[serve] {c.name} exited with code {c.proc.returncode} {len(c.restarts)} times in "
                          f"{RESTART_WINDOW_S} s; stopping everything", flush=True)
                    return 1
                print(f"[serve] {c.name} exited with code {c.proc.returncode}; restarting it", flush=True)
                c.start()
            stopping.wait(0.5)
        return 0
    except RuntimeError as e:
        print(f"microserve: error: {e}", file=sys.stderr)
        return 1
    finally:
        for c in children:
            c.stop()
        for c in children:
            c.wait(timeout=15)


def _start_replicas(args, primary: str, env: dict, model: list[str], name: str) -> list[Child]:
    """`--routers N`: N - 1 more routers on the next ports, each following the first one's engines."""
    replicas = []
    for i in range(1, getattr(args, "routers", 1) or 1):
        replicas.append(Child(f"router-{i}", ["router", *model, "--port", str(args.port + i), "--host", args.host,
                                              "--strategy", args.strategy, "--served-model-name", name,
                                              "--follow", primary, "--log-level", "warning", *_tracing_flags(args)],
                              env=env))
    _wait_healthy(replicas, [f"http://{args.host}:{args.port + i}" for i in range(1, len(replicas) + 1)])
    return replicas


def _default_name(model: str | None) -> str:
    from microserve.tokenizer import served_model_name

    return served_model_name(model)


def _banner(url: str, name: str, what: str, strategy: str, token: str, api_key: str) -> str:
    auth = f" -H 'Authorization: Bearer {api_key}'" if api_key != "none" else ""
    return f"""
microserve is up: {what} behind a router using `{strategy}`.

  {url}/v1   (OpenAI-compatible; metrics at {url}/metrics)
  {url}/dashboard?token={token}   (live view: engines, latency, events, strategy switcher)

  curl {url}/v1/chat/completions -H 'content-type: application/json'{auth} \\
    -d '{{"model": "{name}", "messages": [{{"role": "user", "content": "What is the capital of France?"}}]}}'

  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1", api_key="{api_key}")
  print(client.chat.completions.create(model="{name}",
        messages=[{{"role": "user", "content": "Hello!"}}]).choices[0].message.content)

  switch strategy:  curl -X POST {url}/admin/strategy -H 'Authorization: Bearer {token}' \\
                      -d '{{"name": "least_loaded"}}'

Ctrl-C stops every process.
"""


def serve_ray(args) -> int:
    """`serve --ray`: engines as Ray actors across the cluster's nodes, the router in this process."""
    import asyncio

    import ray
    import uvicorn

    from microserve.router.app import build_router_app
    from microserve.router.cluster import Cluster
    from microserve.launch.ray_fleet import RayFleet
    from microserve.router.router import Router
    from microserve.tokenizer import load_tokenizer

    token = (args.cluster_token or os.environ.get("MICROSERVE_CLUSTER_TOKEN") or os.environ.get("MICROSERVE_ADMIN_TOKEN")
             or secrets.token_urlsafe(16))
    name = args.served_model_name or args.simulate or _default_name(args.model)
    roles = args.roles.split(",") if args.roles else ["both"] * args.engines
    if not set(roles) <= {"both", "prefill", "decode"}:
        print("microserve: error: --roles takes both, prefill or decode per engine", file=sys.stderr)
        return 2
    cpus = args.engine_cpus if args.engine_cpus is not None else (0 if args.simulate else 1)
    keys = ",".join(args.api_key or []) or os.environ.get("MICROSERVE_API_KEYS", "")
    # "local" starts a private Ray instance (stopped with us), "auto" joins the running one.
    ray.init(address=args.ray, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        # A private local instance stays on this machine: engines on 127.0.0.1 unless told otherwise.
        engine_host = args.engine_host or ("127.0.0.1" if args.ray == "local" else None)
        # engines' own /v1 is for the cluster too: user keys go through the router
        fleet = RayFleet(_ray_engine_spec(args, name, cpus, token), roles, host=engine_host,
                         num_cpus=cpus, num_gpus=args.engine_gpus, resources=_placement(args.placement))
        cluster = Cluster([], token=token)
        router = Router(cluster, strategy=args.strategy, fleet=fleet)
        tracing.setup_tracing("microserve-router", getattr(args, "otlp_traces_endpoint", None),
                              {"service.instance.id": f"{args.host}:{args.port}"})
        app = build_router_app(router, load_tokenizer(args.model), name, cluster_token=token,
                               api_keys=keys.split(",") if keys else None)
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                               **ROUTER_UVICORN))

        async def main():
            task = asyncio.create_task(serve_quietly())
            while not server.started and not task.done():
                await asyncio.sleep(0.2)
            if server.started:
                replicas.extend(await asyncio.to_thread(
                    _start_replicas, args, f"http://{args.host}:{args.port}",
                    {"MICROSERVE_CLUSTER_TOKEN": token, "MICROSERVE_API_KEYS": keys},
                    ["--model", args.model] if args.model else [], name))
                nodes = len({e.node for e in cluster.engines})
                what = f"{len(cluster.engines)} engines as Ray actors on {nodes} node{'s' if nodes != 1 else ''}"
                print(_banner(f"http://{args.host}:{args.port}", name, what, args.strategy, token,
                              keys.split(",")[0] if keys else "none"), flush=True)
            await task

        async def serve_quietly():
            try:
                await server.serve()
            except SystemExit:  # start-up failed; uvicorn has logged why
                pass

        replicas: list[Child] = []
        stop = lambda *_: setattr(server, "should_exit", True)  # noqa: E731
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        try:
            asyncio.run(main())
        finally:
            for c in replicas:
                c.stop()
            for c in replicas:
                c.wait(timeout=15)
        return 0 if server.started else 1
    finally:
        tracing.shutdown_tracing()
        ray.shutdown()


def _ray_engine_spec(args, name: str, cpus: float, token: str) -> EngineSpec:
    """What each engine actor of `serve --ray` runs: the flags `serve` passes to local engines."""
    limits = {flag: getattr(args, flag) for flag in ("max_num_seqs", "max_num_batched_tokens", "kv_cache_memory")
              if getattr(args, flag, None)}
    real = not args.simulate
    config = EngineConfig(model=args.model, dtype=args.dtype if real else "auto",
                          num_threads=max(1, int(cpus)) if real else None, kv_shared=real, simulate=args.simulate,
                          deterministic=real and bool(getattr(args, "deterministic", False)),
                          quantization=getattr(args, "quantization", "auto") if real else "auto", **limits)
    return EngineSpec(config, model_name=name, log_level="warning", api_keys=[token], cluster_token=token,
                      otlp_traces_endpoint=getattr(args, "otlp_traces_endpoint", None))


def _placement(specs: list[str] | None) -> dict[str, dict[str, float]]:
    """--placement ROLE:RESOURCE[=AMOUNT] (repeatable): engines of ROLE only on nodes that offer
    the Ray resource (e.g. a node started with --resources '{"prefill_node": 8}')."""
    out: dict[str, dict[str, float]] = {}
    for spec in specs or []:
        role, _, res = spec.partition(":")
        res, _, amount = res.partition("=")
        if role not in ("both", "prefill", "decode") or not res:
            raise SystemExit(f"microserve: error: --placement {spec!r}: expected ROLE:RESOURCE[=AMOUNT]")
        out.setdefault(role, {})[res] = float(amount or 1)
    return out
