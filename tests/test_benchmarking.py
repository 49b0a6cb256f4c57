"""The measuring code: UNet inputs on the UNet's device, kernel summaries, and the GPU
benchmark script (benchmarks/gpu_benchmark.py) run end to end on tiny models, its CUDA-only
parts aside: CUDA graphs are called eagerly there, and the triton rows need CUDA."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
import torch

from mame_diffusers.benchmarking.profiling import is_attention_kernel, summarize_kernels
from mame_diffusers.offline import build_unet, unet_inputs

ROOT = Path(__file__).resolve().parents[1]


def _tensors(value, path="inputs"):
    """Every tensor in a nest of dicts, with where it sits."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{path}[{key!r}]")


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_unet_inputs_are_all_on_the_unets_device_in_its_dtype(name):
    # A UNet on the meta device stands in for one on a GPU: an input left on the CPU (the
    # timestep once was) shows up without a GPU, where it made CUDA runs fail.
    unet = build_unet(name, device="meta", dtype=torch.float16)
    latents = torch.randn(2, 4, 8, 8)  # on the CPU, as photo latents come
    for inputs in (unet_inputs(unet, (8, 8)), unet_inputs(unet, (8, 8), latents=latents)):
        found = dict(_tensors(inputs))
        assert "inputs['timestep']" in found
        if name == "tiny-sdxl":
            added = {f"inputs['added_cond_kwargs'][{key!r}]" for key in ("time_ids", "text_embeds")}
            assert added <= set(found)
        for path, tensor in found.items():
            assert tensor.device.type == "meta", f"{path} is on {tensor.device}"
            if tensor.is_floating_point():
                assert tensor.dtype == torch.float16, f"{path} is {tensor.dtype}"
        assert not inputs["timestep"].is_floating_point()


def test_kernel_summary_counts_kernels_and_attentions_share():
    records = [
        ("ampere_fp16_s16816gemm_fp16_128x128_ldg8_f2f_tn", 30.0),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", 50.0),
        ("fmha_cutlassF_f16_aligned_64x64_rf_sm80", 10.0),
        ("void at::native::elementwise_kernel<128, 2>", 10.0),
        ("Memcpy HtoD (Pageable -> Device)", 99.0),
        ("Memset (Device)", 1.0),
    ]
    summary = summarize_kernels(records)
    assert summary["kernels"] == 4 and summary["memcpy_memset"] == 2
    assert summary["kernel_ms"] == pytest.approx(0.1)
    assert summary["attention_ms"] == pytest.approx(0.06)
    assert summary["attention_share"] == pytest.approx(0.6)
    assert len(summary["attention_kernel_names"]) == 2
    assert summary["top_kernels"][0]["ms"] == pytest.approx(0.05)
    assert is_attention_kernel("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3")
    assert not is_attention_kernel("sm90_xmma_gemm_f16f16_f16f32")
    assert summarize_kernels([])["attention_share"] is None


def _gpu_benchmark():
    """``benchmarks/gpu_benchmark.py`` as a module (``benchmarks`` is no package)."""
    if "gpu_benchmark" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_benchmark", ROOT / "benchmarks" / "gpu_benchmark.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_benchmark"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["gpu_benchmark"]


def test_mame_variants_parse_to_settings():
    bench = _gpu_benchmark()
    assert bench.parse_variant("block=8") == {"block": 8}
    assert bench.parse_variant("ratio=0.9,block=8") == {"ratio": 0.9, "block": 8}
    assert bench.parse_variant("min_latent_tokens=None, keys_values_only=true, backend=triton") == {
        "min_latent_tokens": None, "keys_values_only": True, "backend": "triton",
    }
    with pytest.raises(Exception, match="key=value"):
        bench.parse_variant("4096")


def test_crossover_is_where_mame_beats_stock_at_every_larger_size():
    crossover = _gpu_benchmark().crossover
    # SD 2.1 at 512, 768 and 1024 (b2), 512 b8 (as many tokens as 1024 b2), 768 and 1024 b8.
    points = [(8192, 0.8), (18432, 1.05), (32768, 0.97), (32768, 1.1), (73728, 1.2), (131072, 1.9)]
    found = crossover(points)
    assert found["min_latent_tokens"] == 73728  # a loss at 32768 (one of two settings there)
    assert found["first_win"] == 18432
    assert "not at 32768" in found["verdict"]
    assert crossover([(8192, 1.01), (32768, 1.2)])["min_latent_tokens"] == 8192
    assert "may lie lower" in crossover([(8192, 1.01), (32768, 1.2)])["verdict"]
    assert crossover([(8192, 1.5), (32768, 0.9)])["min_latent_tokens"] is None
    assert crossover([])["min_latent_tokens"] is None


def test_triton_rows_run_only_where_the_kernels_passed_their_cuda_tests(monkeypatch):
    bench = _gpu_benchmark()
    monkeypatch.setattr(bench.kernels, "available", lambda: True)
    assert bench.triton_allowed(True, {"status": "passed"}) == (True, "")
    for status in ("failed", "timed out after 180 s", "stopped by the time budget"):
        assert bench.triton_allowed(True, {"status": status}) == (False, f"the kernels' CUDA tests {status}")
    allowed, why = bench.triton_allowed(True, {})  # --kernel-tests none, or --only without them
    assert allowed and "unchecked" in why
    assert not bench.triton_allowed(False, {"status": "passed"})[0]
    monkeypatch.setattr(bench.kernels, "available", lambda: False)
    assert not bench.triton_allowed(True, {"status": "passed"})[0]

    names = [m.name for m in bench.all_methods(triton=True, variants=[{"block": 8}])]
    assert names[:5] == ["stock", "MaMe defaults", "MaMe torch", "MaMe triton", "MaMe kv-only"]
    assert names[-1] == "MaMe block=8"
    assert "MaMe triton" not in [m.name for m in bench.all_methods(triton=False, variants=[])]
    copies = ["stock", "tomesd 0.5", "tomesd 0.5 (use_rand=False)"]
    assert bench.mode_methods("eager", copies) == ["stock", "tomesd 0.5"]
    assert bench.mode_methods("graphs", copies) == ["stock", "tomesd 0.5 (use_rand=False)"]


KERNEL_TESTS = """
import os, time

def test_runs_without_the_interpreter():
    assert "TRITON_INTERPRET" not in os.environ  # set by conftest.py here, unset for the tests

def test_fails():
    assert 1 == 2
"""


def test_gpu_benchmark_quick_writes_json_and_markdown_with_rows(tmp_path, capsys):
    # One setting eager and replayed, compiled stock (aot_eager: seconds), and a stand-in for
    # the kernels' tests, one passing, one failing.
    bench = _gpu_benchmark()
    tests = tmp_path / "test_stand_in.py"
    tests.write_text(KERNEL_TESTS)
    out = tmp_path / "out"
    status = bench.main(
        [
            "--quick", "--device", "cpu", "--out", str(out), "--budget", "170",
            "--only", "kernel tests,tiny-sd 64 b2,compiled stock", "--kernel-tests", str(tests),
            "--compile-backend", "aot_eager",
            "--mame-variant", "no_such_setting=1",  # recorded as failed; the others still run
        ]
    )
    assert status == 0
    report = json.loads((out / "gpu.json").read_text())
    status_of = {s["section"]: s["status"] for s in report["sections"]}
    for name in ("kernel tests", "eager tiny-sd 64 b2", "graphs tiny-sd 64 b2", "compiled stock"):
        assert status_of[name] == "ok", report["sections"]
    assert status_of["eager tiny-sd 64 b8"] == status_of["compiled MaMe torch"] == "not selected"

    tests_run = report["kernel_tests"]
    assert tests_run["status"] == "failed" and tests_run["counts"] == {"failed": 1, "passed": 1}
    assert len(tests_run["failures"]) == 1 and "test_fails" in tests_run["failures"][0]
    assert "1 failed, 1 passed" in (out / "kernel_tests.txt").read_text()

    rows = {(r["mode"], r["method"]): r for r in report["rows"]}
    eager = [m for mode, m in rows if mode == "eager"]
    assert eager[:4] == ["stock", "MaMe defaults", "MaMe torch", "MaMe kv-only"]
    assert rows["eager", "stock"]["error"] == 0.0 and rows["eager", "MaMe defaults"]["merged"]  # a CPU: every call
    for name in ("MaMe defaults", "MaMe torch", "MaMe kv-only"):
        row = rows["eager", name]
        assert row["speedup"] > 0 and 0 < row["error"] < 1 and row["latent_tokens"] == 2 * 8 * 8
        assert len(row["all_seconds"]) == 2 and row["min_seconds"] <= row["max_seconds"]
    assert rows["eager", "MaMe no_such_setting=1"]["failed"].split(":")[0] in ("TypeError", "ValueError")
    if report["environment"]["tomesd"] is not None:
        assert {"tomesd 0.5", "tomesd 0.75"} <= set(eager)
        assert ("graphs", "tomesd 0.5 (use_rand=False)") in rows and ("graphs", "tomesd 0.5") not in rows
    assert rows["graphs", "stock"]["error"] == 0.0 and rows["graphs", "MaMe torch"]["error"] > 0
    assert [m for mode, m in rows if mode == "compiled"] == ["stock (eager)", "stock"]
    assert rows["compiled", "stock"]["compile_s"] > 0 and rows["compiled", "stock"]["vs_eager_stock"] > 0

    kernels = report["kernels"]
    assert "MaMe defaults" not in kernels["tiny-sd"]  # stock's or MaMe torch's, as it merged
    assert kernels["tiny-sd"]["MaMe torch"] > kernels["tiny-sd"]["stock"] > 0
    assert kernels["tiny-sd compiled"]["stock"] > 0
    thresholds = report["thresholds"]
    assert thresholds["eager"]["fused default"] == "MaMe torch"  # no triton rows off CUDA
    assert thresholds["eager"]["MaMe torch"]["points"][0][0] == 128
    assert set(thresholds["suggested DEFAULT_MIN_LATENT_TOKENS"]) == {"cuda", "cuda-graph"}

    markdown = (out / "gpu.md").read_text()
    assert markdown.startswith("# MaMe GPU benchmark")
    for text in (
        "## Eager", "## CUDA graphs", "## torch.compile", "## Where MaMe beats stock", "## Profiled forwards",
        "kernel tests: failed (1 failed, 1 passed)", "| tiny-sd 64 b2 | 128 |", "| compiled MaMe torch | not ",
    ):
        assert text in markdown, text
    assert "The smallest latent-token count" in capsys.readouterr().out


def test_gpu_benchmark_skips_what_the_budget_cannot_fit(tmp_path):
    bench = _gpu_benchmark()
    assert bench.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--budget", "0"]) == 0
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["sections"] and all(s["status"] == "skipped" and "budget" in s["note"] for s in report["sections"])
    assert "| kernel tests | skipped |" in (tmp_path / "gpu.md").read_text()


def test_gpu_benchmark_alarm_stops_a_section_that_overruns_and_keeps_the_report(tmp_path, monkeypatch):
    bench = _gpu_benchmark()
    ran = []

    def plan(self):
        # A section that underestimates itself badly, and one after it.
        return [bench.Section("slow section", 0.0, lambda: time.sleep(30)),
                bench.Section("later section", 0.0, lambda: ran.append(1))]

    monkeypatch.setattr(bench.Benchmark, "plan", plan)
    monkeypatch.setattr(bench, "ALARM_GRACE", 0)
    started = time.perf_counter()
    assert bench.main(["--device", "cpu", "--out", str(tmp_path), "--budget", "2"]) == 3
    assert time.perf_counter() - started < 10 and not ran
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert [(s["section"], s["status"]) for s in report["sections"]] == [
        ("slow section", "stopped"), ("later section", "skipped"),
    ]


def test_gpu_benchmark_alarm_stops_the_kernel_tests_with_their_subprocesses(tmp_path, monkeypatch):
    bench = _gpu_benchmark()
    marker = tmp_path / "still running"
    tests = tmp_path / "test_slow.py"
    # A test whose own subprocess would write the marker after the alarm, were it left running.
    child = f"import time; time.sleep(5); open({str(marker)!r}, 'w')"
    tests.write_text(f"import subprocess, sys\n\ndef test_slow():\n    subprocess.run([sys.executable, '-c', {child!r}])\n")
    monkeypatch.setattr(bench, "ALARM_GRACE", 0)
    started = time.perf_counter()
    status = bench.main(["--quick", "--device", "cpu", "--out", str(tmp_path / "out"), "--budget", "4",
                         "--only", "kernel tests", "--kernel-tests", str(tests)])
    assert status == 3 and time.perf_counter() - started < 7
    time.sleep(max(0.0, 10 - (time.perf_counter() - started)))
    assert not marker.exists()
    report = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert report["kernel_tests"]["status"] == "stopped by the time budget"
    assert report["sections"][0]["status"] == "stopped"


def test_frontier_script_runs_quick(tmp_path):
    # The frontier that picks the defaults (docs/frontier.md), on a tiny UNet: every method
    # measured, the stock row exact, the default MaMe row merging, the plot written.
    import subprocess

    out = tmp_path / "frontier"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "frontier.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {row["method"]: row for row in json.loads(out.with_suffix(".json").read_text())["rows"]}
    assert rows["baseline (SDPA)"]["error"] == 0 and rows["MaMe (defaults)"]["error"] > 0
    assert any(name.startswith("tomesd") for name in rows)
    assert all(row["seconds"] > 0 for row in rows.values())
    assert out.with_suffix(".png").exists() and "| method |" in out.with_suffix(".md").read_text()
