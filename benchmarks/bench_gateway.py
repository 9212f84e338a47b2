"""Gateway overhead and overload behaviour of the OpenAI-compatible endpoint.

1. Overhead: the same requests (token-id prompts, greedy, fixed max_tokens) sent
   (a) to the engine in-process (``EndpointServer.complete``, the code a replica runs) and
   (b) over HTTP to ``/v1/completions`` on a local platform (gateway on Ray Serve → Serve
   handle → replica), at the same concurrency: p50/p99 latency, requests/s, and ratios.
2. Goodput under overload: closed-loop clients far above what one replica serves, for a
   fixed time, against two endpoints identical but for backpressure: ``max_queued_requests``
   small (on: excess requests get 503 at once and retry after a pause) vs ``-1`` (off: every
   request waits in the queue). Goodput = requests answered 200 within the latency SLO, per
   second.

    python benchmarks/bench_gateway.py              # ~2 min on 2 cores
    python benchmarks/bench_gateway.py --quick      # smaller, ~1 min
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summarize(latencies_s: list[float], wall_s: float) -> dict[str, float]:
    return {"p50_ms": 1000 * percentile(latencies_s, 0.5), "p99_ms": 1000 * percentile(latencies_s, 0.99),
            "mean_ms": 1000 * statistics.fmean(latencies_s), "req_per_s": len(latencies_s) / wall_s}


def requests_for(n: int, max_tokens: int, vocab: int) -> list[dict]:
    return [{"prompt": [(7 * i + j) % (vocab - 3) + 3 for j in range(8 + i % 8)],
             "params": {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}} for i in range(n)]


async def run_closed_loop(send, payloads: list, concurrency: int) -> tuple[list[float], float]:
    queue = list(payloads)
    latencies: list[float] = []

    async def worker():
        while queue:
            payload = queue.pop()
            start = time.perf_counter()
            await send(payload)
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    return latencies, time.perf_counter() - start


def bench_in_process(record_json: str, payloads: list, concurrency: int) -> dict[str, float]:
    from expertmesh.serve.replica import EndpointServer

    server = EndpointServer(record_json, {"service_name": "bench", "prometheus": False})

    async def go():
        await server.complete(payloads[0])  # warm up
        return await run_closed_loop(server.complete, payloads, concurrency)

    return summarize(*asyncio.run(go()))


def bench_http(url: str, key: str, model: str, payloads: list, concurrency: int) -> dict[str, float]:
    import httpx

    async def go():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency + 4)) as http:
            async def send(p):
                body = {"model": model, "prompt": p["prompt"], **p["params"]}
                r = await http.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
                r.raise_for_status()

            await send(payloads[0])
            return await run_closed_loop(send, payloads, concurrency)

    return summarize(*asyncio.run(go()))


def bench_overload(url: str, key: str, model: str, payload: dict, clients: int, duration_s: float, slo_s: float,
                   retry_pause_s: float) -> dict[str, float]:
    import httpx

    async def go():
        ok_in_slo = ok_late = rejected = 0
        latencies: list[float] = []
        deadline = time.perf_counter() + duration_s
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=clients + 4)) as http:
            async def client():
                nonlocal ok_in_slo, ok_late, rejected
                while time.perf_counter() < deadline:
                    start = time.perf_counter()
                    r = await http.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {key}"},
                                        json={"model": model, "prompt": payload["prompt"], **payload["params"]})
                    elapsed = time.perf_counter() - start
                    if r.status_code == 200:
                        latencies.append(elapsed)
                        if elapsed <= slo_s:
                            ok_in_slo += 1
                        else:
                            ok_late += 1
                    else:
                        rejected += 1
                        await asyncio.sleep(retry_pause_s)

            start = time.perf_counter()
            await asyncio.gather(*[client() for _ in range(clients)])
            wall = time.perf_counter() - start
        return {"goodput_req_per_s": ok_in_slo / wall, "ok_within_slo": ok_in_slo, "ok_late": ok_late,
                "rejected_503": rejected, "p50_ms": 1000 * percentile(latencies, 0.5) if latencies else float("nan"),
                "p99_ms": 1000 * percentile(latencies, 0.99) if latencies else float("nan")}

    return asyncio.run(go())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--overload-clients", type=int, default=24)
    parser.add_argument("--overload-max-tokens", type=int, default=32)
    parser.add_argument("--duration-s", type=float, default=20.0, help="per overload run")
    parser.add_argument("--slo-s", type=float, default=None, help="default: 4 x the HTTP p50 of one request")
    parser.add_argument("--num-cpus", type=int, default=4, help="local Ray CPUs")
    parser.add_argument("--quick", action="store_true", help="fewer requests, shorter overload runs")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.duration_s, args.overload_clients = 24, 10.0, 16
    print("command:", shlex.join([sys.executable, *sys.argv]))

    from expertmesh.cli.demo import tiny_checkpoint
    from expertmesh.serve.client import PlatformClient
    from expertmesh.serve.endpoints import EndpointRecord, EndpointSpec, inspect_checkpoint
    from expertmesh.serve.platform import Platform, PlatformConfig
    from expertmesh.store import free_port

    root = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    ckpt = tiny_checkpoint(root / "ckpt")
    model = inspect_checkpoint(ckpt)
    payloads = requests_for(args.requests, args.max_tokens, model.vocab_size)
    spec = dict(tenant="bench", model=str(ckpt), max_num_seqs=8, num_cpus=1.0, max_ongoing_requests=8)

    print(f"\n[1] gateway overhead: {args.requests} requests, concurrency {args.concurrency}, "
          f"{args.max_tokens} tokens each, tiny random checkpoint ({model.vocab_size} vocab)")
    local = bench_in_process(EndpointRecord(EndpointSpec(name="local", **spec), model, 0.0).to_json(), payloads,
                             args.concurrency)
    platform = Platform.start(PlatformConfig(state_dir=root / "state", port=free_port(), num_cpus=args.num_cpus,
                                             object_store_bytes=300 * 1024**2, gateway_max_replicas=1))
    try:
        admin = PlatformClient(platform.url, platform.admin_key)
        admin.create_tenant("bench", {"requests_per_min": 10**7, "tokens_per_min": 10**9})
        key = admin.create_key("bench")["key"]
        admin.deploy_endpoint(name="plain", **spec)
        admin.deploy_endpoint(name="bp-on", **{**spec, "max_ongoing_requests": 4, "max_queued_requests": 4})
        admin.deploy_endpoint(name="bp-off", **{**spec, "max_ongoing_requests": 4, "max_queued_requests": -1})
        for name in ("plain", "bp-on", "bp-off"):
            while admin.get_endpoint("bench", name)["status"] != "RUNNING":
                time.sleep(0.5)
        http = bench_http(platform.url, key, "plain", payloads, args.concurrency)
        print(f"{'path':<28}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}{'req/s':>10}")
        for label, row in (("engine in-process", local), ("HTTP gateway -> Serve", http)):
            print(f"{label:<28}{row['p50_ms']:>10.1f}{row['p99_ms']:>10.1f}{row['mean_ms']:>10.1f}"
                  f"{row['req_per_s']:>10.2f}")
        print(f"gateway overhead: p50 +{http['p50_ms'] - local['p50_ms']:.1f} ms "
              f"({http['p50_ms'] / local['p50_ms']:.2f}x), throughput {http['req_per_s'] / local['req_per_s']:.2f}x "
              f"of in-process")

        one = bench_http(platform.url, key, "plain", payloads[:4], 1)
        slo_s = args.slo_s or 4 * one["p50_ms"] / 1000 * args.overload_max_tokens / args.max_tokens
        heavy = requests_for(1, args.overload_max_tokens, model.vocab_size)[0]
        print(f"\n[2] goodput under overload: {args.overload_clients} closed-loop clients for {args.duration_s:.0f}s "
              f"per endpoint, {args.overload_max_tokens} tokens each, 1 replica (max_ongoing_requests=4), "
              f"SLO {slo_s:.2f}s, 503 -> retry after 0.2s")
        print(f"{'backpressure':<34}{'goodput/s':>10}{'in SLO':>8}{'late':>6}{'503':>7}{'p50 ms':>9}{'p99 ms':>9}")
        rows = {}
        for label, name in (("on  (max_queued_requests=4)", "bp-on"), ("off (max_queued_requests=-1)", "bp-off")):
            rows[name] = r = bench_overload(platform.url, key, name, heavy, args.overload_clients, args.duration_s,
                                            slo_s, 0.2)
            print(f"{label:<34}{r['goodput_req_per_s']:>10.2f}{r['ok_within_slo']:>8}{r['ok_late']:>6}"
                  f"{r['rejected_503']:>7}{r['p50_ms']:>9.0f}{r['p99_ms']:>9.0f}")
        off = rows["bp-off"]["goodput_req_per_s"]
        ratio = rows["bp-on"]["goodput_req_per_s"] / off if off else float("inf")
        print(f"goodput with backpressure on / off: {ratio:.2f}x")
    finally:
        platform.stop()


if __name__ == "__main__":
    main()
