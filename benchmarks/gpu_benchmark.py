"""GPU benchmark of MaMe on diffusers UNets: the one command a session lent a GPU runs
(``bash benchmarks/gpu.sh OUT``), inside the lent machine's 10-minute limit.

Sections, in this order (each written to ``OUT/gpu.json`` and ``OUT/gpu.md`` as it ends, so
that a crash or the time limit loses only the section that was running):

1. **kernel tests**: ``python -m pytest -q tests/test_kernels.py`` on CUDA, with
   ``TRITON_INTERPRET`` unset (compiled kernels, not the interpreter); its output goes to
   ``OUT/kernel_tests.txt``. A failure does not stop the timing: the "MaMe triton" rows
   are then left out.
2. **eager** and **graphs**, per setting: SD 2.1 at 512, 768 and 1024, batch 2 then batch 8,
   SDXL at 1024 batch 2, then SD 2.1 at 2048 batch 2. Eager: each method's patched copy
   called as a pipeline calls it. Graphs: each copy's call recorded once into a CUDA graph
   (``torch.cuda.graph``) and replayed, as a pipeline with CUDA graphs runs it.
3. **diffusion transformers** (about 2 minutes budgeted): one transformer forward, eager, batch
   1, random weights at the real widths with a few blocks (``mame_diffusers.benchmarking.dit``):
   PixArt-α (4 blocks) and SD3-medium (3 blocks) in fp16, Flux.1 (1 double + 1 single block)
   in bf16, each at 512² and 1024²; Wan 2.1 1.3B (2 blocks) in bf16 at 480p, 9 and 33 frames.
   Methods: ``stock``, ``MaMe defaults`` (``apply_mame(transformer)``: on CUDA, calls under
   ``DEFAULT_DIT_MIN_IMAGE_TOKENS`` image tokens stay unmerged), ``MaMe min_image_tokens=0``
   (merging every call) and the ToMe bipartite peer at MaMe's place and merged count (merging
   every call; tomesd's matching). Where merging every call starts to beat stock gives
   ``DEFAULT_DIT_MIN_IMAGE_TOKENS`` (``mame_diffusers/dit_integration/config.py``).
4. **compiled**: ``torch.compile`` (default mode) at SD 2.1 768 b2: the fused default (MaMe
   triton, or MaMe torch where there are no triton rows), stock, then MaMe torch (compiling
   takes a minute or more each: last, and the first to be skipped).

Methods: ``stock``; ``MaMe defaults`` (``apply_mame(unet)`` as shipped, with the CUDA
thresholds, so small calls stay unmerged); ``MaMe torch`` (the default operator merging
every call, ``min_latent_tokens=0``); ``MaMe triton`` (the same with ``backend="triton"``:
the fused kernels, where they import, on CUDA, and their tests passed); ``MaMe kv-only``
(``keys_values_only=True``, merging every call); ``tomesd 0.5`` and ``tomesd 0.75``
(``max_downsample=2``: tomesd's default merges nothing on SDXL; ``use_rand=False`` in
graphs, which cannot record tomesd's own generator); any ``--mame-variant``.

Every row: the median ms of interleaved rounds (one patched copy per method, called in turn
round by round), min and max, the speed-up over stock in the same mode, the relative error
of the noise prediction against eager stock (photo latents, random weights from the shipped
configs, fp16) and the kernels one forward launches (one profiled forward per method and
model; ``MaMe defaults`` launches stock's or MaMe torch's, as it merged or not).

At the end, per mode, the smallest latent-token count (batch x latent height x width) from
which the fused default beats stock at every measured size: what ``DEFAULT_MIN_LATENT_TOKENS``
(``mame_diffusers/defaults.py``) should be. Printed, and in ``gpu.json`` ("thresholds").

Budget: every section has an estimated cost; one is skipped, and listed as skipped, when
less of the ``--budget`` (540 s from the start by default) is left than it needs; an alarm
stops the run at the budget's end whatever is running, and ``gpu.sh``'s ``timeout`` is the
hard stop behind it. A section that raises is recorded with its error and the run goes on.
``--quick`` maps every setting to tiny models, to check the script on any machine.

To add sections: :meth:`Benchmark.plan` lists ``Section``s
(name, estimated seconds, what it runs, the model it holds); rows carry ``mode``,
``setting``, ``latent_tokens`` and ``method``, from which the tables and thresholds are built.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # the budget counts from here: the imports below take seconds

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import hashlib  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import dataclass, field, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402

from mame_diffusers import MaMeConfig  # noqa: E402
from mame_diffusers.benchmarking.dit import (  # noqa: E402
    QUICK as DIT_QUICK,
    SUBJECTS as DIT_SUBJECTS,
    call_dit,
    dit_inputs,
    dit_methods,
    latent_size,
    merged_tokens,
    peer_method,
)
from mame_diffusers.benchmarking.profiling import profile_call  # noqa: E402
from mame_diffusers.benchmarking.report import environment, markdown_table, package_version, write_report  # noqa: E402
from mame_diffusers.benchmarking.timing import synchronize  # noqa: E402
from mame_diffusers.benchmarking.unet import call_like_a_pipeline, compare_unet_copies, patched_copies  # noqa: E402
from mame_diffusers.defaults import DEFAULT_MIN_LATENT_TOKENS  # noqa: E402
from mame_diffusers.dit_integration import DEFAULT_DIT_MIN_IMAGE_TOKENS, DiTMaMeConfig, transformer_inputs  # noqa: E402
from mame_diffusers.merging import kernels  # noqa: E402
from mame_diffusers.methods import Method, baseline, mame, tomesd_method  # noqa: E402
from mame_diffusers.offline import build_unet, unet_inputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: Seconds from the start. gpu.sh's hard stop is 565 s and a lent machine's command 600 s
#: (the wheels' install comes first): the alarm at the budget's end plus the grace to write
#: the report ends inside both.
DEFAULT_BUDGET = 540.0
QUICK_BUDGET = 180.0
#: Seconds after the budget at which the alarm stops whatever is running.
ALARM_GRACE = 10
#: The kernel tests: what runs, and the most it may take.
KERNEL_TESTS = "tests/test_kernels.py"
KERNEL_TESTS_TIMEOUT = 180.0
KERNEL_TESTS_ESTIMATE = 120.0

STOCK = "stock"
DEFAULTS = "MaMe defaults"
TORCH = "MaMe torch"
TRITON = "MaMe triton"
KV_ONLY = "MaMe kv-only"
MODES = ("eager", "graphs", "compiled")
#: The mode of the diffusion transformers' rows (eager calls), and their methods.
DIT_MODE = "dit"
DIT_EVERY = "MaMe min_image_tokens=0"
DIT_PEER = "ToMe bipartite"
#: A speed-up above this counts as beating stock.
WIN = 1.0


class SectionSkipped(Exception):
    """A section that cannot run here (no CUDA, what it needs did not run)."""


class BudgetExceeded(BaseException):
    """Raised by the alarm (or SIGTERM) at the end of the budget. A BaseException, so that
    the ``except Exception`` blocks that keep a failing method from stopping a section do
    not swallow it."""


# -- what to run ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """A UNet at one size: what the eager and graph sections time."""

    model: str  # a name of mame_diffusers.offline.UNET_CONFIGS
    resolution: int  # pixels; latents are resolution / 8 on a side
    batch: int
    per_call: float  # estimated seconds of one eager call (methods averaged)
    replay: float  # estimated seconds of one replay of its CUDA graph
    warmup: int = 2
    repeats: int = 8
    graph_repeats: int = 10  # replays are cheap

    @property
    def label(self) -> str:
        names = {"sd21": "SD 2.1", "sdxl": "SDXL"}
        return f"{names.get(self.model, self.model)} {self.resolution} b{self.batch}"

    @property
    def latent_hw(self) -> tuple[int, int]:
        return (self.resolution // 8, self.resolution // 8)

    @property
    def latent_tokens(self) -> int:
        return self.batch * self.latent_hw[0] * self.latent_hw[1]

    @property
    def sdxl(self) -> bool:
        return "sdxl" in self.model


def unet_settings(quick: bool) -> list[Setting]:
    """The eager + graph settings, in the order they run (the later, the likelier skipped).
    Estimates: an H200 in fp16, methods averaged (batch 2 up to 1024 is launch bound eagerly)."""
    if quick:  # tiny models standing in for batch 2, batch 8, SDXL and 2048: tenths of a second a call on a CPU
        return [
            Setting("tiny-sd", 64, 2, 0.2, 0.2, 1, 2, 2),
            Setting("tiny-sd", 64, 8, 0.3, 0.3, 1, 2, 2),
            Setting("tiny-sdxl", 128, 2, 0.3, 0.3, 1, 2, 2),
            Setting("tiny-sd", 128, 2, 0.3, 0.3, 1, 2, 2),
        ]
    return [
        Setting("sd21", 512, 2, 0.045, 0.015),
        Setting("sd21", 768, 2, 0.05, 0.025),
        Setting("sd21", 1024, 2, 0.06, 0.04),
        Setting("sd21", 512, 8, 0.06, 0.04),
        Setting("sd21", 768, 8, 0.10, 0.075),
        Setting("sd21", 1024, 8, 0.16, 0.13),
        Setting("sdxl", 1024, 2, 0.10, 0.05),
        Setting("sd21", 2048, 2, 0.30, 0.25, 1, 5, 6),
    ]


@dataclass(frozen=True)
class DiTSetting:
    """A diffusion transformer at one size (batch 1): what a DiT section times."""

    family: str  # pixart, sd3, flux, wan (mame_diffusers.benchmarking.dit.SUBJECTS)
    resolution: int  # pixels: the image side; Wan: the frame height (480p: 480 x 832)
    dtype: str  # on CUDA; float32 elsewhere
    per_call: float  # estimated seconds of one eager call (methods averaged)
    setup: float = 0.0  # building the family's copies (its first section)
    frames: int | None = None
    warmup: int = 3
    repeats: int = 12

    @property
    def label(self) -> str:
        name = {"pixart": "PixArt", "sd3": "SD3", "flux": "Flux", "wan": "Wan"}[self.family]
        if self.frames:
            return f"{name} {self.resolution}p {self.frames}f"
        return f"{name} {self.resolution}"

    @property
    def model(self) -> str:
        """The pool of patched copies it uses (one per family)."""
        return f"dit-{self.family}"

    @property
    def latent(self) -> tuple[int, ...]:
        return latent_size(self.family, self.resolution, self.frames)


def dit_settings(quick: bool) -> list[DiTSetting]:
    """The DiT sections' settings, in the order they run. Estimates (not yet measured: about
    twice what the FLOPs suggest on an H200, methods averaged; fp16 PixArt and SD3, bf16 Flux
    and Wan, as their pipelines run): about 90 s in all, most of it building each family's four
    copies and its first calls."""
    if quick:  # tiny configs: hundredths of a second a call on a CPU
        return [
            DiTSetting("pixart", 128, "float16", 0.02, 1),
            DiTSetting("pixart", 256, "float16", 0.02),
            DiTSetting("sd3", 256, "float16", 0.02, 1),
            DiTSetting("flux", 256, "bfloat16", 0.02, 1),
            DiTSetting("wan", 128, "bfloat16", 0.05, 1, frames=5),
        ]
    return [
        DiTSetting("pixart", 512, "float16", 0.008, 15),
        DiTSetting("pixart", 1024, "float16", 0.015),
        DiTSetting("sd3", 512, "float16", 0.010, 15),
        DiTSetting("sd3", 1024, "float16", 0.020),
        DiTSetting("flux", 512, "bfloat16", 0.012, 20),
        DiTSetting("flux", 1024, "bfloat16", 0.025),
        DiTSetting("wan", 480, "bfloat16", 0.015, 15, frames=9),
        DiTSetting("wan", 480, "bfloat16", 0.050, frames=33),
    ]


def compiled_setting(quick: bool) -> Setting:
    """Where ``torch.compile`` is timed: one size (compiling costs a minute or more per model)."""
    return Setting("tiny-sd", 64, 2, 0.2, 0.2, 1, 2) if quick else Setting("sd21", 768, 2, 0.03, 0.03, 2, 6)


def tomesd_name(ratio: float, fixed: bool) -> str:
    return f"tomesd {ratio}" + (" (use_rand=False)" if fixed else "")


def all_methods(*, triton: bool, variants: list[dict[str, Any]]) -> list[Method]:
    """Every method of the eager and graph modes, one patched copy each (stock first)."""
    methods = {
        STOCK: baseline(),
        DEFAULTS: mame(),
        TORCH: mame(min_latent_tokens=0),
        **({TRITON: mame(min_latent_tokens=0, backend="triton")} if triton else {}),
        KV_ONLY: mame(min_latent_tokens=0, keys_values_only=True),
    }
    for ratio in (0.5, 0.75):
        for fixed in (False, True):  # graphs cannot record tomesd's own generator's draws
            peer = tomesd_method(ratio, max_downsample=2, **({"use_rand": False} if fixed else {}))
            if peer is not None:
                methods[tomesd_name(ratio, fixed)] = peer
    for settings in variants:
        methods["MaMe " + ", ".join(f"{k}={v}" for k, v in settings.items())] = mame(**settings)
    return [replace(method, name=name) for name, method in methods.items()]


def mode_methods(mode: str, names: list[str]) -> list[str]:
    """The methods ``mode`` times, of the copies ``names``: eager leaves out the copies made
    for graphs (tomesd without its random draws), graphs the other tomesd copies."""
    if mode == "graphs":
        return [n for n in names if not (n.startswith("tomesd") and not n.endswith("(use_rand=False)"))]
    return [n for n in names if not n.endswith("(use_rand=False)")]


def triton_allowed(on_cuda: bool, tests: dict[str, Any] | None) -> tuple[bool, str]:
    """Whether the "MaMe triton" rows run, and why not: triton importable, CUDA, and the
    kernels' CUDA tests passed (or were deliberately not run: ``--kernel-tests none``, --only)."""
    if not kernels.available():
        return False, "triton is not importable"
    if not on_cuda:
        return False, "not on CUDA (Triton's interpreter is far too slow to time; the tests check it)"
    status = (tests or {}).get("status", "not run")
    if status not in ("passed", "not run"):
        return False, f"the kernels' CUDA tests {status}"
    return True, "" if status == "passed" else "the kernels' CUDA tests did not run: the triton rows are unchecked"


def parse_value(text: str) -> Any:
    """``'4096'`` -> 4096, ``'0.9'`` -> 0.9, ``'None'``/``'True'``/``'False'``, else the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"none": None, "true": True, "false": False}.get(text.lower(), text)


def parse_variant(text: str) -> dict[str, Any]:
    """``'block=8'`` or ``'ratio=0.9,min_latent_tokens=0'`` -> settings for apply_mame."""
    settings = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"--mame-variant takes key=value[,key=value], got {text!r}")
        settings[key.strip()] = parse_value(value.strip())
    return settings


def crossover(points: list[tuple[int, float]]) -> dict[str, Any]:
    """``(latent tokens, speed-up over stock)`` of one method in one mode -> the smallest
    measured token count from which it beats stock at every measured size (``None`` when it
    loses at the largest), the smallest at which it beats stock at all, and a verdict."""
    points = sorted(points)
    if not points:
        return {"min_latent_tokens": None, "first_win": None, "points": [], "verdict": "not measured"}
    threshold = None
    for tokens in sorted({t for t, _ in points}, reverse=True):
        if all(s > WIN for t, s in points if t >= tokens):
            threshold = tokens
        else:
            break
    wins = [t for t, s in points if s > WIN]
    smallest, largest = points[0][0], points[-1][0]
    if threshold is None:
        verdict = f"does not beat stock at the largest size measured ({largest} tokens)"
    elif threshold == smallest:
        verdict = f"beats stock at every size measured, {smallest} tokens and up: the threshold may lie lower"
    else:
        below = max(t for t, s in points if t < threshold and s <= WIN)
        verdict = f"beats stock at every size measured from {threshold} tokens; not at {below}"
    return {
        "min_latent_tokens": threshold,
        "first_win": wins[0] if wins else None,
        "points": [list(p) for p in points],
        "verdict": verdict,
    }


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


@dataclass
class Section:
    name: str
    estimate: float  # seconds
    run: Callable[[], str | None]  # returns a note for the sections table, if any
    model: str | None = None  # the pooled model it uses: released after its last section


# -- the report -------------------------------------------------------------------------------


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1e3 * seconds


def _describe(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__


def _tokens(item: tuple[str, list]) -> int:
    return item[1][0]


def _cell(row: dict[str, Any]) -> str:
    """``1.42x (0.0213)``: speed-up over stock in the mode, and the error against stock."""
    if row.get("failed"):
        return "failed: " + row["failed"].split(":")[0]
    if row.get("speedup") is None:
        return "-"
    error = "?" if row.get("error") is None else f"{row['error']:.4f}"
    return f"{row['speedup']:.2f}x ({error})"


@dataclass
class Report:
    """Everything measured so far; written whole after every section."""

    out: Path
    payload: dict[str, Any]
    sections: list[dict[str, Any]] = field(default_factory=list)

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.payload["rows"]

    def write(self) -> None:
        self.payload["sections"] = self.sections
        self.payload["thresholds"] = self.thresholds()
        self.payload["seconds_total"] = time.perf_counter() - self.payload["_started"]
        payload = {k: v for k, v in self.payload.items() if not k.startswith("_")}
        write_report(self.out / "gpu", payload, self.markdown(), header=False)

    def fused_default(self, mode: str) -> str:
        """The fused default's method in ``mode``: the Triton kernels where they ran."""
        return TRITON if any(r["mode"] == mode and r["method"] == TRITON for r in self.rows) else TORCH

    def thresholds(self) -> dict[str, Any]:
        """Per mode and MaMe method: :func:`crossover` of its speed-ups; and the suggested
        ``DEFAULT_MIN_LATENT_TOKENS`` (the fused default's, eager and graphs)."""
        result: dict[str, Any] = {}
        for mode in MODES:
            found = {}
            for method in (TRITON, TORCH):
                rows = [
                    r for r in self.rows if r["mode"] == mode and r["method"] == method and r.get("speedup") is not None
                ]
                if rows:
                    found[method] = crossover([(r["latent_tokens"], r["speedup"]) for r in rows])
                    found[method]["settings"] = {r["setting"]: [r["latent_tokens"], r["speedup"]] for r in rows}
            if found:
                result[mode] = {"fused default": self.fused_default(mode), **found}
        suggested = {}
        for mode, key in (("eager", "cuda"), ("graphs", "cuda-graph")):
            if mode in result and result[mode]["fused default"] in result[mode]:
                suggested[key] = result[mode][result[mode]["fused default"]]["min_latent_tokens"]
        result["suggested DEFAULT_MIN_LATENT_TOKENS"] = suggested
        result["shipped DEFAULT_MIN_LATENT_TOKENS"] = dict(DEFAULT_MIN_LATENT_TOKENS)
        dit = self.dit_thresholds()
        if dit:
            result[DIT_MODE] = dit
        return result

    def dit_thresholds(self) -> dict[str, Any]:
        """Where MaMe merging every call beats stock on the DiTs, by image tokens (batch 1):
        over every family measured (one threshold ships for all), and per family."""
        rows = [r for r in self.rows if r["mode"] == DIT_MODE and r["method"] == DIT_EVERY and r.get("speedup")]
        if not rows:
            return {}
        found = {"all families": crossover([(r["latent_tokens"], r["speedup"]) for r in rows])}
        for family in dict.fromkeys(r["model"] for r in rows):
            mine = [r for r in rows if r["model"] == family]
            found[family] = crossover([(r["latent_tokens"], r["speedup"]) for r in mine])
            found[family]["settings"] = {r["setting"]: [r["latent_tokens"], r["speedup"]] for r in mine}
        found["shipped DEFAULT_DIT_MIN_IMAGE_TOKENS"] = dict(DEFAULT_DIT_MIN_IMAGE_TOKENS)
        return found

    def kernels_of(self, row: dict[str, Any]) -> int | None:
        """Kernels one forward of ``row``'s method launches: its profile (eager ones serve the
        graphs too: a replay launches the same kernels, as one graph)."""
        counts = self.payload["kernels"]
        if row["mode"] == "compiled" and row["method"] != f"{STOCK} (eager)":
            return counts.get(f"{row['model']} compiled", {}).get(row["method"])
        method = row["method"]
        if method == DEFAULTS:
            method = TORCH if row.get("merged") else STOCK
        method = method.removesuffix(" (use_rand=False)").removesuffix(" (eager)")
        return counts.get(row["model"], {}).get(method)

    # Tables.

    def summary_table(self, mode: str) -> str:
        """One line per setting: stock's ms, and each method's speed-up (error)."""
        rows = [r for r in self.rows if r["mode"] == mode]
        eager_stock = f"{STOCK} (eager)"  # the compiled rounds' reference
        methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] not in (STOCK, eager_stock)))
        lines = []
        for label in dict.fromkeys(r["setting"] for r in rows):
            group = {r["method"]: r for r in rows if r["setting"] == label}
            line = {"setting": label, "tokens": next(iter(group.values()))["latent_tokens"]}
            line["stock ms"] = _ms(group.get(STOCK, {}).get("seconds"))
            line["eager stock ms"] = _ms(group.get(eager_stock, {}).get("seconds"))
            line.update({m: _cell(group[m]) if m in group else None for m in methods})
            lines.append(line)
        if not lines:
            return ""
        columns = ["setting", "tokens", "stock ms", *(["eager stock ms"] if mode == "compiled" else []), *methods]
        return markdown_table(lines, columns, {"stock ms": ".1f", "eager stock ms": ".1f"})

    def details_table(self, mode: str) -> str:
        rows = []
        for r in self.rows:
            if r["mode"] != mode:
                continue
            low, high = _ms(r.get("min_seconds")), _ms(r.get("max_seconds"))
            rows.append({
                **r,
                "median ms": _ms(r.get("seconds")),
                "min-max ms": None if low is None else f"{low:.1f}-{high:.1f}",
                "vs eager stock": r.get("vs_eager_stock"),
                "kernels": self.kernels_of(r),
                "peak MiB": r.get("peak_mib"),
                "compile s": r.get("compile_s"),
            })
        if not rows:
            return ""
        columns = ["setting", "method", "median ms", "min-max ms", "speedup", "error", "kernels"]
        if mode == DIT_MODE:  # not profiled; merged lengths and dtypes instead
            columns[-1:] = ["tokens per block", "dtype"]
        columns += ["vs eager stock", "compile s"] if mode == "compiled" else ([] if mode == "graphs" else ["peak MiB"])
        if any(r.get("failed") for r in rows):
            columns.append("failed")
        formats = {"median ms": ".1f", "speedup": ".2f", "error": ".4f", "vs eager stock": ".2f"}
        formats.update({"compile s": ".0f", "peak MiB": ".0f"})
        return markdown_table(rows, columns, formats)

    def threshold_table(self) -> str:
        rows = []
        for mode in MODES:
            for method, found in self.payload["thresholds"].get(mode, {}).items():
                if method == "fused default":
                    continue
                fused = self.payload["thresholds"][mode]["fused default"] == method
                rows.append({
                    "mode": mode,
                    "method": method + (" (fused default)" if fused else ""),
                    "from tokens": found["min_latent_tokens"],
                    "first win": found["first_win"],
                    "speed-ups": "; ".join(
                        f"{label} ({t}) {x:.2f}x" for label, (t, x) in sorted(found["settings"].items(), key=_tokens)
                    ),
                })
        if not rows:
            return ""
        return markdown_table(rows, ["mode", "method", "from tokens", "first win", "speed-ups"])

    def dit_threshold_table(self) -> str:
        found = self.payload["thresholds"].get(DIT_MODE, {})
        rows = [
            {
                "families": name,
                "from tokens": item["min_latent_tokens"],
                "first win": item["first_win"],
                "speed-ups": "; ".join(f"{t}: {x:.2f}x" for t, x in item["points"]),
                "verdict": item["verdict"],
            }
            for name, item in found.items()
            if isinstance(item, dict) and "verdict" in item
        ]
        return markdown_table(rows, ["families", "from tokens", "first win", "speed-ups", "verdict"]) if rows else ""

    def profiles_table(self) -> str:
        columns = ["setting", "mode", "method", "kernels", "kernel_ms", "attention_share", "wall_ms"]
        formats = {"kernel_ms": ".1f", "attention_share": ".1%", "wall_ms": ".1f"}
        return markdown_table(self.payload["profiles"], columns, formats) if self.payload["profiles"] else ""

    def sections_table(self) -> str:
        formats = {"seconds": ".1f", "estimate s": ".0f", "started at s": ".0f"}
        columns = ["section", "status", "started at s", "seconds", "estimate s", "note"]
        return markdown_table(self.sections, columns, formats)

    def header(self) -> list[str]:
        env, setup, tests = self.payload["environment"], self.payload["setup"], self.payload["kernel_tests"]
        versions = ", ".join(
            f"{p} {env.get(p) or 'not installed'}" for p in ("torch", "diffusers", "transformers", "tomesd", "triton")
        )
        counts = ", ".join(f"{n} {k}" for k, n in tests.get("counts", {}).items())
        failures = "; ".join(tests.get("failures", [])[:10])
        lines = [
            "# MaMe GPU benchmark",
            "",
            f"- card: {env['device']}; driver {env.get('driver') or '?'}; CUDA {env.get('cuda') or '-'}",
            f"- {versions}; python {env.get('python')}; dtype {env.get('dtype')}",
            f"- commit: {env.get('commit')}; source sha256 {env.get('source_sha256')}",
            f"- date: {setup['date']}; budget {setup['budget']:.0f} s; "
            f"total {self.payload.get('seconds_total', 0):.0f} s",
            f"- kernel tests: {tests.get('status', 'not run')}" + (f" ({counts})" if counts else "")
            + (f"; {failures}" if failures else ""),
            f"- MaMe defaults: {setup['mame_defaults']}; shipped DEFAULT_MIN_LATENT_TOKENS {DEFAULT_MIN_LATENT_TOKENS}",
            f"- MaMe on DiTs: {setup['dit_defaults']}; shipped DEFAULT_DIT_MIN_IMAGE_TOKENS "
            f"{DEFAULT_DIT_MIN_IMAGE_TOKENS}",
            f"- latents: {setup['latents']}; random weights from the shipped configs",
            f"- command: `{env.get('command')}`",
        ]
        return lines

    def markdown(self) -> str:
        parts = [*self.header(), "", "## Sections", "", self.sections_table()]
        if self.threshold_table():
            parts += [
                "", "## Where MaMe beats stock (for DEFAULT_MIN_LATENT_TOKENS)", "",
                "from tokens: the smallest latent-token count (batch x latent h x w) from which the method beats "
                "stock at every measured size of the mode; first win: the smallest at which it beats stock at all; "
                "speed-ups: setting (latent tokens) speed-up over stock. "
                f"Suggested: {self.payload['thresholds']['suggested DEFAULT_MIN_LATENT_TOKENS']}.",
                "", self.threshold_table(),
            ]
        captions = {
            "eager": "## Eager: speed-up over eager stock (error vs eager stock)",
            "graphs": "## CUDA graphs: each call recorded once and replayed (speed-up over replayed stock, error vs "
            "eager stock)",
            "compiled": "## torch.compile, default mode (speed-up over compiled stock, error vs eager stock)",
        }
        for mode in MODES:
            if self.summary_table(mode):
                parts += ["", captions[mode], "", self.summary_table(mode), "", self.details_table(mode)]
        if self.summary_table(DIT_MODE):
            parts += [
                "", "## Diffusion transformers, eager: speed-up over stock (error vs stock)", "",
                "One transformer forward at batch 1, random weights at the real widths with a few blocks (PixArt-α 4 "
                "blocks, SD3-medium 3, Flux.1 1 double + 1 single, Wan 2.1 1.3B 2), photo latents; fp16 PixArt and "
                "SD3, bf16 Flux and Wan. tokens: image tokens per call (after patching). MaMe defaults leave calls "
                f"under {DEFAULT_DIT_MIN_IMAGE_TOKENS.get('cuda')} image tokens unmerged on CUDA; "
                f"{DIT_EVERY} and the peer merge every call.",
                "", self.summary_table(DIT_MODE), "", self.details_table(DIT_MODE),
            ]
            if self.dit_threshold_table():
                parts += [
                    "", "## Where merging pays on DiTs (for DEFAULT_DIT_MIN_IMAGE_TOKENS)", "",
                    f"from tokens: the smallest image-token count from which {DIT_EVERY} beats stock at every larger "
                    "size measured (all families together, and per family).", "", self.dit_threshold_table(),
                ]
        if self.profiles_table():
            parts += [
                "", "## Profiled forwards", "",
                "kernels: CUDA kernels one forward launches (copies and memsets not counted; off CUDA, top-level "
                "aten operations); attention_share: of the kernels' GPU time, those named like attention. The "
                "heaviest kernels are in gpu.json.", "", self.profiles_table(),
            ]
        if self.payload["notes"]:
            parts += ["", "## Notes", "", *[f"- {n}" for n in dict.fromkeys(self.payload["notes"])]]
        return "\n".join(parts)

    def stdout_summary(self) -> str:
        parts = [*self.header(), "", self.sections_table()]
        for mode in MODES:
            if self.summary_table(mode):
                parts += ["", f"## {mode}: speed-up (error)", self.summary_table(mode)]
        parts += ["", "## The smallest latent-token count (batch x h x w) from which MaMe beats stock"]
        thresholds = self.payload["thresholds"]
        for mode in MODES:
            if mode not in thresholds:
                parts.append(f"- {mode}: not measured")
            for method in (TRITON, TORCH):
                found = thresholds.get(mode, {}).get(method)
                if found:
                    fused = " (the fused default)" if thresholds[mode]["fused default"] == method else ""
                    parts.append(f"- {mode}, {method}{fused}: {found['min_latent_tokens']}; {found['verdict']}")
        parts.append(
            f"- suggested DEFAULT_MIN_LATENT_TOKENS (defaults.py): {thresholds['suggested DEFAULT_MIN_LATENT_TOKENS']}"
            f" (shipped: {DEFAULT_MIN_LATENT_TOKENS}; None: the fused default beat stock at no size up to the largest)"
        )
        if self.summary_table(DIT_MODE):
            parts += ["", "## diffusion transformers: speed-up (error)", self.summary_table(DIT_MODE)]
        for name, item in thresholds.get(DIT_MODE, {}).items():
            if isinstance(item, dict) and "verdict" in item:
                parts.append(f"- DiTs, {DIT_EVERY}, {name}: from {item['min_latent_tokens']} image tokens; "
                             f"{item['verdict']}")
        if DIT_MODE in thresholds:
            parts.append(f"- shipped DEFAULT_DIT_MIN_IMAGE_TOKENS: {DEFAULT_DIT_MIN_IMAGE_TOKENS}")
        return "\n".join(parts + [""] + [f"- {n}" for n in dict.fromkeys(self.payload["notes"])])


# -- the benchmark ----------------------------------------------------------------------------


class Benchmark:
    """The sections, the models they share, and the budget."""

    def __init__(self, args: argparse.Namespace, started: float) -> None:
        self.args = args
        self.started = started
        self.device = torch.device(args.device)
        self.on_cuda = self.device.type == "cuda"
        self.dtype = torch.float16 if self.on_cuda else torch.float32
        self.quick = args.quick
        self.budget = args.budget if args.budget is not None else (QUICK_BUDGET if args.quick else DEFAULT_BUDGET)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        #: Per model: its patched copies (one per method) and the methods whose patch failed.
        self.pools: dict[str, tuple[dict[str, torch.nn.Module], dict[str, str]]] = {}
        self.pool_users: Counter = Counter()
        self._inputs: dict[tuple[str, int, int], dict[str, Any]] = {}
        self._compiled: dict[str, torch.nn.Module] = {}  # name -> compiled copy (compiled_setting's model)
        self._profiled: set[str] = set()
        self._latents_kind: set[str] = set()
        env = environment(self.device, self.dtype)
        env.update(triton=package_version("triton"), cuda=torch.version.cuda, **_provenance(self.on_cuda))
        self.report = Report(self.out, {
            "_started": started,
            "environment": env,
            "setup": {
                "device": str(self.device),
                "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "budget": self.budget,
                "quick": self.quick,
                "latents": "not yet drawn",
                "mame_defaults": repr(MaMeConfig()),
                "dit_defaults": repr(DiTMaMeConfig()),
                "mame_variants": args.mame_variant,
                "compile_backend": args.compile_backend,
            },
            "kernel_tests": {},
            "rows": [],  # one per (mode, setting, method)
            "profiles": [],  # one profiled forward per (model, method), and per compiled model
            "kernels": {},  # model -> method -> kernels per forward
            "notes": [],
        })
        if not self.on_cuda:
            self.note("not on CUDA: the graph sections call the models eagerly, the profiles count aten operations "
                      "(a check of the script only)")
        self.note("tomesd runs with max_downsample=2 (its default merges nothing on SDXL); in graphs with "
                  "use_rand=False (a graph cannot record its own generator's draws)")

    # Time and housekeeping.

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
        if self.on_cuda:
            torch.cuda.empty_cache()

    # Models and inputs.

    def triton(self) -> bool:
        allowed, why = triton_allowed(self.on_cuda, self.report.payload["kernel_tests"])
        if why:
            self.note(f"MaMe triton: {why}" + ("" if allowed else "; no triton rows"))
        return allowed

    def pool(self, model: str) -> tuple[dict[str, torch.nn.Module], dict[str, str]]:
        """One patched copy per method of ``model``'s architecture, built once and kept for
        every section that uses it."""
        if model not in self.pools:
            self.free()
            base = build_unet(model, dtype=self.dtype, device=self.device)
            methods = all_methods(triton=self.triton(), variants=self.args.mame_variant)
            self.pools[model] = patched_copies(base, methods)
            del base
        return self.pools[model]

    def dit_pool(self, setting: DiTSetting) -> tuple[dict[str, torch.nn.Module], dict[str, str]]:
        """One patched copy per DiT method of ``setting``'s family (its real width, a few blocks;
        tiny with --quick), built once for the family's sections."""
        if setting.model not in self.pools:
            self.free()
            subject = (DIT_QUICK if self.quick else DIT_SUBJECTS)[setting.family]
            dtype = getattr(torch, setting.dtype) if self.on_cuda else torch.float32
            base = subject.build(dtype=dtype, device=self.device)
            stock, defaults = dit_methods()
            methods = [replace(stock, name=STOCK), replace(defaults, name=DEFAULTS),
                       replace(dit_methods(min_image_tokens=0)[1], name=DIT_EVERY)]
            peer = peer_method(min_image_tokens=0)
            if peer is None:
                self.note("tomesd is not installed: no ToMe bipartite rows on the DiTs")
            else:
                methods.append(replace(peer, name=DIT_PEER))
            self.pools[setting.model] = patched_copies(base, methods)
            del base
        return self.pools[setting.model]

    def inputs(self, setting: Setting, model: torch.nn.Module) -> dict[str, Any]:
        """The UNet call's inputs, with photo latents where scikit-image is importable (merging
        then sees real image statistics), else seeded noise (the same cost)."""
        key = (setting.model, setting.resolution, setting.batch)
        if key not in self._inputs:
            self._inputs.clear()  # one size at a time: eager, then graphs
            try:
                from mame_diffusers.benchmarking.photos import photo_latent_batch

                latents = photo_latent_batch(setting.latent_hw, setting.batch)
                self._latents_kind.add("photo (scikit-image photographs, fixed projection)")
            except ImportError:
                latents = torch.randn(setting.batch, 4, *setting.latent_hw, generator=torch.Generator().manual_seed(0))
                self._latents_kind.add("seeded noise (scikit-image not importable)")
            self.report.payload["setup"]["latents"] = " and ".join(sorted(self._latents_kind))
            self._inputs[key] = unet_inputs(model, setting.latent_hw, latents=latents)
        return self._inputs[key]

    def profile(self, label: str, mode: str, model_key: str, method: str, call: Callable[[], object]) -> None:
        """One profiled forward: kernels per forward (kept for the tables), attention's share."""
        entry: dict[str, Any] = {"setting": label, "mode": mode, "method": method}
        try:
            entry.update(profile_call(call, self.device))
        except Exception as error:  # the timings stand without it
            entry["failed"] = _describe(error)
        self.report.payload["profiles"].append(entry)
        if entry.get("kernels") is not None:
            self.report.payload["kernels"].setdefault(model_key, {})[method] = entry["kernels"]

    # Sections.

    def plan(self) -> list[Section]:
        """Every section, in order; extend here (e.g. diffusion transformers)."""
        return [
            *self.test_sections(),
            *self.unet_sections(unet_settings(self.quick)),
            *self.dit_sections(dit_settings(self.quick)),
            *self.compiled_sections(),
        ]

    def test_sections(self) -> list[Section]:
        return [Section("kernel tests", KERNEL_TESTS_ESTIMATE if self.on_cuda else 2, self.kernel_tests)]

    def unet_sections(self, settings: list[Setting]) -> list[Section]:
        copies = all_methods(triton=kernels.available() and self.on_cuda, variants=self.args.mame_variant)
        methods = len(mode_methods("eager", [m.name for m in copies]))  # graphs time as many
        profile_s = 0.5 if self.quick else 1.5  # one profiled forward
        sections, seen = [], set()
        for s in settings:
            first = s.model not in seen
            seen.add(s.model)
            setup = 0.0
            if first:  # building the copies (H200 runs 1-2: 5-10 s), profiling each method once,
                # triton's JIT compiling the kernels for the model's shapes
                setup = (3 if self.quick else 10 if s.sdxl else 6) + methods * profile_s
                setup += 15 if self.on_cuda and kernels.available() else 0
            eager = setup + 2 + (s.warmup + s.repeats) * methods * s.per_call
            # Graphs: two warm-up calls and the recorded one per method (none off CUDA), eager
            # stock as the reference, then rounds of replays.
            recording = (3 * methods * s.per_call + 0.3 * methods) if self.on_cuda else 0.0
            graphs = 2 + recording + s.per_call + (s.warmup + s.graph_repeats) * methods * s.replay
            sections.append(Section(f"eager {s.label}", eager, lambda s=s: self.timing(s, "eager"), s.model))
            sections.append(Section(f"graphs {s.label}", graphs, lambda s=s: self.timing(s, "graphs"), s.model))
        return sections

    def dit_sections(self, settings: list[DiTSetting]) -> list[Section]:
        """One section per DiT setting; the first of a family builds its copies."""
        sections = []
        for s in settings:
            estimate = s.setup + 1 + (s.warmup + s.repeats + 2) * 4 * s.per_call  # 4 methods, + 2 untimed calls each
            sections.append(Section(f"dit {s.label}", estimate, lambda s=s: self.dit_timing(s), s.model))
        return sections

    def compiled_sections(self) -> list[Section]:
        setting = compiled_setting(self.quick)
        if not self.quick:
            estimates = (90.0, 65.0, 100.0)  # H200 run 2: stock 56 s
        elif self.args.compile_backend == "inductor":  # minutes on a CPU even for the tiny UNet
            estimates = (300.0, 200.0, 300.0)
        else:
            estimates = (40.0, 20.0, 40.0)
        # The fused default first (MaMe triton where its copy exists, else MaMe torch): compiled,
        # against eager stock alone, it says the most.
        runs = (lambda: self.compiled(setting, self.fused(setting)), lambda: self.compiled(setting, STOCK),
                lambda: self.compiled(setting, TORCH))
        names = ("compiled fused default", f"compiled {STOCK}", f"compiled {TORCH}")
        return [Section(n, e, r, setting.model) for n, e, r in zip(names, estimates, runs)]

    def fused(self, setting: Setting) -> str:
        return TRITON if TRITON in self.pool(setting.model)[0] else TORCH

    def run(self) -> bool:
        """Run every section that the selection and the budget allow; ``True`` when the alarm
        stopped the run."""
        selected = [s.strip() for s in self.args.only.split(",")] if self.args.only else None
        plan = self.plan()
        self.pool_users = Counter(s.model for s in plan if s.model)
        stopped = False
        for section in plan:
            entry: dict[str, Any] = {"section": section.name, "estimate s": section.estimate}
            self.report.sections.append(entry)
            try:
                if selected is not None and not any(s and s in section.name for s in selected):
                    entry.update(status="not selected", note="--only")
                elif stopped:
                    entry.update(status="skipped", note="the alarm stopped the run")
                elif self.remaining() < section.estimate:
                    entry.update(status="skipped", note=f"budget: {max(self.remaining(), 0):.0f} s left, "
                                 f"needs ~{section.estimate:.0f} s")
                    self.log(f"skip {section.name}: {entry['note']}")
                else:
                    stopped = self.run_section(section, entry)
            finally:
                self.release(section.model)
        self.report.write()
        return stopped

    def run_section(self, section: Section, entry: dict[str, Any]) -> bool:
        entry["started at s"] = self.elapsed()
        self.log(f"{section.name} (estimate {section.estimate:.0f} s)")
        start, stopped = time.perf_counter(), False
        try:
            note = section.run()
            entry.update(status="ok", **({"note": note} if note else {}))
        except SectionSkipped as reason:
            entry.update(status="skipped", note=str(reason))
            self.log(f"skip {section.name}: {reason}")
        except BudgetExceeded:
            entry.update(status="stopped", note="the time budget ran out while it ran")
            stopped = True
        except Exception as error:  # recorded; the next section still runs
            entry.update(status="error", note=_describe(error), traceback=traceback.format_exc(limit=-12))
            self.log(f"{section.name} failed: {_describe(error)}")
        entry["seconds"] = time.perf_counter() - start
        self.free()
        self.report.write()
        return stopped

    def release(self, model: str | None) -> None:
        """Drop ``model``'s copies (and compiled wrappers) after the last section that uses it."""
        if model is None:
            return
        self.pool_users[model] -= 1
        if self.pool_users[model] <= 0 and model in self.pools:
            del self.pools[model]
            if model == compiled_setting(self.quick).model:
                self._compiled.clear()
            self.free()

    # 1. The kernels' tests.

    def kernel_tests(self) -> str:
        """``pytest tests/test_kernels.py`` on CUDA, compiled kernels (not the interpreter);
        its output in ``OUT/kernel_tests.txt``, its outcome in the report."""
        path = self.args.kernel_tests
        if path == "none":
            raise SectionSkipped("--kernel-tests none")
        if not self.on_cuda and path == KERNEL_TESTS:
            raise SectionSkipped("on CUDA only (elsewhere they run in Triton's interpreter, with the test suite)")
        if not kernels.available():
            raise SectionSkipped("triton is not importable")
        result = self.report.payload["kernel_tests"]
        command = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", path]
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        timeout = max(1.0, min(self.args.kernel_tests_timeout, self.remaining()))
        result.update(command=" ".join(command[1:]), status="running", timeout_s=timeout)
        log = self.out / "kernel_tests.txt"
        start = time.perf_counter()
        with open(log, "w") as sink:
            # A process group of its own, so that stopping it stops the subprocesses its tests start.
            process = subprocess.Popen(
                command, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=ROOT, preexec_fn=os.setpgrp
            )
            try:
                code = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                code = None
            except BudgetExceeded:
                result["status"] = "stopped by the time budget"
                raise
            finally:  # the alarm, or the timeout: the tests stop with the section
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait()
        result.update(parse_pytest(log.read_text(errors="replace")), returncode=code)
        result["seconds"] = time.perf_counter() - start
        if code is None:
            result["status"] = f"timed out after {timeout:.0f} s"
        else:
            result["status"] = "passed" if code == 0 and result["counts"].get("passed") else "failed"
        self.log(f"  kernel tests {result['status']} ({result.get('summary') or 'no summary'}) "
                 f"in {result['seconds']:.0f} s; output in {log.name}")
        for line in result["failures"]:
            self.log(f"    {line}")
        return f"{result['status']}: {result.get('summary') or 'no summary'}"

    # 2. Eager and CUDA graphs.

    def timing(self, setting: Setting, mode: str) -> None:
        """Each method's copy at ``setting``, round by round: called eagerly, or recorded
        into a CUDA graph and replayed."""
        models, patch_errors = self.pool(setting.model)
        names = mode_methods(mode, [*models, *patch_errors])
        inputs = self.inputs(setting, models[STOCK])
        errors = {n: patch_errors[n] for n in names if n in patch_errors}
        if mode == "eager":
            rows = compare_unet_copies(
                {n: models[n] for n in names if n in models}, inputs, repeats=setting.repeats, warmup=setting.warmup
            )
        else:
            with torch.inference_mode():
                reference = call_like_a_pipeline(models[STOCK], inputs).float()
            graphed = {}
            for name in names:
                if name not in models:
                    continue
                try:
                    graphed[name] = GraphedUNet(models[name], inputs)
                except Exception as error:  # recorded in the table; the others still run
                    errors[name] = f"recording: {_describe(error)}"
                    self.free()
            rows = compare_unet_copies(
                graphed, inputs, repeats=setting.graph_repeats, warmup=setting.warmup,
                call=lambda model, _: model(), reference=reference,
            )
            del graphed
            for row in rows:  # replays allocate nothing
                for key in ("activation_mib", "peak_mib", "max_allocated_mib"):
                    row.pop(key, None)
        rows += [{"method": name, "failed": message} for name, message in errors.items()]
        graph = mode == "graphs" and self.on_cuda
        threshold = DEFAULT_MIN_LATENT_TOKENS.get("cuda-graph" if graph else self.device.type, 0)
        for row in rows:
            row.update(mode=mode, setting=setting.label, model=setting.model, resolution=setting.resolution,
                       batch=setting.batch, latent_tokens=setting.latent_tokens)
            if row["method"] == DEFAULTS:
                row["merged"] = setting.latent_tokens >= threshold
        self.report.rows.extend(rows)
        stock_ms = next((_ms(r.get("seconds")) for r in rows if r["method"] == STOCK), None) or float("nan")
        self.log(f"  stock {stock_ms:.1f} ms | " + " | ".join(f"{r['method']} {_cell(r)}" for r in rows[1:]))
        if mode == "eager" and setting.model not in self._profiled:
            self._profiled.add(setting.model)
            self.report.write()  # the timings are safe before the profiles
            for name in names:
                if name in models and name != DEFAULTS:  # it launches stock's or MaMe torch's kernels
                    self.profile(setting.label, mode, setting.model, name,
                                 lambda m=models[name]: call_like_a_pipeline(m, inputs))
            counts = self.report.payload["kernels"].get(setting.model, {})
            self.log("  kernels per forward: " + ", ".join(f"{k} {v}" for k, v in counts.items()))

    # 3. Diffusion transformers.

    def dit_timing(self, setting: DiTSetting) -> None:
        """Each method's copy of ``setting``'s DiT, eagerly, round by round, at batch 1."""
        models, patch_errors = self.dit_pool(setting)
        stock = models[STOCK]
        subject = (DIT_QUICK if self.quick else DIT_SUBJECTS)[setting.family]
        try:
            inputs = dit_inputs(stock, setting.latent, text_length=subject.text)
            self._latents_kind.add("photo (scikit-image photographs, fixed projection)")
        except ImportError:
            inputs = transformer_inputs(stock, setting.latent, text_length=subject.text)
            self._latents_kind.add("seeded noise (scikit-image not importable)")
        self.report.payload["setup"]["latents"] = " and ".join(sorted(self._latents_kind))
        tokens = merged_tokens(stock, inputs)
        rows = compare_unet_copies(models, inputs, repeats=setting.repeats, warmup=setting.warmup, call=call_dit)
        rows += [{"method": name, "failed": message} for name, message in patch_errors.items()]
        threshold = DiTMaMeConfig().token_threshold(self.device)
        for row in rows:
            row.update(mode=DIT_MODE, setting=setting.label, model=setting.family, resolution=setting.resolution,
                       frames=setting.frames, batch=1, latent_tokens=tokens,
                       dtype=str(next(stock.parameters()).dtype).replace("torch.", ""))
            if row["method"] in models and not row.get("failed"):
                row["tokens per block"] = merged_tokens(models[row["method"]], inputs)
            if row["method"] == DEFAULTS:
                row["merged"] = tokens >= threshold
        self.report.rows.extend(rows)
        stock_ms = next((_ms(r.get("seconds")) for r in rows if r["method"] == STOCK), None) or float("nan")
        self.log(f"  {tokens} image tokens; stock {stock_ms:.1f} ms | "
                 + " | ".join(f"{r['method']} {_cell(r)}" for r in rows[1:]))

    # 4. torch.compile.

    def compiled(self, setting: Setting, name: str) -> None:
        """``torch.compile`` (default mode) of ``name``'s copy: its first call (compiling),
        then every model compiled so far timed with eager stock, round by round."""
        if not self.on_cuda and self.args.compile_backend == "inductor":
            raise SectionSkipped("inductor takes minutes on a CPU (--compile-backend aot_eager checks the code)")
        models, patch_errors = self.pool(setting.model)
        if name not in models:
            raise SectionSkipped(patch_errors.get(name) or f"no {name} copy here (see the notes)")
        if name in self._compiled:
            raise SectionSkipped(f"{name} is compiled already (the fused default)")
        if name == TRITON and not kernels.traceable():
            self.note("compiled MaMe triton: this torch cannot trace the kernels; it compiles the torch path")
        self.note(f"compiled: {DEFAULTS} is not compiled: under torch.compile it leaves calls below "
                  f"{DEFAULT_MIN_LATENT_TOKENS.get('cuda')} latent tokens unmerged on CUDA (stock's graph)")
        _raise_recompile_limit()
        inputs = self.inputs(setting, models[STOCK])
        compiled = torch.compile(models[name], backend=self.args.compile_backend)
        synchronize(self.device)
        start = time.perf_counter()
        with torch.inference_mode():
            call_like_a_pipeline(compiled, inputs)
        synchronize(self.device)
        compile_s = time.perf_counter() - start
        self._compiled[name] = compiled
        self.report.payload.setdefault("compile_s", {})[name] = compile_s
        self.log(f"  compiled {name} in {compile_s:.0f} s")
        timed = {f"{STOCK} (eager)": models[STOCK], **self._compiled}
        rows = compare_unet_copies(timed, inputs, repeats=setting.repeats, warmup=setting.warmup)
        eager_stock = rows[0].get("seconds")
        compiled_stock = next((r.get("seconds") for r in rows if r["method"] == STOCK), None)
        for row in rows:
            seconds = row.get("seconds")
            row.update(mode="compiled", setting=setting.label, model=setting.model, resolution=setting.resolution,
                       batch=setting.batch, latent_tokens=setting.latent_tokens,
                       compile_s=self.report.payload["compile_s"].get(row["method"]),
                       vs_eager_stock=eager_stock / seconds if seconds and eager_stock else None,
                       speedup=compiled_stock / seconds if seconds and compiled_stock else None)
        rows[0]["speedup"] = None  # eager stock: the reference row, not a compiled method
        self.report.payload["rows"] = [r for r in self.report.rows if r["mode"] != "compiled"] + rows
        self.profile(setting.label, "compiled", f"{setting.model} compiled", name,
                     lambda: call_like_a_pipeline(compiled, inputs))
        self.log("  " + " | ".join(
            f"{r['method']} {_ms(r.get('seconds')) or float('nan'):.1f} ms ({r.get('vs_eager_stock') or 0:.2f}x eager)"
            for r in rows
        ))


def parse_pytest(output: str) -> dict[str, Any]:
    """pytest's outcome from its ``-q -rfE`` output: the counts of its last line, the failed
    and erroring tests' lines, the summary line."""
    lines = [line for line in output.strip().splitlines() if line.strip()]
    summary = next((line.strip("= ") for line in reversed(lines) if re.search(r"\d+ (passed|failed|error)", line)), "")
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)", summary)}
    failures = [line[:300] for line in lines if line.startswith(("FAILED ", "ERROR "))]
    return {"summary": summary, "counts": counts, "failures": failures, "tail": "\n".join(lines[-30:])}


def _raise_recompile_limit() -> None:
    # Each compiled copy is another instance of the same UNet class: dynamo counts their
    # graphs against one code object's limit (8 by default).
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(64, getattr(config, name)))


def _provenance(on_cuda: bool) -> dict[str, Any]:
    """The driver, the commit (``MAME_COMMIT`` where the tree has no git, as on a lent
    machine) and a digest of the package's sources, which identifies the code either way."""
    def run(*command: str) -> str | None:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=10, cwd=ROOT)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    driver = run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader") if on_cuda else None
    commit = os.environ.get("MAME_COMMIT") or run("git", "rev-parse", "HEAD")
    if commit and not os.environ.get("MAME_COMMIT"):
        changed = run("git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no")
        commit += " + uncommitted changes" if changed else ""
    digest = hashlib.sha256()
    for path in sorted([*(ROOT / "mame_diffusers").rglob("*.py"), Path(__file__)]):
        digest.update(os.path.relpath(path, ROOT).encode() + b"\0" + path.read_bytes())
    return {"driver": driver and driver.splitlines()[0], "commit": commit or "unknown (set MAME_COMMIT)",
            "source_sha256": digest.hexdigest()[:16]}


# -- the command line -------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for gpu.json, gpu.md and kernel_tests.txt")
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--budget", type=float, default=None,
        help=f"seconds from the start; sections that would end past it are skipped (default {DEFAULT_BUDGET:.0f}, "
        f"{QUICK_BUDGET:.0f} with --quick)",
    )
    parser.add_argument("--only", help="comma-separated parts of section names to run, e.g. 'tests,768 b2,compiled'")
    parser.add_argument(
        "--kernel-tests", default=KERNEL_TESTS,
        help=f"the tests of the first section (default {KERNEL_TESTS}, on CUDA only); 'none' skips them and times "
        "the kernels unchecked",
    )
    parser.add_argument("--kernel-tests-timeout", type=float, default=KERNEL_TESTS_TIMEOUT, help="seconds")
    parser.add_argument(
        "--mame-variant", type=parse_variant, action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
        help="an extra MaMe method for the eager and graph sections, e.g. block=8 (repeatable)",
    )
    parser.add_argument(
        "--compile-backend", default="inductor",
        help="torch.compile backend (inductor; 'aot_eager' checks the compiled sections' code in seconds on a CPU)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny models: check the script on any machine")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, started: float | None = None) -> int:
    """Run the benchmark; returns the exit status (0 also when sections failed or were
    skipped: the report says which; 3 when the alarm stopped it)."""
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
    print(f"\nwrote {bench.out / 'gpu.json'} and {bench.out / 'gpu.md'} in {bench.elapsed():.0f} s", flush=True)
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
