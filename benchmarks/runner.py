"""Common benchmark runner: median timing with warm-up, device and versions, JSON and markdown out."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import torch


@dataclass
class Measurement:
    """One timed variant: median and spread (p10/p90, or min/max under 10 runs) of many runs, in ms."""

    name: str
    params: dict[str, Any]
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int
    extra: dict[str, Any] = field(default_factory=dict)


def environment() -> dict[str, str]:
    """Date, device and library versions to record next to every table."""
    env = {
        "date": date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = str(torch.version.cuda)
    else:
        env["device"] = f"CPU ({torch.get_num_threads()} threads)"
    for name in ("triton", "transformers"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            pass
    return env


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], Any], *, warmup: int = 3, runs: int = 20, min_seconds: float = 0.0) -> list[float]:
    """Wall times in ms of `fn()` after `warmup` calls; on CUDA timed with events."""
    for _ in range(warmup):
        fn()
    _sync()
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < runs or time.perf_counter() - start_all < min_seconds:
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def measure(name: str, fn: Callable[[], Any], params: dict[str, Any] | None = None, **kw: Any) -> Measurement:
    """Time `fn` and summarize as a Measurement."""
    times = sorted(time_fn(fn, **kw))
    if len(times) >= 10:
        q = statistics.quantiles(times, n=10)
        low, high = q[0], q[-1]
    else:
        low, high = times[0], times[-1]
    return Measurement(name, params or {}, statistics.median(times), low, high, len(times))


def kernel_breakdown(label: str, fn: Callable[[], Any], warmup: int = 3, top: int | None = None) -> list[str]:
    """GPU time per kernel of one call of `fn` (profiler; CUDA only), with the call's wall time and the number of
    kernels it launched: where a step's time goes beyond its kernels (launches, gaps). `top` keeps the longest."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3
    events = sorted((e for e in prof.key_averages() if e.device_type.name == "CUDA"),
                    key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in events) / 1e3
    launches = sum(e.count for e in events)
    lines = [f"breakdown {label}: wall {wall:.3f} ms (profiled), kernels {total:.3f} ms in {launches} launches"]
    for e in events[:top]:
        lines.append(f"    {e.self_device_time_total / 1e3:8.3f} ms  x{e.count}  {e.key[:90]}")
    return lines


def write_results(path: str | Path, title: str, rows: list[Measurement], env: dict[str, str] | None = None) -> str:
    """Write JSON next to `path` and return the markdown table (with the environment line)."""
    env = env or environment()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"title": title, "env": env, "rows": [asdict(r) for r in rows]}, indent=2))
    return markdown_table(title, rows, env)


def markdown_table(title: str, rows: list[Measurement], env: dict[str, str]) -> str:
    """A markdown section: title, environment line, one row per measurement."""
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r.params if k not in keys)
    extra: list[str] = []
    for r in rows:
        extra.extend(k for k in r.extra if k not in extra)
    head = ["variant", *keys, "median ms", "spread ms (p10–p90; min–max under 10 runs)", "runs", *extra]
    lines = [f"### {title}", "", "; ".join(f"{k} {v}" for k, v in env.items()), ""]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in rows:
        cells = [r.name, *[str(r.params.get(k, "")) for k in keys], f"{r.median_ms:.3f}",
                 f"{r.p10_ms:.3f}–{r.p90_ms:.3f}", str(r.runs), *[str(r.extra.get(k, "")) for k in extra]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
