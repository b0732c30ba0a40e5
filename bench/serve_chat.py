#!/usr/bin/env python3
"""Chat serving under load: `clasp serve --llm` against llama.cpp's server (llama-cpp-python's
`llama_cpp.server`), the same GGUF (SmolLM2-135M-Instruct Q4_1) and the same threads, in one
interleaved run.

    cargo build --release && PYTHONPATH=/tmp/llamacpp python3 bench/serve_chat.py \\
        [--streams 1,8,32] [--rounds 2] [--max-tokens 48] [--threads 2] [--prefill-chunk 128,0]

llama-cpp-python is built from PyPI's sdist (`pip install --target /tmp/llamacpp
"llama-cpp-python[server]"`, about 20 minutes on two cores); without it the llama.cpp column is
left out, and said so.

Each round runs, for each number of concurrent streams S, 2·S streamed chat requests (at most S at
once, greedy, `max_tokens` each) against each server in turn (the order alternates by round). The
prompts mix lengths: a user turn of 1, 6 or 24 Flickr8k captions (about 20, 110 and 420 tokens).
Per server and S: total completion tokens per second of wall time, time to first token and
inter-token latency (p50 and p99 over every request's chunks), medians over rounds. The CPU and
its flags are printed with the table.
"""
import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
from lit import cpu  # noqa: E402  (the CPU and its flags, as bench/lit.py prints them)

CLASP = os.environ.get("CLASP_BIN", os.path.join(ROOT, "target/release/clasp"))
SHARED = os.path.join(ROOT, "..", "shared")
LOG = os.path.join(BENCH, ".work", "serve_chat.log")  # the servers' own output


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_up(port, proc, what, timeout=120):
    t = time.time()
    while time.time() - t < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited; its log: {LOG}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/v1/models")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{what} did not start")


def prompts(n, seed=0):
    lines = open(os.path.join(SHARED, "data/flickr8k/Flickr8k.token.txt"),
                 encoding="utf-8").read().splitlines()
    caps = [l.split("\t", 1)[1] for l in lines]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = (1, 6, 24)[i % 3]
        body = " ".join(rng.sample(caps, k))
        out.append(f"Here are some photo captions: {body}\nSummarise them in one sentence.")
    return out


def stream(port, prompt, max_tokens):
    """One streamed chat request: (time to first token, inter-token gaps, tokens)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"model": "smollm2", "stream": True, "temperature": 0,
                       "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": prompt}]})
    t0 = time.perf_counter()
    c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise SystemExit(f"HTTP {r.status}: {r.read()[:500]}")
    times = []
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        delta = json.loads(data)["choices"][0].get("delta", {})
        if delta.get("content"):
            times.append(time.perf_counter())
    c.close()
    if not times:
        return None
    gaps = [b - a for a, b in zip(times, times[1:])]
    return times[0] - t0, gaps, len(times)


def load(port, streams, reqs, max_tokens):
    t = time.perf_counter()
    with ThreadPoolExecutor(streams) as ex:
        res = [r for r in ex.map(lambda p: stream(port, p, max_tokens), reqs) if r]
    wall = time.perf_counter() - t
    ttft = sorted(r[0] for r in res)
    gaps = sorted(g for r in res for g in r[1])
    q = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")  # noqa: E731
    return {"tok_s": sum(r[2] for r in res) / wall, "ttft_p50": q(ttft, .5), "ttft_p99": q(ttft, .99),
            "itl_p50": q(gaps, .5), "itl_p99": q(gaps, .99)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", default="1,8,32")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill-chunk", default="128",
                    help="clasp's --prefill-chunk values, one server each (0: whole prompts)")
    a = ap.parse_args()
    gguf = subprocess.run([os.path.join(ROOT, "scripts/get-model.sh"), "smollm2"], check=True,
                          capture_output=True, text=True).stdout.strip()
    machine = cpu()
    print(f"CPU: {machine}", file=sys.stderr)
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    servers = {}
    os.makedirs(os.path.dirname(LOG), exist_ok=True)
    log = open(LOG, "w")
    for chunk in a.prefill_chunk.split(","):
        p = free_port()
        name = "clasp" if chunk == "128" else f"clasp (prefill chunk {chunk})"
        servers[name] = (p, subprocess.Popen(
            [CLASP, "serve", "--llm", gguf, "--addr", f"127.0.0.1:{p}", "--max-batch-size", "32",
             "--max-queue", "256", "--prefill-chunk", chunk], env=env,
            stdout=subprocess.DEVNULL, stderr=log))
    try:
        import llama_cpp  # noqa: F401
        p = free_port()
        servers["llama.cpp"] = (p, subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--port", str(p),
             "--host", "127.0.0.1", "--n_threads", str(a.threads), "--n_ctx", "4096",
             "--model_alias", "smollm2", "--interrupt_requests", "False"],  # else a new request cuts the streaming one off
            stdout=subprocess.DEVNULL, stderr=log))  # verbose: a pipe would fill and stall it
    except ImportError as e:
        print(f"llama-cpp-python not importable ({e}); the llama.cpp column is left out",
              file=sys.stderr)
    try:
        for name, (port, proc) in servers.items():
            wait_up(port, proc, name)
            stream(port, "Hello.", 4)  # warm-up
        rows = {}
        for r in range(a.rounds):
            order = list(servers) if r % 2 == 0 else list(servers)[::-1]
            for s in [int(x) for x in a.streams.split(",")]:
                reqs = prompts(2 * s, seed=r * 100 + s)
                for name in order:
                    m = load(servers[name][0], s, reqs, a.max_tokens)
                    rows.setdefault((name, s), []).append(m)
                    print(f"round {r + 1}, {s} streams, {name}: {m['tok_s']:.1f} tok/s, "
                          f"TTFT p50 {m['ttft_p50'] * 1000:.0f} ms, ITL p99 "
                          f"{m['itl_p99'] * 1000:.0f} ms", file=sys.stderr)
    finally:
        for _, proc in servers.values():
            proc.kill()
    med = {k: {f: statistics.median(m[f] for m in v) for f in v[0]} for k, v in rows.items()}
    print(f"\nCPU: {machine}; {a.threads} threads; max_tokens {a.max_tokens}\n")
    print("| streams | server | tokens/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 |")
    print("|---|---|---|---|---|---|---|")
    for (name, s), m in sorted(med.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"| {s} | {name} | {m['tok_s']:.1f} | {m['ttft_p50'] * 1000:.0f} ms | "
              f"{m['ttft_p99'] * 1000:.0f} ms | {m['itl_p50'] * 1000:.0f} ms | "
              f"{m['itl_p99'] * 1000:.0f} ms |")
    if "llama.cpp" in servers:
        for s in [int(x) for x in a.streams.split(",")]:
            c, l = med[("clasp", s)], med[("llama.cpp", s)]
            print(f"{s} streams: clasp/llama.cpp throughput {c['tok_s'] / l['tok_s']:.2f}x, "
                  f"ITL p99 {c['itl_p99'] / l['itl_p99']:.2f}x")


if __name__ == "__main__":
    main()
