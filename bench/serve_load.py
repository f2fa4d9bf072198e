"""Load test for `lorafit serve` on loopback: throughput, latency, 5xx count, malformed battery, memory.

    LORAFIT_DATA_DIR=/path/to/mirror python bench/serve_load.py banking=runs/b77-lora emotion=runs/emotion-lora

Starts `lorafit serve` with the given adapters on 127.0.0.1 (a free port), then
0. reads its resident memory after a warm-up and `--memory-seconds` of traffic;
1. sends single-text requests from `--concurrency` clients for `--duration` seconds (bounded by
   `--max-requests`), texts drawn from each run's test split, adapters chosen at random;
2. sends the malformed battery (bench/serve_cases.py) `--battery-rounds` times while the same
   clients keep loading the server, and counts answers outside 4xx (a refused body must still be
   answered, not reset);
3. starts the same server on a merged export of each run (`lorafit export --format merged`: every
   classifier a full model, the alternative without sharing), sends it the same traffic as in 0 and
   compares resident memory.
Prints a summary; the last line is one JSON object. Keep the machine otherwise idle.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from serve_cases import malformed_cases

from lorafit.inference import run_split
from lorafit.rundir import RunDir
from lorafit.serve import parse_adapter_spec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> dict:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def wait_healthy(base: str, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"server exited: {server.stdout.read()}")
        try:
            if httpx.get(f"{base}/v1/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise SystemExit("server did not become healthy")


async def load(base: str, texts: dict[str, list[str]], concurrency: int, duration: float, max_requests: int,
               stop: threading.Event | None = None) -> dict:
    """`concurrency` clients for `duration` seconds, or until `stop` is set."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    sent = 0
    stop_at = time.monotonic() + duration
    rng = random.Random(0)
    names = sorted(texts)

    async def client():
        nonlocal sent
        async with httpx.AsyncClient(base_url=base, timeout=30) as c:
            while time.monotonic() < stop_at and sent < max_requests and not (stop and stop.is_set()):
                sent += 1
                name = rng.choice(names)
                body = {"texts": [rng.choice(texts[name])], "top_k": 3, "adapter": name}
                start = time.perf_counter()
                try:
                    status = (await c.post("/v1/predict", json=body)).status_code
                except httpx.HTTPError:
                    status = 599  # no answer at all counts as a server failure
                latencies.append((time.perf_counter() - start) * 1000)
                statuses[status] = statuses.get(status, 0) + 1

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    return {"requests": len(latencies), "seconds": elapsed, "rps": len(latencies) / elapsed,
            "p50_ms": pick(0.5), "p90_ms": pick(0.9), "p99_ms": pick(0.99), "max_ms": latencies[-1],
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "server_errors": sum(v for k, v in statuses.items() if k >= 500)}


def battery(port: int, adapter: str) -> list[dict]:
    """Each case as raw HTTP over a socket: clients such as httpx refuse to send some of them."""
    results = []
    for what, path, headers, body in malformed_cases(adapter):
        head = {"host": "127.0.0.1", "connection": "close", "content-length": str(len(body)), **headers}
        request = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items()) + "\r\n"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
                conn.sendall(request.encode("latin-1") + body)
                reply = conn.makefile("rb").readline().decode("latin-1")
            status = int(reply.split()[1]) if reply.startswith("HTTP/") else f"no answer ({reply[:40]!r})"
        except OSError as e:
            status = f"no answer ({type(e).__name__})"
        results.append({"case": what, "status": status})
    return results


def battery_under_load(port: int, adapter: str, texts: dict[str, list[str]], args) -> tuple[list[dict], dict]:
    """The battery, `args.battery_rounds` times, while `args.concurrency` clients keep sending predictions."""
    stop, traffic = threading.Event(), {}
    loader = threading.Thread(target=lambda: traffic.update(asyncio.run(
        load(f"http://127.0.0.1:{port}", texts, args.concurrency, 3600, args.max_requests, stop))))
    loader.start()
    try:
        time.sleep(1.0)  # the clients are busy before the first malformed request
        cases = [c for _ in range(args.battery_rounds) for c in battery(port, adapter)]
    finally:
        stop.set()
        loader.join()
    return cases, traffic


def start_server(specs: dict[str, str], max_wait_ms: float, threads: int | None) -> tuple[subprocess.Popen, int]:
    port = free_port()
    extra = ["--threads", str(threads)] if threads else []
    server = subprocess.Popen([sys.executable, "-m", "lorafit", "serve", *[f"{n}={p}" for n, p in specs.items()],
                               "--port", str(port), "--max-wait-ms", str(max_wait_ms), *extra],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_healthy(f"http://127.0.0.1:{port}", server)
    return server, port


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    server.wait(timeout=30)


def memory_phase(server: subprocess.Popen, port: int, texts: dict[str, list[str]], args) -> dict:
    """Weights held (the server's own count) and resident memory after a warm-up, then after traffic."""
    base = f"http://127.0.0.1:{port}"
    asyncio.run(load(base, texts, 4, 3, 200))
    figures = {"weights_mb": httpx.get(f"{base}/v1/health").json()["weights_mb"], "warm": rss_mb(server.pid)}
    asyncio.run(load(base, texts, args.concurrency, args.memory_seconds, args.max_requests))
    figures["loaded"] = rss_mb(server.pid)
    return figures


def merged_server_memory(specs: dict[str, str], texts: dict[str, list[str]], args) -> dict:
    """The same server and traffic, each run as a merged export (its own full model): no sharing."""
    with tempfile.TemporaryDirectory() as tmp:
        merged = {}
        for name, path in specs.items():
            merged[name] = str(Path(tmp) / name)
            subprocess.run([sys.executable, "-m", "lorafit", "export", path, "--format", "merged", "--out", merged[name]],
                           check=True, capture_output=True)
        server, port = start_server(merged, args.max_wait_ms, args.threads)
        try:
            return memory_phase(server, port, texts, args)
        finally:
            stop(server)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapters", nargs="+", metavar="NAME=RUN")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--max-requests", type=int, default=200_000)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--p99-bound-ms", type=float, default=500.0, help="the stated bound the p99 must stay under")
    parser.add_argument("--threads", type=int, help="the server's torch threads (default: all cores)")
    parser.add_argument("--memory-seconds", type=float, default=10.0, help="traffic before memory is read")
    parser.add_argument("--skip-memory", action="store_true", help="skip the merged-models comparison")
    parser.add_argument("--battery-rounds", type=int, default=3, help="times the malformed battery is sent, under load")
    args = parser.parse_args()

    specs = dict(parse_adapter_spec(s) for s in args.adapters)
    texts = {}
    for name, path in specs.items():
        run = RunDir(path)
        texts[name] = run_split(run, run.config(), "test").texts

    server, port = start_server(specs, args.max_wait_ms, args.threads)
    base = f"http://127.0.0.1:{port}"
    try:
        server_memory = memory_phase(server, port, texts, args)  # the merged server gets the same below
        result = asyncio.run(load(base, texts, args.concurrency, args.duration, args.max_requests))
        cases, traffic = battery_under_load(port, next(iter(specs)), texts, args)
        metrics = httpx.get(f"{base}/metrics").text
        alive = server.poll() is None
    finally:
        stop(server)
    not_4xx = [c for c in cases if not (isinstance(c["status"], int) and 400 <= c["status"] < 500)]
    merged = None if args.skip_memory else merged_server_memory(specs, texts, args)

    print(f"adapters: {', '.join(specs)} over one base; concurrency {args.concurrency}, {result['seconds']:.1f} s")
    print(f"requests {result['requests']}  RPS {result['rps']:.1f}  p50 {result['p50_ms']:.1f} ms  p90 {result['p90_ms']:.1f} ms  "
          f"p99 {result['p99_ms']:.1f} ms  max {result['max_ms']:.1f} ms  statuses {result['statuses']}")
    print(f"5xx or no answer: {result['server_errors']}; p99 bound {args.p99_bound_ms:.0f} ms: "
          f"{'met' if result['p99_ms'] < args.p99_bound_ms else 'MISSED'}")
    print(f"malformed battery: {len(cases)} cases ({args.battery_rounds} rounds, while {args.concurrency} clients sent "
          f"{traffic['requests']} predictions, 5xx or no answer {traffic['server_errors']}), {len(cases) - len(not_4xx)} answered 4xx"
          + (f"; NOT 4xx: {not_4xx}" if not_4xx else "") + f"; server alive after: {alive}")
    for c in cases[:len(cases) // max(1, args.battery_rounds)]:
        print(f"  {c['status']}  {c['case']}")
    batch_lines = [line for line in metrics.splitlines() if line.startswith("lorafit_batch_requests_") and "bucket" not in line]
    print("micro-batches: " + ", ".join(batch_lines))
    for name, m in (("adapters over one base", server_memory), ("merged models", merged)):
        if m:
            print(f"server with {len(specs)} {name}: weights {m['weights_mb']:.1f} MB; RSS after warm-up {m['warm']['VmRSS']:.0f} MB, "
                  f"after {args.memory_seconds:g} s of traffic {m['loaded']['VmRSS']:.0f} MB (peak {m['loaded']['VmHWM']:.0f} MB)")
    if merged:
        print(f"shared base / merged: weights {server_memory['weights_mb'] / merged['weights_mb']:.2f}x, "
              f"RSS after warm-up {server_memory['warm']['VmRSS'] / merged['warm']['VmRSS']:.2f}x, "
              f"after traffic {server_memory['loaded']['VmRSS'] / merged['loaded']['VmRSS']:.2f}x")
    summary = {
        "rps": round(result["rps"], 1), "p50_ms": round(result["p50_ms"], 2), "p99_ms": round(result["p99_ms"], 2),
        "requests": result["requests"], "server_errors": result["server_errors"], "p99_bound_ms": args.p99_bound_ms,
        "malformed_cases": len(cases), "malformed_not_4xx": len(not_4xx), "server_alive": alive,
        "server_weights_mb": server_memory["weights_mb"], "merged_weights_mb": merged["weights_mb"] if merged else None,
        "server_rss_warm_mb": round(server_memory["warm"]["VmRSS"]),
        "merged_rss_warm_mb": round(merged["warm"]["VmRSS"]) if merged else None,
    }
    print(json.dumps(summary))
    return 0 if not result["server_errors"] and not traffic["server_errors"] and not not_4xx and alive else 1


if __name__ == "__main__":
    raise SystemExit(main())
