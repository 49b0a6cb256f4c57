"""The measuring code: UNet inputs on the UNet's device, kernel summaries, and the GPU
benchmark script run end to end on tiny models (its CUDA-only parts aside)."""

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
    assert bench.parse_variant("min_latent_tokens=4096") == {"min_latent_tokens": 4096}
    assert bench.parse_variant("ratio=0.9,query_share=1") == {"ratio": 0.9, "query_share": 1}
    assert bench.parse_variant("min_latent_tokens=None, reuse_plans=False, anchor=pooled") == {
        "min_latent_tokens": None, "reuse_plans": False, "anchor": "pooled",
    }
    with pytest.raises(Exception, match="key=value"):
        bench.parse_variant("4096")


def test_gpu_benchmark_quick_writes_json_and_markdown_with_rows(tmp_path, capsys):
    bench = _gpu_benchmark()
    status = bench.main(
        [
            "--quick", "--device", "cpu", "--out", str(tmp_path), "--budget", "120",
            "--only", "operator,tiny-sd 64 b2",
            "--mame-variant", "no_such_setting=1",  # recorded as failed; the others still run
        ]
    )
    assert status == 0
    report = json.loads((tmp_path / "gpu.json").read_text())
    status_of = {s["section"]: s["status"] for s in report["sections"]}
    assert status_of["operator"] == "ok" and status_of["eager tiny-sd 64 b2"] == "ok"
    assert status_of["compiled stock"] == "not selected"

    assert [row["N"] for row in report["operator"]] == [256, 576, 1024]
    for row in report["operator"]:
        assert row["plan+merge ms"] > 0 and row["stock attn ms"] > 0 and row["plan+merge kernels"] > 0

    rows = {row["method"]: row for row in report["eager"]}
    assert list(rows)[0] == "stock" and rows["stock"]["error"] == 0.0
    for name in ("MaMe defaults", "MaMe query_share=1"):
        assert rows[name]["speedup"] > 0 and 0 < rows[name]["error"] < 1
        assert len(rows[name]["all_seconds"]) == 2 and rows[name]["min_seconds"] <= rows[name]["max_seconds"]
    if report["environment"]["tomesd"] is not None:
        assert "tomesd 0.5" in rows and "tomesd 0.75" in rows
    assert rows["MaMe no_such_setting=1"]["failed"].startswith("TypeError")
    profiled = {(p["method"], p["kind"]) for p in report["profiler"]}
    assert profiled == {("stock", "CPU aten ops"), ("MaMe defaults", "CPU aten ops")}

    markdown = (tmp_path / "gpu.md").read_text()
    assert markdown.startswith("# MaMe GPU benchmark")
    for title in ("## 1. Operator", "## 2. Eager UNet", "### Eager UNet: times and memory", "## 3. Profiler"):
        assert title in markdown
    assert "| tiny-sd 64 b2 |" in markdown and "failed: TypeError" in markdown
    assert "## eager UNet: speed-up (error)" in capsys.readouterr().out


def test_gpu_benchmark_skips_what_the_budget_cannot_fit(tmp_path):
    bench = _gpu_benchmark()
    assert bench.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--budget", "0"]) == 0
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["sections"] and all(s["status"] == "skipped" and "budget" in s["note"] for s in report["sections"])
    assert "| operator | skipped |" in (tmp_path / "gpu.md").read_text()


def test_gpu_benchmark_alarm_stops_a_section_that_overruns_and_keeps_the_report(tmp_path, monkeypatch):
    bench = _gpu_benchmark()
    ran = []

    def plan(self):
        # A section that underestimates itself badly, and one after it.
        return [("slow section", 0.0, lambda: time.sleep(30)), ("later section", 0.0, lambda: ran.append(1))]

    monkeypatch.setattr(bench.Benchmark, "plan", plan)
    monkeypatch.setattr(bench, "ALARM_GRACE", 0)
    started = time.perf_counter()
    assert bench.main(["--device", "cpu", "--out", str(tmp_path), "--budget", "2"]) == 3
    assert time.perf_counter() - started < 10 and not ran
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert [(s["section"], s["status"]) for s in report["sections"]] == [
        ("slow section", "stopped"), ("later section", "skipped"),
    ]
