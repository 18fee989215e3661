"""prep_recv / remote_send / start_generate / abort / status between real engine processes."""

from __future__ import annotations

import time

import httpx
import pytest
import torch

from server_utils import ServerProcess

pytestmark = pytest.mark.slow  # every test here starts server processes or loads the built-in model

BS = 8  # small blocks, so prompts span several and end in a partial one


SIMULATED = "llama-3.1-8b@h100"


def engine(model, *extra):
    source = ["--simulate", SIMULATED] if model == SIMULATED else ["--model", model, "--kv-cache-memory", "32MiB"]
    return ServerProcess(["engine", *source, "--served-model-name", "tiny", "--dtype", "float32",
                          "--block-size", str(BS), *extra])


# Every test runs on real engines (a tiny model) and on simulated ones: the same scheduler,
# block pool, leases and KV handshake, with a cost model for the forward pass.
@pytest.fixture(scope="module", params=["model", "simulated"])
def cluster(request, tiny_llama):
    model = tiny_llama if request.param == "model" else SIMULATED
    procs = {"p": engine(model), "d": engine(model), "t": engine(model, "--kv-transport", "tcp"), "ref": engine(model)}
    procs["simulated"] = request.param == "simulated"
    yield procs
    for p in procs.values():
        if isinstance(p, ServerProcess):
            p.stop()


def post(server, path, body, expect=200):
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == expect, r.text
    return r.json()


def status(server):
    return httpx.get(server.url + "/microserving/status").json()


def prompt_of(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 49152, (n,), generator=g).tolist()


def generate(server, rid, prompt, begin=0, max_tokens=16):
    out = post(server, "/microserving/start_generate", {"request_id": rid, "prompt": prompt, "begin": begin,
                                                        "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    return out["choices"][0]["token_ids"], out


def reference(cluster, prompt, rid):
    return generate(cluster["ref"], rid, prompt)[0]


def disaggregated(p, d, prompt, end, rid):
    """The three calls of DESIGN.md: reserve on D, send from P, generate on D."""
    recv = post(d, "/microserving/prep_recv", {"request_id": rid, "prompt": prompt, "end": end})
    end = end % len(prompt)
    m = recv["prefix_matched_length"]
    sent = None
    if m < end:
        sent = post(p, "/microserving/remote_send", {"request_id": rid, "prompt": prompt, "begin": m, "end": end,
                                                    "kv_addr_info": recv["kv_addr_info"]})
    tokens, out = generate(d, rid, prompt, begin=end)
    return tokens, recv, sent, out


@pytest.mark.parametrize("receiver,transport", [("d", "shm"), ("t", "tcp")])
@pytest.mark.parametrize("split", [-1, 0.7])
def test_split_prefill_matches_one_engine(cluster, receiver, transport, split):
    prompt = prompt_of(45, seed=1 if split == -1 else 2)
    end = split if split == -1 else int(split * len(prompt))
    rid = f"split-{receiver}-{split}"
    tokens, recv, sent, out = disaggregated(cluster["p"], cluster[receiver], prompt, end, rid)
    assert recv["prefix_matched_length"] == 0 and sent["transport"] == ("sim" if cluster["simulated"] else transport)
    assert sent["tokens"] == end % len(prompt) and sent["bytes"] > 0
    assert out["usage"]["cached_tokens"] == end % len(prompt)  # D computed only the rest
    assert tokens == reference(cluster, prompt, rid + "-ref")


RECEIVERS = pytest.mark.parametrize("receiver,seed", [("d", 100), ("t", 200)])  # shm, tcp


@RECEIVERS
def test_receiver_already_holding_a_prefix(cluster, receiver, seed):
    d = cluster[receiver]
    shared = prompt_of(32, seed=seed)
    generate(d, f"warm-{receiver}", shared + prompt_of(5, seed=seed + 1))  # D caches the 32-token prefix
    prompt = shared + prompt_of(20, seed=seed + 2)
    tokens, recv, sent, _ = disaggregated(cluster["p"], d, prompt, -1, f"prefix-{receiver}")
    assert recv["prefix_matched_length"] == 32
    assert sent["tokens"] == len(prompt) - 1 - 32  # only [32, end) crossed
    assert tokens == reference(cluster, prompt, f"prefix-ref-{receiver}")


@RECEIVERS
def test_context_migration_sends_cached_kv_without_recompute(cluster, receiver, seed):
    p = cluster["p"]
    prompt = prompt_of(49, seed=seed + 3)  # end = 48 = 6 full blocks
    generate(p, f"warm-p-{receiver}", prompt)  # P holds the whole prompt in its prefix cache
    tokens, recv, sent, _ = disaggregated(p, cluster[receiver], prompt, -1, f"migrate-{receiver}")
    assert sent["reused_tokens"] == 48 and sent["computed_tokens"] == 0
    assert tokens == reference(cluster, prompt, f"migrate-ref-{receiver}")


@RECEIVERS
def test_begin_equal_end_sends_nothing(cluster, receiver, seed):
    d = cluster[receiver]
    prompt = prompt_of(41, seed=seed + 4)
    generate(d, f"warm2-{receiver}", prompt)
    rid = f"nothing-{receiver}"
    recv = post(d, "/microserving/prep_recv", {"request_id": rid, "prompt": prompt, "end": 40})
    assert recv["prefix_matched_length"] == 40
    sent = post(cluster["p"], "/microserving/remote_send", {"request_id": rid, "prompt": prompt, "begin": 40,
                                                            "end": 40, "kv_addr_info": recv["kv_addr_info"]})
    assert sent["tokens"] == 0
    assert generate(d, rid, prompt, begin=40)[0] == reference(cluster, prompt, rid + "-ref")


def wait_for_free(server, value, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and status(server)["free_blocks"] != value:
        time.sleep(0.1)
    return status(server)["free_blocks"]


def test_lease_expiry_and_abort_return_every_block(cluster):
    d = cluster["d"]
    free = status(d)["free_blocks"]
    prompt = prompt_of(60, seed=8)
    recv = post(d, "/microserving/prep_recv", {"request_id": "lease", "prompt": prompt, "end": -1, "lease_s": 0.5})
    assert status(d)["free_blocks"] == free - 8  # ceil(59 / 8) blocks reserved
    assert wait_for_free(d, free) == free
    late = httpx.post(cluster["p"].url + "/microserving/remote_send", json={
        "request_id": "lease", "prompt": prompt, "begin": 0, "end": 59, "kv_addr_info": recv["kv_addr_info"]}, timeout=60)
    assert late.status_code == 502 and "no reservation" in late.json()["error"]["message"]

    post(d, "/microserving/prep_recv", {"request_id": "gone", "prompt": prompt, "end": 30})
    assert status(d)["free_blocks"] < free
    assert post(d, "/microserving/abort", {"request_id": "gone"})["found"] is True
    assert wait_for_free(d, free) == free
    assert post(d, "/microserving/abort", {"request_id": "gone"})["found"] is False


def test_wrong_fingerprint_and_wrong_token_are_refused(cluster):
    d, p = cluster["d"], cluster["p"]
    prompt = prompt_of(30, seed=9)
    recv = post(d, "/microserving/prep_recv", {"request_id": "guard", "prompt": prompt, "end": -1})
    body = {"request_id": "guard", "prompt": prompt, "begin": 0, "end": 29}

    fp = recv["kv_addr_info"]["fingerprint"]
    bad_layout = {**recv["kv_addr_info"], "fingerprint": {**fp, "head_dim": 2 * fp["head_dim"]}}
    r = httpx.post(p.url + "/microserving/remote_send", json={**body, "kv_addr_info": bad_layout}, timeout=60)
    assert r.status_code == 400 and "layout mismatch" in r.json()["error"]["message"]

    bad_token = {**recv["kv_addr_info"], "token": "0" * 32}
    r = httpx.post(p.url + "/microserving/remote_send", json={**body, "kv_addr_info": bad_token}, timeout=60)
    assert r.status_code == 502 and "token" in r.json()["error"]["message"]

    # Refusals moved no byte: the real token still works and the output is right.
    post(p, "/microserving/remote_send", {**body, "kv_addr_info": recv["kv_addr_info"]})
    assert generate(d, "guard", prompt, begin=29)[0] == reference(cluster, prompt, "guard-ref")
    r = httpx.post(p.url + "/microserving/remote_send", json={**body, "kv_addr_info": recv["kv_addr_info"]}, timeout=60)
    assert r.status_code == 502  # one-time token: the reservation is gone now


def test_status_and_prefix_index(cluster):
    d = cluster["d"]
    s = status(d)
    assert {"running", "waiting", "free_blocks", "num_blocks", "prefix_hit_rate", "fingerprint"} <= set(s)
    assert s["fingerprint"]["block_size"] == BS
    prompt = prompt_of(24, seed=10)
    generate(d, "index", prompt)
    # What a router sees of that cache: prep_recv's match, and the block hashes it indexes.
    recv = post(d, "/microserving/prep_recv", {"request_id": "index-probe", "prompt": prompt + [1], "end": 24})
    assert recv["prefix_matched_length"] == 24
    post(d, "/microserving/abort", {"request_id": "index-probe"})
    hashes = httpx.get(d.url + "/microserving/prefix_hashes").json()["hashes"]
    from microserve.engine.block_pool import hash_prompt_blocks

    assert all(h.hex() in hashes for h in hash_prompt_blocks(prompt, BS))


def test_builtin_model_1p1d():
    p, d = ServerProcess(["engine", "--served-model-name", "s"]), ServerProcess(["engine", "--served-model-name", "s"])
    try:
        from microserve.tokenizer import builtin_model_path, gguf_tokenizer
        from pathlib import Path

        tok = gguf_tokenizer(Path(builtin_model_path()))
        text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                       tokenize=False, add_generation_prompt=True)
        prompt = tok(text, add_special_tokens=False).input_ids
        alone = generate(p, "alone", prompt, max_tokens=12)[0]
        tokens, _, sent, _ = disaggregated(p, d, prompt, -1, "split")
        assert sent["transport"] == "shm"
        assert tokens[:12] == alone
        assert "Paris" in tok.decode(tokens)
    finally:
        p.stop()
        d.stop()


def test_sender_dying_mid_transfer_leaves_nothing_valid(cluster):
    import json
    import socket

    t = cluster["t"]
    prompt = prompt_of(40, seed=11)
    recv = post(t, "/microserving/prep_recv", {"request_id": "dies", "prompt": prompt, "end": -1})
    addr = recv["kv_addr_info"]
    with socket.create_connection((addr["host"], addr["port"])) as s:
        s.sendall(json.dumps({"request_id": "dies", "token": addr["token"], "fingerprint": addr["fingerprint"],
                              "begin": 0, "end": 39,
                              "transport": "sim" if cluster["simulated"] else "tcp"}).encode() + b"\n")
        assert json.loads(s.makefile("rb").readline())["ok"]
        s.sendall(b"\x7f" * 1000)  # part of layer 0, then the sender is gone
    time.sleep(0.5)
    tokens, out = generate(t, "dies", prompt, begin=39)
    assert out["usage"]["cached_tokens"] == 0  # the half-written positions were not trusted
    assert tokens == reference(cluster, prompt, "dies-ref")


def test_prefix_events_follow_the_cache(cluster):
    d = cluster["d"]
    start = httpx.get(d.url + "/microserving/kv_events").json()["next"]
    prompt = prompt_of(17, seed=12)
    generate(d, "events", prompt, max_tokens=1)
    ev = httpx.get(d.url + "/microserving/kv_events", params={"since": start}).json()
    from microserve.engine.block_pool import hash_prompt_blocks

    stored = {h for _, kind, h in ev["events"] if kind == "stored"}
    assert {h.hex() for h in hash_prompt_blocks(prompt, BS)} <= stored and not ev["dropped"]
