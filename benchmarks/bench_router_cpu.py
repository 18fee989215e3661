"""The router's CPU per request: `serve --simulate` (two simulated engines, round_robin), N
streamed completions of 16 tokens in / 8 out at C in flight, and the CPU time of the router
process alone (from /proc, less its idle rate). PROFILE=out.txt also records a py-spy profile.

    python benchmarks/bench_router_cpu.py [N=1000] [C=64]
"""
import asyncio, os, signal, subprocess, sys, time, json
import httpx

PORT = 18777
N = int(sys.argv[1]) if len(sys.argv) > 1 else 400
C = int(sys.argv[2]) if len(sys.argv) > 2 else 64
PROFILE = os.environ.get("PROFILE", "")

def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

async def one(client, i):
    body = {"model": "llama-3.1-8b@h100", "prompt": [100 + (i * 7 + k) % 5000 for k in range(16)],
            "max_tokens": 8, "ignore_eos": True, "stream": True}
    t = time.perf_counter()
    async with client.stream("POST", f"http://127.0.0.1:{PORT}/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for _ in r.aiter_lines():
            pass
    return time.perf_counter() - t

async def load(n, c):
    sem = asyncio.Semaphore(c)
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=c)) as client:
        async def lim(i):
            async with sem:
                return await one(client, i)
        t = time.perf_counter()
        lat = await asyncio.gather(*(lim(i) for i in range(n)))
        return time.perf_counter() - t, sorted(lat)

proc = subprocess.Popen([sys.executable, "-m", "microserve.cli", "serve", "--engines", "2", "--simulate", "llama-3.1-8b@h100",
                         "--port", str(PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
try:
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{PORT}/health").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    time.sleep(2)
    out = subprocess.run(["lsof", "-t", f"-iTCP:{PORT}", "-sTCP:LISTEN"], capture_output=True, text=True).stdout
    rpid = int(out.split()[0])
    asyncio.run(load(50, 8))  # warm up
    idle0 = cpu(rpid); time.sleep(3); idle = (cpu(rpid) - idle0) / 3
    if PROFILE:
        spy = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "py-spy"), "record", "-p", str(rpid), "-o", PROFILE, "-f", "raw", "-r", "200", "-d", "20"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    c0 = cpu(rpid)
    wall, lat = asyncio.run(load(N, C))
    used = cpu(rpid) - c0
    print(json.dumps({"requests": N, "in_flight": C, "req_per_s": round(N / wall, 1),
                      "router_cpu_ms_per_req": round(1000 * (used - idle * wall) / N, 2),
                      "idle_cpu_frac": round(idle, 3), "p50_s": round(lat[len(lat)//2], 4)}))
    if PROFILE:
        spy.wait()
finally:
    os.killpg(proc.pid, signal.SIGTERM); proc.wait(30)
