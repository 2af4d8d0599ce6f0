"""Serving under load: `meshlm serve` against Hugging Face's own `transformers serve`
(continuous batching on), on the same weights, over loopback.

The model: a small llama (d_model 256, 4 layers, vocabulary 4096, random weights: the
figures are about serving, not text quality) written as a meshlm run and exported with
meshlm's HF export, so both servers load the very same tensors and tokenizer. Every client
streams one fixed prompt with greedy decoding and a fixed output length, sending its
requests one after another; 1, 8, 32 and 64 clients at once. Reported per level:
generated tokens/s over the level's wall time, time to first token and end-to-end latency
(p50 / p99), failed requests (an error status other than 429, a broken or unfinished
stream), rejected ones (429, past the server's queue bound) and lost ones (no answer by
the deadline).

Each round starts one server, warms it up, runs every level and stops it; rounds alternate
the order of the servers, and the table reports medians over rounds. Bounded: every request
has a timeout and every level a deadline. Needs `accelerate` for `transformers serve`
(`pip install accelerate`); without it only meshlm is measured.

    python benchmarks/serve_load.py [--clients 1 8 32 64] [--rounds 2] [--output-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the model


def prepare_model(workdir: Path) -> tuple[Path, Path]:
    """A meshlm run directory and its Hugging Face export (made once, then reused)."""
    import argparse as argparse_module
    import inspect
    import json as json_module
    import textwrap

    from meshlm.artifacts.weights_file import save_weights
    from meshlm.config import Config
    from meshlm.data.tokenizer import train_tokenizer
    from meshlm.interop.convert import export_hf
    from meshlm.model.registry import build_model
    from meshlm.model.transformer.config import TransformerConfig

    run, hf = workdir / "run", workdir / "hf"
    if (hf / "model.safetensors").is_file():
        return run, hf
    run.mkdir(parents=True, exist_ok=True)
    cfg = TransformerConfig(
        arch="llama", d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=4096, max_seq_len=512
    )
    save_weights(build_model(cfg, seed=0).state_dict(), cfg, run / "model.safetensors")
    (run / "config.toml").write_text(Config(model=cfg).to_toml())
    texts = [inspect.getsource(m) for m in (json_module.decoder, textwrap, argparse_module)]
    train_tokenizer(texts, cfg.vocab_size, run / "tokenizer.json")
    export_hf(run, hf, overwrite=True)
    return run, hf


def fixed_prompt(run: Path, n_tokens: int) -> str:
    """A text of about n_tokens tokens (a slice of real source code)."""
    import inspect
    import textwrap

    from meshlm.data.tokenizer import load_tokenizer

    tok = load_tokenizer(run / "tokenizer.json")
    ids = tok.encode(inspect.getsource(textwrap)).ids[:n_tokens]
    return tok.decode(ids)


# ----------------------------------------------------------------------------- servers


@dataclass
class ServerProcess:
    name: str
    cmd: list[str]
    model: str
    port: int
    env: dict = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log: Path, timeout: float = 600.0) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **self.env}
        self.log = open(log, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            self.cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {log}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.name} was not ready in {timeout:.0f} s; see {log}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the server and its workers
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


def servers(run: Path, hf: Path, args) -> list[ServerProcess]:
    threads = str(args.threads)
    meshlm = ServerProcess(
        "meshlm serve",
        [sys.executable, "-m", "meshlm", "serve", "--run", str(run), "--port", str(args.port)]
        + ["--max-batch", str(args.max_batch), "--max-queued", "512", "--threads", threads],
        model=run.name,
        port=args.port,
        env={"OMP_NUM_THREADS": threads},
    )
    out = [meshlm]
    try:
        import accelerate  # noqa: F401  (transformers serve needs it to load a model)

        out.append(
            ServerProcess(
                "transformers serve (continuous batching)",
                [str(Path(sys.executable).parent / "transformers"), "serve", str(hf)]
                + ["--continuous-batching", "--device", "cpu", "--port", str(args.port + 1), "--host", "127.0.0.1"],
                model=str(hf),
                port=args.port + 1,
                env={"OMP_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
            )
        )
    except ImportError:
        print("accelerate is not installed: measuring meshlm only", file=sys.stderr)
    return out


# ----------------------------------------------------------------------------- load


@dataclass
class Result:
    ok: bool = False
    status: int = 0
    tokens: int = 0
    ttft: float | None = None
    e2e: float | None = None
    error: str = ""


async def one_request(client: httpx.AsyncClient, server: ServerProcess, prompt: str, n_out: int) -> Result:
    body = {
        "model": server.model,
        "prompt": prompt,
        "max_tokens": n_out,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = Result()
    started = time.perf_counter()
    try:
        async with client.stream("POST", server.url + "/v1/completions", json=body) as resp:
            r.status = resp.status_code
            if resp.status_code != 200:
                await resp.aread()
                r.error = f"HTTP {resp.status_code}"
                return r
            chunks, usage, finished = 0, None, False
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                obj = json.loads(line[6:])
                if "error" in obj:
                    r.error = obj["error"].get("message", "error")
                    return r
                for choice in obj.get("choices") or []:
                    if choice.get("text"):
                        chunks += 1
                        if r.ttft is None:
                            r.ttft = time.perf_counter() - started
                    finished |= choice.get("finish_reason") is not None
                usage = obj.get("usage") or usage
            r.e2e = time.perf_counter() - started
            r.tokens = usage["completion_tokens"] if usage else chunks
            r.ok = finished
            if not finished:
                r.error = "stream ended without a finish_reason"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        r.error = f"{type(e).__name__}: {e}"
    return r


async def run_level(server: ServerProcess, prompt: str, clients: int, per_client: int, n_out: int, deadline_s: float):
    # Idle connections expire on the client before uvicorn's keep-alive timeout (5 s by default,
    # transformers serve's too) closes them: no request is ever sent on a connection being closed.
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4, keepalive_expiry=2.0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(deadline_s), limits=limits) as client:

        async def client_loop():
            return [await one_request(client, server, prompt, n_out) for _ in range(per_client)]

        started = time.perf_counter()
        tasks = [asyncio.ensure_future(client_loop()) for _ in range(clients)]
        done, pending = await asyncio.wait(tasks, timeout=deadline_s)
        for t in pending:
            t.cancel()
        wall = time.perf_counter() - started
    results = [r for t in done for r in t.result()]
    lost = clients * per_client - len(results)
    return results, lost, wall


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def summarize(results: list[Result], lost: int, wall: float, n_out: int) -> dict:
    ok = [r for r in results if r.ok]
    return {
        "requests": len(results) + lost,
        "tokens_per_s": sum(r.tokens for r in ok) / wall,
        "ttft_p50": pct([r.ttft for r in ok if r.ttft is not None], 50),
        "ttft_p99": pct([r.ttft for r in ok if r.ttft is not None], 99),
        "e2e_p50": pct([r.e2e for r in ok], 50),
        "e2e_p99": pct([r.e2e for r in ok], 99),
        "failed": sum(1 for r in results if not r.ok and r.status != 429),
        "rejected": sum(1 for r in results if r.status == 429),
        "lost": lost,
        "short": sum(1 for r in ok if r.tokens != n_out),  # finished early (an end-of-text token)
        "errors": sorted({r.error for r in results if r.error})[:3],
    }


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=64, help="meshlm's slots per replica")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per server (OMP_NUM_THREADS)")
    ap.add_argument("--deadline", type=float, default=600.0, help="seconds per level")
    ap.add_argument("--port", type=int, default=18400)
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "serve-bench")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    ap.add_argument("--only", choices=["meshlm", "transformers"], default=None)
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT / "src"))
    run, hf = prepare_model(args.workdir)
    prompt = fixed_prompt(run, args.prompt_tokens)
    procs = servers(run, hf, args)
    if args.only:
        procs = [p for p in procs if p.name.startswith(args.only)]
    figures: dict[str, dict[int, list[dict]]] = {p.name: {c: [] for c in args.clients} for p in procs}
    for rnd in range(args.rounds):
        order = procs if rnd % 2 == 0 else procs[::-1]
        for server in order:
            print(f"round {rnd + 1}: {server.name}", file=sys.stderr, flush=True)
            try:
                server.start(args.workdir / f"{server.name.split()[0]}.log")
                # warm-up: first requests compile / allocate on either side
                asyncio.run(run_level(server, prompt, 4, 1, args.output_tokens, args.deadline))
                for clients in args.clients:
                    results, lost, wall = asyncio.run(
                        run_level(server, prompt, clients, args.requests_per_client, args.output_tokens, args.deadline)
                    )
                    s = summarize(results, lost, wall, args.output_tokens)
                    figures[server.name][clients].append(s)
                    print(f"  {clients:3d} clients: {json.dumps(s)}", file=sys.stderr, flush=True)
            finally:
                server.stop()

    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"prompt {args.prompt_tokens} tokens, output {args.output_tokens} tokens, "
        f"{args.requests_per_client} requests per client, {args.threads} torch thread(s) per server, "
        f"medians of {args.rounds} round(s)\n"
    )
    print(
        "| server | clients | tokens/s | TTFT p50 (s) | TTFT p99 (s) | e2e p50 (s) | e2e p99 (s) | failed | 429 | lost |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    medians: dict[str, dict[int, dict]] = {}
    for name, levels in figures.items():
        for clients, runs in levels.items():
            if not runs:
                continue
            m = {
                k: statistics.median(r[k] for r in runs)
                for k in ("tokens_per_s", "ttft_p50", "ttft_p99", "e2e_p50", "e2e_p99")
            }
            m.update({k: sum(r[k] for r in runs) for k in ("failed", "rejected", "lost", "short")})
            medians.setdefault(name, {})[clients] = m
            print(
                f"| {name} | {clients} | {m['tokens_per_s']:.0f} | {m['ttft_p50']:.3f} | {m['ttft_p99']:.3f} | "
                f"{m['e2e_p50']:.2f} | {m['e2e_p99']:.2f} | {m['failed']} | {m['rejected']} | {m['lost']} |"
            )
    if len(medians) == 2:
        a, b = medians.values()
        print("\n| clients | throughput ratio (meshlm / transformers) | TTFT p99 ratio (transformers / meshlm) |")
        print("|---:|---:|---:|")
        for clients in args.clients:
            if clients in a and clients in b:
                print(
                    f"| {clients} | {a[clients]['tokens_per_s'] / b[clients]['tokens_per_s']:.2f}x | "
                    f"{b[clients]['ttft_p99'] / a[clients]['ttft_p99']:.2f}x |"
                )
    if args.json:
        args.json.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rounds": figures}, indent=1)
        )


if __name__ == "__main__":
    main()
