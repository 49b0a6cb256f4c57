"""GPU benchmark of MaMe: where the time goes, and what merging saves, on one lent GPU.

Sections, in this order (each one written to ``OUT/gpu.json`` and ``OUT/gpu.md`` as soon as
it ends, so that a crash or the time limit loses only the section that was running):

1. **operator**: ``plan_merge`` + ``merge`` alone, and one diffusers self-attention (C = 320,
   5 heads) stock vs ``MaMeProcessor()``, at N = 4096, 9216 and 16384 tokens: ms per call and
   CUDA kernels per call.
2. **eager UNet**: SD 2.1 at 512, 768, 1024 and 2048 (batch 2), 1024 at batch 8, SDXL at 1024;
   stock vs MaMe (defaults, ``query_share=1``, any ``--mame-variant``) vs tomesd 0.5 and 0.75.
   One patched copy of the same seeded model per method, called round by round; median /
   min / max ms, peak memory, and the error of the noise prediction against stock. At 512,
   768, 1024 and on SDXL, one profiled forward of stock, of MaMe defaults and of MaMe with the
   Triton kernels: kernels per forward and attention's share of GPU time (the **profiler**
   table). Where triton runs (a GPU), every UNet table has a column for MaMe with
   ``backend="triton"``, merging every call, and the operator section times the kernels.
3. **CUDA graphs**: SD 2.1 at 1024, 768 and 512 and SDXL at 1024 (batch 2), each method's copy
   recorded once into a CUDA graph and replayed: the GPU time without launch overhead, which
   is what CUDA graphs give a pipeline, and where merging small attention may pay. Adds MaMe
   merging every call (``min_latent_tokens=0``) to the methods.
4. **compiled**: ``torch.compile`` of the SD 2.1 UNet at 768 (``--compile-model``, ``--compile-resolution``),
   MaMe (defaults, or ``--compile-mame``'s settings) then stock: compile time, ms, speed-ups
   over eager and compiled stock; then ``plan_merge`` + ``merge`` compiled; whether changing
   MaMe's ratio on the compiled model works; and ``mode="reduce-overhead"`` (these last two
   rarely fit the default budget).

Random weights from the shipped configs (the architecture sets the speed), float16 on CUDA.
Every section has an estimated cost; one is skipped, and listed as skipped, when less of the
``--budget`` is left than it needs, and an alarm stops the run at the budget's end whatever
is running, so that ``benchmarks/gpu.sh`` finishes inside its hard limit. A section that
raises is recorded with its error and the run goes on.

Run through ``bash benchmarks/gpu.sh OUT_DIR`` (installs nothing). ``--quick`` maps every
section to tiny models, to check the script itself on any machine.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # the budget counts from here: the imports below take seconds

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass, field, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402

from mame_diffusers import MaMeConfig, MaMeProcessor, apply_mame, kernels, merge_layout, plan_merge  # noqa: E402
from mame_diffusers.benchmarking.profiling import profile_call  # noqa: E402
from mame_diffusers.benchmarking.report import environment, markdown_table, package_version, write_report  # noqa: E402
from mame_diffusers.benchmarking.timing import synchronize  # noqa: E402
from mame_diffusers.benchmarking.unet import (  # noqa: E402
    Method,
    baseline,
    call_like_a_pipeline,
    compare_unet_copies,
    mame,
    patched_copies,
    tomesd_method,
)
from mame_diffusers.offline import build_unet, unet_inputs  # noqa: E402

#: Default ``--budget`` (seconds from the start of the process). gpu.sh's hard stop is 350 s
#: and the lent machine's limit 6 minutes: the alarm at the budget's end plus a few seconds
#: to write the report still ends inside both.
DEFAULT_BUDGET = 330.0
QUICK_BUDGET = 150.0
#: Seconds after the budget at which the alarm stops whatever is running.
ALARM_GRACE = 12

STOCK = "stock"
MAME_DEFAULTS = "MaMe defaults"


class SectionSkipped(Exception):
    """A section that cannot run here (no CUDA, a section it needs did not run)."""


class BudgetExceeded(BaseException):
    """Raised by the alarm (or SIGTERM) at the end of the budget. A BaseException, so that
    the ``except Exception`` blocks that keep a failing method from stopping a section do
    not swallow it."""


# -- what to run ------------------------------------------------------------------------------


@dataclass(frozen=True)
class UNetSetting:
    """One eager whole-UNet section."""

    model: str  # a name of mame_diffusers.offline.UNET_CONFIGS
    resolution: int  # pixels; latents are resolution / 8 on a side
    batch: int
    warmup: int
    repeats: int
    per_call: float  # estimated seconds of one UNet call on an H200 (methods averaged)
    profile: bool = False

    @property
    def label(self) -> str:
        names = {"sd21": "SD 2.1", "sdxl": "SDXL"}
        return f"{names.get(self.model, self.model)} {self.resolution} b{self.batch}"

    @property
    def sdxl(self) -> bool:
        return "sdxl" in self.model


def eager_settings(quick: bool) -> list[UNetSetting]:
    """The eager sections, in the order they run (the later, the likelier to be skipped)."""
    if quick:  # tiny models standing in for each setting, seconds each on a CPU
        return [
            UNetSetting("tiny-sd", 64, 2, 1, 2, 0.05, profile=True),
            UNetSetting("tiny-sd", 128, 2, 1, 2, 0.1, profile=True),
            UNetSetting("tiny-sd", 256, 2, 1, 2, 0.3, profile=True),
            UNetSetting("tiny-sd", 384, 2, 1, 2, 0.8),
            UNetSetting("tiny-sd", 128, 8, 1, 2, 0.3),
            UNetSetting("tiny-sdxl", 256, 2, 1, 2, 0.3, profile=True),
        ]
    # Per-call estimates: H100/H200-class fp16 eager times, tomesd's and MaMe's overheads in.
    return [
        UNetSetting("sd21", 512, 2, 3, 10, 0.04, profile=True),
        UNetSetting("sd21", 768, 2, 3, 10, 0.07, profile=True),
        UNetSetting("sd21", 1024, 2, 3, 10, 0.14, profile=True),
        UNetSetting("sd21", 2048, 2, 2, 6, 0.5),
        UNetSetting("sd21", 1024, 8, 2, 6, 0.5),
        UNetSetting("sdxl", 1024, 2, 3, 10, 0.18, profile=True),
    ]


def graph_settings(quick: bool) -> list[UNetSetting]:
    """The CUDA-graph sections: the batch-2 sizes that eager launches leave unmerged by default."""
    if quick:
        return [UNetSetting("tiny-sd", 128, 2, 1, 2, 0.05), UNetSetting("tiny-sdxl", 256, 2, 1, 2, 0.1)]
    # Per-call estimates: replays cost the GPU time only (about half the eager call).
    return [
        UNetSetting("sd21", 1024, 2, 3, 12, 0.05),
        UNetSetting("sd21", 768, 2, 3, 12, 0.03),
        UNetSetting("sdxl", 1024, 2, 3, 12, 0.08),
        UNetSetting("sd21", 512, 2, 3, 12, 0.02),
    ]


def parse_value(text: str) -> Any:
    """``'4096'`` -> 4096, ``'0.9'`` -> 0.9, ``'None'``/``'True'``/``'False'``, else the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"none": None, "true": True, "false": False}.get(text.lower(), text)


def parse_variant(text: str) -> dict[str, Any]:
    """``'min_latent_tokens=0'`` or ``'ratio=0.9,query_share=1'`` -> settings for apply_mame."""
    settings = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"--mame-variant takes key=value[,key=value], got {text!r}")
        settings[key.strip()] = parse_value(value.strip())
    return settings


def named(method: Method, name: str) -> Method:
    return replace(method, name=name)


def unet_methods(variants: list[dict[str, Any]], sdxl: bool) -> tuple[list[Method], list[str]]:
    """Stock first (the reference), MaMe, tomesd, then the command line's MaMe variants;
    and notes on what is missing."""
    methods = [
        named(baseline(), STOCK),
        named(mame(), MAME_DEFAULTS),
        named(mame(query_share=1.0), "MaMe query_share=1"),
    ]
    peers, notes = tomesd_peers(sdxl)
    return methods + triton_methods() + peers + variant_methods(variants), notes


MAME_EVERY_CALL = "MaMe merging every call"
MAME_TRITON = "MaMe triton, merging every call"


def triton_runs() -> bool:
    """Whether ``backend="triton"`` is timed here: triton importable, and a GPU. (Triton's
    interpreter runs the kernels on a CPU, but far too slowly to time; the tests check them.)"""
    return kernels.available() and torch.cuda.is_available()


def triton_methods() -> list[Method]:
    """MaMe's defaults with the Triton kernels, merging every call (the eager defaults
    leave batch-2 calls up to 1024 unmerged on CUDA), where they can run."""
    return [named(mame(backend="triton", min_latent_tokens=0), MAME_TRITON)] if triton_runs() else []


def graph_methods(variants: list[dict[str, Any]], sdxl: bool) -> tuple[list[Method], list[str]]:
    """The eager methods plus MaMe with ``min_latent_tokens=0`` (the defaults leave batch-2
    calls up to 1024 unmerged on CUDA: recorded, launches cost nothing, and merging may pay).
    tomesd draws its destination tokens with its own CUDA generator, which a graph cannot
    record: it runs with ``use_rand=False`` here."""
    methods = [named(baseline(), STOCK), named(mame(), MAME_DEFAULTS)]
    methods.append(named(mame(min_latent_tokens=0), MAME_EVERY_CALL))
    methods.append(named(mame(min_latent_tokens=0, query_share=1.0), f"{MAME_EVERY_CALL}, query_share=1"))
    methods += triton_methods()
    peers, notes = tomesd_peers(sdxl, use_rand=False)
    notes.append("CUDA graphs: tomesd runs with use_rand=False (a graph cannot record its own generator's draws)")
    return methods + peers + variant_methods(variants), notes


def tomesd_peers(sdxl: bool, **settings: Any) -> tuple[list[Method], list[str]]:
    """tomesd at ratios 0.5 and 0.75 (with ``settings``), and notes on what is missing."""
    peers = []
    for ratio in (0.5, 0.75):
        # tomesd's defaults merge nothing on SDXL (no attention at full resolution): give it
        # the level that has attention, so that the comparison means something.
        peer = tomesd_method(ratio, **({"max_downsample": 2} if sdxl else {}), **settings)
        if peer is not None:
            peers.append(named(peer, f"tomesd {ratio}"))
    if not peers:
        return peers, ["tomesd is not importable here: its columns are missing from the UNet tables"]
    if sdxl:
        return peers, ["tomesd on SDXL runs with max_downsample=2 (its default merges nothing there)"]
    return peers, []


def variant_methods(variants: list[dict[str, Any]]) -> list[Method]:
    """The command line's ``--mame-variant`` settings, one MaMe method each."""
    methods = []
    for settings in variants:
        label = ", ".join(f"{k}={v}" for k, v in settings.items())
        methods.append(named(mame(**settings), f"MaMe {label}"))
    return methods


class GraphedUNet(torch.nn.Module):
    """One UNet call on fixed inputs, recorded into a CUDA graph and replayed: the call's GPU
    time with no launch overhead (what CUDA graphs give a pipeline). Off CUDA it calls the
    model eagerly, which checks the script only."""

    def __init__(self, model: torch.nn.Module, inputs: dict[str, Any], warmup: int = 2) -> None:
        super().__init__()
        self.model = model
        self.inputs = inputs
        self.graph = None
        if next(model.parameters()).device.type != "cuda":
            return
        # Warm-up on a side stream (caches, cuDNN/cuBLAS choices), as torch.cuda.graphs asks.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(stream):
            for _ in range(warmup):
                call_like_a_pipeline(model, inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph):
            self.output = call_like_a_pipeline(model, inputs)

    def forward(self) -> torch.Tensor:
        if self.graph is None:
            return call_like_a_pipeline(self.model, self.inputs)
        self.graph.replay()
        return self.output


# -- the report -------------------------------------------------------------------------------


@dataclass
class Report:
    """Everything measured so far; written whole after every section."""

    out: Path
    payload: dict[str, Any]
    sections: list[dict[str, Any]] = field(default_factory=list)

    def write(self) -> None:
        self.payload["sections"] = self.sections
        self.payload["seconds_total"] = time.perf_counter() - self.payload["_started"]
        payload = {k: v for k, v in self.payload.items() if not k.startswith("_")}
        write_report(self.out / "gpu", payload, self.markdown(), header=False)

    # The tables, built from the raw rows each time.

    def eager_summary(self, key: str = "eager") -> str:
        rows, methods = [], self._eager_methods(key)
        for label, group in self._eager_groups(key).items():
            row: dict[str, Any] = {"setting": label}
            stock = group.get(STOCK, {})
            row["stock ms"] = _ms(stock.get("seconds"))
            for name in methods:
                entry = group.get(name)
                if entry is None:
                    row[name] = None
                elif "failed" in entry:
                    row[name] = "failed: " + entry["failed"].split(":")[0]
                elif entry.get("speedup") is None:
                    row[name] = None
                else:
                    row[name] = _speedup_cell(entry)
            rows.append(row)
        return markdown_table(rows, ["setting", "stock ms", *methods], {"stock ms": ".1f"}) if rows else ""

    def eager_details(self) -> str:
        rows = []
        for row in self.payload["eager"]:
            rows.append(
                {
                    "setting": row["setting"],
                    "method": row["method"],
                    "min ms": _ms(row.get("min_seconds")),
                    "median ms": _ms(row.get("seconds")),
                    "max ms": _ms(row.get("max_seconds")),
                    "peak MiB": row.get("peak_mib"),
                    "activations MiB": row.get("activation_mib"),
                    "error": row.get("error"),
                    "failed": row.get("failed"),
                }
            )
        columns = ["setting", "method", "min ms", "median ms", "max ms", "peak MiB", "activations MiB", "error"]
        if any(r["failed"] for r in rows):
            columns.append("failed")
        formats = {"min ms": ".1f", "median ms": ".1f", "max ms": ".1f", "error": ".4f"}
        formats.update({"peak MiB": ".0f", "activations MiB": ".0f"})
        return markdown_table(rows, columns, formats) if rows else ""

    def operator_table(self) -> str:
        columns = [
            "N", "plan+merge ms", "plan+merge kernels", "M_kv",
            "stock attn ms", "MaMe attn ms", "MaMe/stock", "MaMe merged", "kernels stock", "kernels MaMe",
            "forced-merge attn ms", "kernels forced",
            "triton plan+merge ms", "triton plan+merge kernels", "triton attn ms", "kernels triton attn",
        ]
        timed = ("plan+merge ms", "stock attn ms", "MaMe attn ms", "forced-merge attn ms", "triton plan+merge ms")
        formats = {c: ".3f" for c in (*timed, "triton attn ms")}
        formats["MaMe/stock"] = ".2f"
        return markdown_table(self.payload["operator"], columns, formats) if self.payload["operator"] else ""

    def profiler_table(self) -> str:
        rows = [
            {
                "setting": r["setting"],
                "method": r["method"],
                "kernels": r.get("kernels"),
                "GPU kernel ms": r.get("kernel_ms"),
                "attention ms": r.get("attention_ms"),
                "attention share": r.get("attention_share"),
                "profiled wall ms": r.get("wall_ms"),
                "failed": r.get("failed"),
            }
            for r in self.payload["profiler"]
        ]
        columns = ["setting", "method", "kernels", "GPU kernel ms", "attention ms", "attention share"]
        columns.append("profiled wall ms")
        if any(r["failed"] for r in rows):
            columns.append("failed")
        formats = {"GPU kernel ms": ".1f", "attention ms": ".1f", "attention share": ".1%", "profiled wall ms": ".1f"}
        return markdown_table(rows, columns, formats) if rows else ""

    def compiled_table(self) -> str:
        columns = ["method", "mode", "compile s", "median ms", "min ms", "x vs eager stock", "x vs compiled stock"]
        columns += ["error vs eager stock", "failed"]
        rows = self.payload["compiled"]["rows"]
        if not any(r.get("failed") for r in rows):
            columns.remove("failed")
        formats = {"compile s": ".1f", "median ms": ".1f", "min ms": ".1f", "error vs eager stock": ".4f"}
        formats.update({"x vs eager stock": ".2f", "x vs compiled stock": ".2f"})
        return markdown_table(rows, columns, formats) if rows else ""

    def sections_table(self) -> str:
        formats = {"seconds": ".1f", "estimate s": ".0f", "started at s": ".0f"}
        columns = ["section", "status", "started at s", "seconds", "estimate s", "note"]
        return markdown_table(self.sections, columns, formats)

    def header(self) -> str:
        env = self.payload["environment"]
        setup = self.payload["setup"]
        packages = ("torch", "diffusers", "transformers", "tomesd")
        versions = ", ".join(f"{p} {env.get(p) or 'not installed'}" for p in packages)
        return "\n".join(
            [
                "# MaMe GPU benchmark",
                "",
                f"- device: {env['device']} ({setup['device']})",
                f"- {versions}; dtype {env.get('dtype')}; CUDA {torch.version.cuda}",
                f"- date: {setup['date']}; budget {setup['budget']:.0f} s; "
                f"total {self.payload.get('seconds_total', 0):.0f} s",
                f"- latents: {setup['latents']}; random weights from the shipped configs",
                f"- MaMe defaults: {setup['mame_defaults']}",
                f"- command: `{env.get('command')}`",
            ]
        )

    def markdown(self) -> str:
        parts = [self.header(), "", "## Sections", "", self.sections_table()]
        compiled = self.payload["compiled"]
        blocks = [
            ("## 1. Operator: plan + merge, and one self-attention (C = 320, 5 heads, batch 2, random tokens)",
             "ms per call (median); kernels per call (one profiled call). `MaMe` is `MaMeProcessor()` with "
             "its defaults (which may leave small attention unmerged on a GPU: `MaMe merged`); `forced-merge` "
             "is the same with `min_latent_tokens=0`, `triton` with `backend=\"triton\"` too (the fused kernels). "
             "M_kv: tokens keys and values merge to.",
             self.operator_table()),
            ("## 2. Eager UNet: speed-up over stock (relative error of the noise prediction vs stock)",
             "One patched copy per method, called round by round; median of the timed rounds.", self.eager_summary()),
            ("### Eager UNet: times and memory",
             "peak MiB: one model's weights plus the peak above what was allocated before the call (the other copies "
             "excluded); activations MiB: that peak alone.", self.eager_details()),
            ("## 3. Profiler: one UNet forward",
             "kernels: CUDA kernels launched by one forward (copies and memsets not counted); attention: kernels whose "
             "names look like attention (flash, fmha, sdpa, attention, softmax...; names in gpu.json).",
             self.profiler_table()),
            ("## 4. CUDA graphs: each eager UNet call recorded once and replayed (speed-up over replayed stock, "
             "error vs eager stock)",
             "No launch overhead: the GPU time a pipeline gets with CUDA graphs. One recorded copy per method, "
             "replayed round by round; median of the timed rounds.", self.eager_summary("graphs")),
            (f"## 5. torch.compile ({compiled.get('setting') or 'SD 2.1 768 b2'})",
             "compile s: the first call, compiling and running (reduce-overhead: the first three, which record "
             "the CUDA graphs). Speed-ups against eager and compiled stock timed in the same rounds.",
             self.compiled_table()),
        ]
        for title, caption, table in blocks:
            if table:
                parts += ["", title, "", caption, "", table]
        checks = [f"- {k}: {v}" for k, v in compiled.get("checks", {}).items()]
        if checks:
            parts += ["", "### Compiled checks", "", *checks]
        if self.payload["notes"]:
            parts += ["", "## Notes", "", *[f"- {n}" for n in dict.fromkeys(self.payload["notes"])]]
        return "\n".join(parts)

    def stdout_summary(self) -> str:
        """The main tables, compactly, for the end of the log."""
        parts = [self.header(), "", self.sections_table()]
        for title, table in (
            ("operator", self.operator_table()),
            ("eager UNet: speed-up (error)", self.eager_summary()),
            ("CUDA graphs: speed-up (error)", self.eager_summary("graphs")),
            ("profiler", self.profiler_table()),
            ("compiled", self.compiled_table()),
        ):
            if table:
                parts += ["", f"## {title}", table]
        checks = [f"- {k}: {v}" for k, v in self.payload["compiled"].get("checks", {}).items()]
        notes = [f"- {n}" for n in dict.fromkeys(self.payload["notes"])]
        return "\n".join(parts + ([""] + checks if checks else []) + ([""] + notes if notes else []))

    def _eager_groups(self, key: str = "eager") -> dict[str, dict[str, dict[str, Any]]]:
        groups: dict[str, dict[str, dict[str, Any]]] = {}
        for row in self.payload[key]:
            groups.setdefault(row["setting"], {})[row["method"]] = row
        return groups

    def _eager_methods(self, key: str = "eager") -> list[str]:
        names = [row["method"] for row in self.payload[key] if row["method"] != STOCK]
        return list(dict.fromkeys(names))


def _speedup_cell(row: dict[str, Any]) -> str:
    """``1.42x (0.0213)``: speed-up over stock, and the error against stock."""
    error = "?" if row.get("error") is None else f"{row['error']:.4f}"
    return f"{row['speedup']:.2f}x ({error})"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1e3 * seconds


def _describe(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__


# -- the benchmark ----------------------------------------------------------------------------


class Benchmark:
    """The sections, the models they share, and the budget."""

    def __init__(self, args: argparse.Namespace, started: float) -> None:
        self.args = args
        self.started = started
        self.device = torch.device(args.device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.quick = args.quick
        self.budget = args.budget if args.budget is not None else (QUICK_BUDGET if args.quick else DEFAULT_BUDGET)
        self.variants = args.mame_variant
        label = ", ".join(f"{k}={v}" for k, v in args.compile_mame.items())
        #: The MaMe method of the compiled sections: the defaults, or --compile-mame's settings.
        self.compiled_mame = f"MaMe {label}" if label else MAME_DEFAULTS
        self._pool: tuple[str, dict[str, torch.nn.Module], dict[str, str]] | None = None
        self._latents_kind: set[str] = set()
        self._compile: dict[str, Any] = {}
        env = environment(self.device, self.dtype)
        env["tomesd"] = package_version("tomesd")
        config = MaMeConfig()
        self.report = Report(
            Path(args.out),
            {
                "_started": started,
                "environment": env,
                "setup": {
                    "device": str(self.device),
                    "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                    "budget": self.budget,
                    "quick": self.quick,
                    "latents": "not yet drawn",
                    "mame_defaults": repr(config),
                    "mame_kv_ratio": config.kv_ratio,
                    "mame_variants": self.variants,
                    "compile_backend": args.compile_backend,
                },
                "operator": [],
                "eager": [],
                "profiler": [],
                "graphs": [],
                "compiled": {"setting": None, "rows": [], "checks": {}},
                "notes": [],
            },
        )
        if self.device.type != "cuda":
            self.note("not on CUDA: no memory figures, and the profiler's 'kernels' count the outermost aten ops")

    # Time.

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def remaining(self) -> float:
        return self.budget - self.elapsed()

    def log(self, message: str) -> None:
        print(f"[{self.elapsed():5.0f}s] {message}", flush=True)

    def note(self, text: str) -> None:
        if text not in self.report.payload["notes"]:
            self.report.payload["notes"].append(text)

    def free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # Inputs and models.

    def latents(self, hw: tuple[int, int], batch: int) -> torch.Tensor:
        """Photo latents when scikit-image is importable (merging sees real image statistics),
        else seeded noise (the same cost)."""
        try:
            from mame_diffusers.benchmarking.photos import photo_latent_batch

            latents = photo_latent_batch(hw, batch)
            self._latents_kind.add("photo (scikit-image photographs, fixed projection)")
        except ImportError:
            generator = torch.Generator().manual_seed(0)
            latents = torch.randn(batch, 4, *hw, generator=generator)
            self._latents_kind.add("seeded noise (scikit-image not importable)")
        self.report.payload["setup"]["latents"] = " and ".join(sorted(self._latents_kind))
        return latents

    def build(self, name: str) -> torch.nn.Module:
        return build_unet(name, dtype=self.dtype, device=self.device)

    def copies(self, setting: UNetSetting) -> tuple[dict[str, torch.nn.Module], dict[str, str]]:
        """One patched copy per method of ``setting.model``'s architecture, kept for every
        section of that architecture (built and patched once, not once per resolution)."""
        if self._pool is not None and self._pool[0] == setting.model:
            return self._pool[1], self._pool[2]
        self._pool = None
        self.free()
        methods, notes = unet_methods(self.variants, setting.sdxl)
        for text in notes:
            self.note(text)
        base = self.build(setting.model)
        models, errors = patched_copies(base, methods)
        del base
        self._pool = (setting.model, models, errors)
        return models, errors

    def release_copies(self) -> None:
        self._pool = None
        self.free()

    # Sections.

    def plan(self) -> list[tuple[str, float, Callable[[], None]]]:
        """``(name, estimated seconds, run)`` of every section, in order."""
        quick = self.quick
        n_methods = len(unet_methods(self.variants, False)[0])
        sections: list[tuple[str, float, Callable[[], None]]] = [("operator", 25 if quick else 15, self.operator)]
        previous = None
        for setting in eager_settings(quick):
            calls = (setting.warmup + setting.repeats) * n_methods
            # Building the architecture and its copies (the first section of each model
            # pays it); the profiled forwards (slow ones: profiling adds a lot per kernel).
            build = (5 if quick else (20 if setting.sdxl else 10)) if setting.model != previous else 2
            profiled = 3 if triton_runs() else 2  # stock, MaMe defaults, MaMe triton
            profile = (1.5 if quick else 3) * profiled if setting.profile else 0
            estimate = build + calls * setting.per_call + profile
            sections.append((f"eager {setting.label}", estimate, lambda s=setting: self.eager(s)))
            previous = setting.model
        # torch.compile: minutes, for one model. MaMe first: a compiled MaMe alone, against
        # eager stock, says more than a compiled stock alone.
        # On a CPU (--quick), inductor takes minutes even for the tiny UNet; other backends
        # (aot_eager, to check this script) take seconds.
        if not quick:
            compile_estimates = {"mame": 130, "stock": 75, "operator": 40, "ratio": 120, "ro": 180}
        elif self.args.compile_backend == "inductor":
            compile_estimates = {"mame": 200, "stock": 150, "operator": 60, "ratio": 200, "ro": 300}
        else:
            compile_estimates = {"mame": 20, "stock": 15, "operator": 5, "ratio": 15, "ro": 20}
        previous = None
        for setting in graph_settings(quick):
            calls = (setting.warmup + setting.repeats + 3) * len(graph_methods(self.variants, setting.sdxl)[0])
            build = (5 if quick else (25 if setting.sdxl else 12))
            estimate = build + calls * setting.per_call
            sections.append((f"graphs {setting.label}", estimate, lambda s=setting: self.graphs(s)))
        sections += [
            ("compiled MaMe", compile_estimates["mame"], lambda: self.compiled(self.compiled_mame)),
            ("compiled stock", compile_estimates["stock"], lambda: self.compiled(STOCK)),
            ("operator compiled", compile_estimates["operator"], self.operator_compiled),
            ("compiled ratio change", compile_estimates["ratio"], self.ratio_change),
            ("compiled reduce-overhead", compile_estimates["ro"], self.reduce_overhead),
        ]
        return sections

    def run(self) -> bool:
        """Run every section that the selection and the budget allow; ``True`` when the alarm
        stopped the run."""
        selected = [s.strip() for s in self.args.only.split(",")] if self.args.only else None
        plan = self.plan()
        stopped = False
        for name, estimate, run in plan:
            entry: dict[str, Any] = {"section": name, "estimate s": estimate}
            self.report.sections.append(entry)
            if selected is not None and not any(s and s in name for s in selected):
                entry.update(status="not selected", note="--only")
                continue
            if stopped:
                entry.update(status="skipped", note="the alarm stopped the run")
                continue
            if self.remaining() < estimate:
                note = f"budget: {max(self.remaining(), 0):.0f} s left, needs ~{estimate:.0f} s"
                entry.update(status="skipped", note=note)
                self.log(f"skip {name}: {entry['note']}")
                continue
            entry["started at s"] = self.elapsed()
            self.log(f"{name} (estimate {estimate:.0f} s)")
            start = time.perf_counter()
            try:
                run()
                entry["status"] = "ok"
            except SectionSkipped as reason:
                entry.update(status="skipped", note=str(reason))
                self.log(f"skip {name}: {reason}")
            except BudgetExceeded:
                entry.update(status="stopped", note="the time budget ran out while it ran")
                stopped = True
                self._pool = None
                self._compile = {}
            except Exception as error:  # recorded; the next section still runs
                entry.update(status="error", note=_describe(error), traceback=traceback.format_exc(limit=-12))
                self.log(f"{name} failed: {_describe(error)}")
            entry["seconds"] = time.perf_counter() - start
            self.free()
            self.report.write()
        self.release_copies()
        self._compile = {}
        self.report.write()
        return stopped

    # 1. The operator.

    def operator(self) -> None:
        sizes = (256, 576, 1024) if self.quick else (4096, 9216, 16384)
        calls, samples = (3, 3) if self.quick else (20, 7)
        config = MaMeConfig()
        ratio = config.kv_ratio
        # The first profiling session of a process sets the profiler up (CUPTI on CUDA):
        # let that happen on a throwaway call, not on the first one measured.
        profile_call(lambda: torch.ones(8, device=self.device).add_(1), self.device)
        torch.manual_seed(0)
        stock_attn = _self_attention().to(self.device, self.dtype)
        for tokens in sizes:
            side = math.isqrt(tokens)
            hw = (side, side)
            x = torch.randn(2, tokens, 320, device=self.device, dtype=self.dtype)
            row: dict[str, Any] = {"N": tokens, "grid": f"{side}x{side}"}

            def merge(x: torch.Tensor = x, hw: tuple[int, int] = hw) -> torch.Tensor:
                return plan_merge(x, hw, ratio=ratio).merge(x)

            with torch.inference_mode():
                row["M_kv"] = int(merge().shape[1])
            row["plan+merge ms"] = self.per_call_ms(merge, calls, samples)
            row["plan+merge kernels"] = profile_call(merge, self.device)["kernels"]

            # Stock vs MaMeProcessor() on copies of one attention module (fresh processors
            # per N: within one forward a bare processor takes the largest N for level 1).
            attns = {"stock": stock_attn}
            mame_attn = _self_attention().to(self.device, self.dtype)
            mame_attn.load_state_dict(stock_attn.state_dict())
            mame_attn.set_processor(MaMeProcessor())
            attns["MaMe"] = mame_attn
            try:
                forced = _self_attention().to(self.device, self.dtype)
                forced.load_state_dict(stock_attn.state_dict())
                forced.set_processor(MaMeProcessor(config=MaMeConfig(min_latent_tokens=0)))
                attns["forced"] = forced
            except TypeError as error:  # no min_latent_tokens setting in this version
                row["forced-merge attn ms"] = None
                self.note(f"operator: no forced-merge column ({_describe(error)})")
            if triton_runs():
                layout = merge_layout(hw, ratio)

                def triton_merge(x: torch.Tensor = x, layout=layout) -> torch.Tensor:
                    return kernels.plan_slots(x, layout, tau=0.0).merge(x)

                with torch.inference_mode():
                    torch.testing.assert_close(triton_merge(), merge(), rtol=2e-3, atol=2e-3)
                row["triton plan+merge ms"] = self.per_call_ms(triton_merge, calls, samples)
                row["triton plan+merge kernels"] = profile_call(triton_merge, self.device)["kernels"]
                fused = _self_attention().to(self.device, self.dtype)
                fused.load_state_dict(stock_attn.state_dict())
                fused.set_processor(MaMeProcessor(config=MaMeConfig(min_latent_tokens=0, backend="triton")))
                attns["triton"] = fused
            else:
                self.note("operator: no triton columns (triton is not importable, or no GPU)")
            times = self.interleaved_ms({k: (lambda a=a, x=x: a(x)) for k, a in attns.items()}, calls, samples)
            with torch.inference_mode():
                outputs = {k: a(x) for k, a in attns.items()}
            row["stock attn ms"] = times["stock"]
            row["MaMe attn ms"] = times["MaMe"]
            row["MaMe/stock"] = times["MaMe"] / times["stock"]
            row["MaMe merged"] = not torch.equal(outputs["MaMe"], outputs["stock"])
            row["kernels stock"] = profile_call(lambda: stock_attn(x), self.device)["kernels"]
            row["kernels MaMe"] = profile_call(lambda: mame_attn(x), self.device)["kernels"]
            if "forced" in attns:
                row["forced-merge attn ms"] = times["forced"]
                row["kernels forced"] = profile_call(lambda: attns["forced"](x), self.device)["kernels"]
            if "triton" in attns:
                row["triton attn ms"] = times["triton"]
                row["kernels triton attn"] = profile_call(lambda: attns["triton"](x), self.device)["kernels"]
            self.report.payload["operator"].append(row)
            self.log(
                f"  N={tokens}: plan+merge {row['plan+merge ms']:.3f} ms ({row['plan+merge kernels']} kernels); "
                f"attention stock {row['stock attn ms']:.3f} ms, MaMe {row['MaMe attn ms']:.3f} ms"
            )

    def per_call_ms(self, fn: Callable[[], object], calls: int, samples: int) -> float:
        return self.interleaved_ms({"fn": fn}, calls, samples)["fn"]

    def interleaved_ms(self, fns: dict[str, Callable[[], object]], calls: int, samples: int) -> dict[str, float]:
        """Median over ``samples`` of the mean ms per call of ``calls`` back-to-back calls
        (a loop, so that launch-bound calls are timed as a model runs them), the functions
        taking turns sample by sample."""
        times: dict[str, list[float]] = {k: [] for k in fns}
        with torch.inference_mode():
            for fn in fns.values():  # warm-up
                fn()
            for _ in range(samples):
                for name, fn in fns.items():
                    synchronize(self.device)
                    start = time.perf_counter()
                    for _ in range(calls):
                        fn()
                    synchronize(self.device)
                    times[name].append(1e3 * (time.perf_counter() - start) / calls)
        return {k: statistics.median(v) for k, v in times.items()}

    # 2. Eager UNets (and the profiler).

    def eager(self, setting: UNetSetting) -> None:
        models, patch_errors = self.copies(setting)
        hw = (setting.resolution // 8, setting.resolution // 8)
        inputs = unet_inputs(next(iter(models.values())), hw, latents=self.latents(hw, setting.batch))
        rows = compare_unet_copies(models, inputs, repeats=setting.repeats, warmup=setting.warmup)
        rows += [{"method": name, "failed": message} for name, message in patch_errors.items()]
        for row in rows:
            row.update(setting=setting.label, model=setting.model, resolution=setting.resolution, batch=setting.batch)
        self.report.payload["eager"].extend(rows)
        by_name = {r["method"]: r for r in rows}
        summary = [f"stock {_ms(by_name[STOCK].get('seconds')) or float('nan'):.1f} ms"] if STOCK in by_name else []
        for row in rows[1:]:
            if row.get("speedup") is not None:
                summary.append(f"{row['method']} {_speedup_cell(row)}")
            else:
                summary.append(f"{row['method']} failed")
        self.log("  " + " | ".join(summary))
        if setting.profile:
            self.report.write()  # the timings are safe before the slower profiled calls
            for name in (STOCK, MAME_DEFAULTS, MAME_TRITON):
                if name not in models:
                    continue
                entry: dict[str, Any] = {"setting": setting.label, "method": name}
                try:
                    entry.update(profile_call(lambda m=models[name]: call_like_a_pipeline(m, inputs), self.device))
                except Exception as error:  # the timings above stand without it
                    entry["failed"] = _describe(error)
                self.report.payload["profiler"].append(entry)
                share = entry.get("attention_share")
                share = "?" if share is None else f"{share:.1%}"
                self.log(f"  profiled {name}: {entry.get('kernels')} kernels, attention {share} of kernel time")

    # 4. CUDA graphs.

    def graphs(self, setting: UNetSetting) -> None:
        """Each method's patched copy recorded into a CUDA graph at ``setting`` and replayed
        round by round; errors against eager stock."""
        self.release_copies()
        methods, notes = graph_methods(self.variants, setting.sdxl)
        for text in notes:
            self.note(text)
        if self.device.type != "cuda":
            self.note("not on CUDA: the CUDA-graph sections call the models eagerly (a check of the script only)")
        base = self.build(setting.model)
        models, patch_errors = patched_copies(base, methods)
        del base
        hw = (setting.resolution // 8, setting.resolution // 8)
        inputs = unet_inputs(next(iter(models.values())), hw, latents=self.latents(hw, setting.batch))
        with torch.inference_mode():
            reference = call_like_a_pipeline(models[STOCK], inputs).float()
        graphed: dict[str, torch.nn.Module] = {}
        for name, model in models.items():
            try:
                graphed[name] = GraphedUNet(model, inputs)
            except Exception as error:  # recorded in the table; the others still run
                patch_errors[name] = f"recording: {_describe(error)}"
                self.free()
        rows = compare_unet_copies(
            graphed, inputs, repeats=setting.repeats, warmup=setting.warmup,
            call=lambda model, _: model(), reference=reference,
        )
        rows += [{"method": name, "failed": message} for name, message in patch_errors.items()]
        for row in rows:
            row.update(setting=setting.label, model=setting.model, resolution=setting.resolution, batch=setting.batch)
            for key in ("activation_mib", "peak_mib", "max_allocated_mib"):  # replays allocate nothing
                row.pop(key, None)
        self.report.payload["graphs"].extend(rows)
        by_name = {r["method"]: r for r in rows}
        summary = [f"stock {_ms(by_name[STOCK].get('seconds')) or float('nan'):.1f} ms"] if STOCK in by_name else []
        summary += [
            f"{r['method']} {_speedup_cell(r) if r.get('speedup') is not None else 'failed'}" for r in rows[1:]
        ]
        self.log("  " + " | ".join(summary))
        del graphed, models

    # 5. torch.compile.

    def compile_state(self) -> dict[str, Any]:
        """SD 2.1 at 768, batch 2: a stock copy and a MaMe-defaults copy, their inputs, and
        eager stock's output as the reference; shared by the compiled sections."""
        if self._compile:
            return self._compile
        self.release_copies()
        tiny = {"sd21": ("tiny-sd", 128), "sdxl": ("tiny-sdxl", 256)}
        model, resolution = tiny[self.args.compile_model] if self.quick else (
            self.args.compile_model, self.args.compile_resolution
        )
        setting = UNetSetting(model, resolution, 2, 1, 6, 0.0)
        backend = self.args.compile_backend
        self.report.payload["compiled"]["setting"] = f"{setting.label}, torch.compile backend {backend}"
        base = self.build(model)
        methods = [named(baseline(), STOCK), named(mame(**self.args.compile_mame), self.compiled_mame)]
        models, errors = patched_copies(base, methods)
        del base
        if errors:
            raise RuntimeError(f"cannot patch for compiling: {errors}")
        hw = (resolution // 8, resolution // 8)
        inputs = unet_inputs(models[STOCK], hw, latents=self.latents(hw, 2))
        with torch.inference_mode():
            reference = call_like_a_pipeline(models[STOCK], inputs).float()
        self._compile = {
            "eager": models,  # the two copies, eager (compiled wrappers call these same modules)
            "inputs": inputs,
            "reference": reference,  # eager stock's noise prediction, float32
            "compiled": {},  # name -> default-mode compiled model
            "compile_s": {},  # (name, mode) -> seconds of the first call(s)
            "timings": {},  # (name, mode) -> compare_unet_copies row (or {"failed": ...})
        }
        return self._compile

    def compile_model(self, model: torch.nn.Module, **options: Any) -> torch.nn.Module:
        return torch.compile(model, backend=self.args.compile_backend, **options)

    def compiled(self, name: str) -> None:
        """``torch.compile`` (default mode) of the ``name`` copy: compile time, then timed
        with every model compiled so far and eager stock and MaMe, round by round."""
        state = self.compile_state()
        compiled = self.first_compiled_call(state, name, "default")
        if compiled is None:
            raise RuntimeError(state["timings"][(name, "default")]["failed"])
        state["compiled"][name] = compiled
        self.time_compiled(state, {f"{k} (compiled)": (m, k, "default") for k, m in state["compiled"].items()})

    def first_compiled_call(self, state: dict[str, Any], name: str, mode: str, calls: int = 1, on_call=None):
        """Compile the ``name`` copy in ``mode`` and time its first ``calls`` calls (the
        compiling); the compiled model, or ``None`` with the error in the table."""
        options = {} if mode == "default" else {"mode": mode}
        synchronize(self.device)
        start = time.perf_counter()
        try:
            model = self.compile_model(state["eager"][name], **options)
            with torch.inference_mode():
                for _ in range(calls):
                    if on_call is not None:
                        on_call()
                    call_like_a_pipeline(model, state["inputs"])
            synchronize(self.device)
        except Exception as error:  # in the table; the caller decides whether to go on
            state["timings"][(name, mode)] = {"failed": _describe(error)}
            self.refresh_compiled_table(state)
            self.log(f"  compiling {name} ({mode}) failed: {_describe(error)}")
            return None
        state["compile_s"][(name, mode)] = time.perf_counter() - start
        self.log(f"  compiled {name} ({mode}) in {state['compile_s'][(name, mode)]:.0f} s")
        return model

    def time_compiled(
        self, state: dict[str, Any], compiled: dict[str, tuple[torch.nn.Module, str, str]], on_call=None
    ) -> None:
        """Time the compiled models with eager stock and eager MaMe, round by round, and
        rebuild the compiled table from every timing so far."""
        mame_name = self.compiled_mame
        models = {f"{STOCK} (eager)": state["eager"][STOCK], f"{mame_name} (eager)": state["eager"][mame_name]}
        models.update({k: m for k, (m, _, _) in compiled.items()})
        warmup, repeats = (1, 2) if self.quick else (2, 6)
        rows = compare_unet_copies(
            models, state["inputs"], repeats=repeats, warmup=warmup, reference=state["reference"], on_call=on_call
        )
        meta = {f"{STOCK} (eager)": (STOCK, "eager"), f"{mame_name} (eager)": (mame_name, "eager")}
        meta.update({k: (name, mode) for k, (_, name, mode) in compiled.items()})
        for row in rows:
            state["timings"][meta[row["method"]]] = row
        self.refresh_compiled_table(state)
        table = self.report.payload["compiled"]["rows"]
        self.log("  " + " | ".join(f"{r['method']} {r['mode']} {r['median ms'] or float('nan'):.1f} ms" for r in table))

    def refresh_compiled_table(self, state: dict[str, Any]) -> None:
        eager_stock = state["timings"].get((STOCK, "eager"), {}).get("seconds")
        table = []
        for (name, mode), row in state["timings"].items():
            compiled_stock = state["timings"].get((STOCK, mode), {}).get("seconds") if mode != "eager" else None
            seconds = row.get("seconds")
            table.append(
                {
                    "method": name,
                    "mode": mode,
                    "compile s": state["compile_s"].get((name, mode)),
                    "median ms": _ms(seconds),
                    "min ms": _ms(row.get("min_seconds")),
                    "x vs eager stock": eager_stock / seconds if seconds and eager_stock else None,
                    "x vs compiled stock": compiled_stock / seconds if seconds and compiled_stock else None,
                    "error vs eager stock": row.get("error"),
                    "failed": row.get("failed"),
                    "all_seconds": row.get("all_seconds"),
                }
            )
        self.report.payload["compiled"]["rows"] = table

    def ratio_change(self) -> None:
        """Re-apply MaMe with another ratio to the model inside the compiled wrapper, then call
        the compiled model again: it must run, and agree with eager MaMe at the new ratio."""
        state = self._compile
        if self.compiled_mame not in state.get("compiled", {}):
            raise SectionSkipped("needs the model compiled by 'compiled MaMe defaults', which did not run")
        checks = self.report.payload["compiled"]["checks"]
        compiled = state["compiled"][self.compiled_mame]
        inner = compiled._orig_mod
        inputs = state["inputs"]
        with torch.inference_mode():
            before = call_like_a_pipeline(compiled, inputs).float()
            apply_mame(inner, ratio=0.5)
            try:
                start = time.perf_counter()
                try:
                    after = call_like_a_pipeline(compiled, inputs).float()
                    synchronize(self.device)
                except Exception as error:
                    checks["ratio change after compile runs"] = f"False ({_describe(error)})"
                    raise
                seconds = time.perf_counter() - start
                eager = call_like_a_pipeline(inner, inputs).float()
            finally:
                apply_mame(inner, **self.args.compile_mame)  # back to what the other compiled sections expect
        changed = float(torch.linalg.vector_norm(after - before) / torch.linalg.vector_norm(before))
        agreement = float(torch.linalg.vector_norm(after - eager) / torch.linalg.vector_norm(eager))
        checks["ratio change after compile runs"] = f"True (first call after the change: {seconds:.1f} s)"
        checks["output changed with the ratio (relative difference)"] = f"{changed:.4f}"
        checks["compiled vs eager at the new ratio (relative difference)"] = f"{agreement:.4f}"
        self.log(f"  ratio change: ran in {seconds:.1f} s, changed {changed:.4f}, vs eager {agreement:.4f}")

    def reduce_overhead(self) -> None:
        """``mode="reduce-overhead"`` (CUDA graphs) for stock and MaMe defaults."""
        if self.device.type != "cuda":
            raise SectionSkipped("CUDA graphs need CUDA")
        state = self.compile_state()
        # CUDA graphs replay into the same output buffers: mark each new call as a new step.
        mark = getattr(torch.compiler, "cudagraph_mark_step_begin", None)
        compiled = {}
        for name in (STOCK, self.compiled_mame):
            # Three calls: CUDA graphs are recorded on the calls after the first.
            model = self.first_compiled_call(state, name, "reduce-overhead", calls=3, on_call=mark)
            if model is not None:
                compiled[f"{name} (reduce-overhead)"] = (model, name, "reduce-overhead")
        if not compiled:
            raise RuntimeError("neither model compiled with mode='reduce-overhead'")
        self.time_compiled(state, compiled, on_call=mark)

    def operator_compiled(self) -> None:
        """``plan_merge`` + ``merge`` under ``torch.compile`` at the smallest N of section 1."""
        tokens = 256 if self.quick else 4096
        side = math.isqrt(tokens)
        ratio = MaMeConfig().kv_ratio
        x = torch.randn(2, tokens, 320, device=self.device, dtype=self.dtype)

        def merge(x: torch.Tensor) -> torch.Tensor:
            return plan_merge(x, (side, side), ratio=ratio).merge(x)

        compiled = torch.compile(merge, backend=self.args.compile_backend)
        start = time.perf_counter()
        with torch.inference_mode():
            compiled(x)
        synchronize(self.device)
        compile_s = time.perf_counter() - start
        calls, samples = (3, 3) if self.quick else (20, 7)
        times = self.interleaved_ms({"eager": lambda: merge(x), "compiled": lambda: compiled(x)}, calls, samples)
        kernels = profile_call(lambda: compiled(x), self.device)["kernels"]
        checks = self.report.payload["compiled"]["checks"]
        checks[f"plan+merge compiled at N={tokens}"] = (
            f"compile {compile_s:.1f} s; {times['compiled']:.3f} ms vs eager {times['eager']:.3f} ms; "
            f"{kernels} kernels per call"
        )
        self.report.payload["operator_compiled"] = {
            "N": tokens, "compile_s": compile_s, "ms": times, "kernels": kernels,
        }
        self.log(f"  plan+merge compiled: {checks[f'plan+merge compiled at N={tokens}']}")


def _self_attention() -> torch.nn.Module:
    """A diffusers self-attention as in SD 2.1's full-resolution blocks (C = 320, 5 heads)."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    attn = Attention(query_dim=320, heads=5, dim_head=64)
    attn.set_processor(AttnProcessor2_0())
    return attn.eval()


# -- the command line -------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for gpu.json and gpu.md")
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--budget", type=float, default=None,
        help=f"seconds from the start; sections that would end past it are skipped (default {DEFAULT_BUDGET:.0f}, "
        f"{QUICK_BUDGET:.0f} with --quick)",
    )
    parser.add_argument(
        "--mame-variant", type=parse_variant, action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
        help="an extra MaMe method for the eager UNet sections, e.g. min_latent_tokens=0 or ratio=0.9 (repeatable)",
    )
    parser.add_argument("--only", help="comma-separated parts of section names to run, e.g. 'operator,SD 2.1 512'")
    parser.add_argument(
        "--compile-backend", default="inductor",
        help="torch.compile backend (inductor; 'aot_eager' checks the compiled sections' code in seconds on a CPU)",
    )
    parser.add_argument("--compile-model", choices=("sd21", "sdxl"), default="sd21", help="UNet of the compiled sections")
    parser.add_argument(
        "--compile-resolution", type=int, default=768, help="resolution of the compiled sections (batch 2)"
    )
    parser.add_argument(
        "--compile-mame", type=parse_variant, default={}, metavar="KEY=VALUE[,KEY=VALUE]",
        help="settings of the compiled sections' MaMe copy (default: MaMe's defaults), e.g. min_latent_tokens=0",
    )
    parser.add_argument("--quick", action="store_true", help="tiny models: check the script on any machine")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, started: float | None = None) -> int:
    """Run the benchmark; returns the exit status (0 also when sections failed or were
    skipped: the report says which)."""
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("gpu_benchmark: CUDA was requested but torch sees no GPU (use --device cpu --quick to check the script)")
        return 2
    bench = Benchmark(args, started if started is not None else time.perf_counter())

    def stop(signum: int, frame: Any) -> None:
        raise BudgetExceeded(signal.Signals(signum).name)

    # The alarm stops whatever runs at the budget's end (plus the grace to write the report);
    # SIGTERM (gpu.sh's hard timeout) does the same.
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGALRM, signal.SIGTERM)}
    signal.alarm(max(1, int(bench.remaining()) + ALARM_GRACE))
    try:
        stopped = bench.run()
    except BudgetExceeded:  # between sections: what is written stands
        stopped = True
    finally:
        signal.alarm(0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    bench.report.write()
    print("\n" + bench.report.stdout_summary())
    out = bench.report.out
    print(f"\nwrote {out / 'gpu.json'} and {out / 'gpu.md'} in {bench.elapsed():.0f} s", flush=True)
    return 3 if stopped else 0


if __name__ == "__main__":
    status = main(started=STARTED)
    sys.stdout.flush()
    sys.stderr.flush()
    if status == 3:
        # The alarm may have fired inside torch.compile: its worker processes can hold up an
        # orderly exit past the hard limit, and everything is written already.
        os._exit(0)
    sys.exit(status)
