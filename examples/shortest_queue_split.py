"""A custom strategy: long prompts are prefilled on the busier engine and decoded on the
idler one; short prompts just go to the idler one. Load it with
`microserve router --strategy examples/shortest_queue_split.py ...` or POST it to /admin/strategy."""

from microserve.router.strategies import generate_on, split


async def strategy(req, cluster, long_prompt=64):
    engines = sorted(cluster.healthy, key=lambda e: e.load)
    idle, busy = engines[0], engines[-1]
    if len(req.prompt) < long_prompt or idle is busy:
        async for chunk in generate_on(idle, req):
            yield chunk
        return
    async for chunk in split(req, busy, idle, end=len(req.prompt) - 1):
        yield chunk
