"""The Triton kernels (``backend="triton"``) against the torch path, run in Triton's
interpreter on a CPU (``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` where there is no GPU).

The interpreter runs each program's Python one operation at a time, so the cases here are
small: grids of 16 to 32 tokens a side, 8 to 40 channels, tiny UNets. What only Triton's
compiler can check (that the kernels compile for real GPUs, and how torch.compile traces
them there) runs in subprocesses with the interpreter off.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from mame_diffusers import apply_mame, remove_mame  # noqa: E402
from mame_diffusers.diffusers_integration import MaMeConfig, self_attention_modules  # noqa: E402
from mame_diffusers.merging import (  # noqa: E402
    MergePlan,
    OperatorSettings,
    kernels,
    merge_layout,
    plan_on_layout,
)
from mame_diffusers.merging import plan as plan_module  # noqa: E402
from mame_diffusers.offline import build_unet, unet_config, unet_inputs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

#: Tolerances per dtype: float32 differs from the torch path in the order of sums only; half
#: precision also in where it rounds (the kernels round a float32 mean once, the torch path
#: multiplies by rounded weights), and Triton's interpreter truncates float32 to bfloat16.
TOLERANCES = {
    torch.float32: {"merge": (1e-5, 1e-6), "weights": (0.0, 1e-4), "restore": (1e-4, 2e-4), "bias": (0.0, 1e-6)},
    torch.float16: {"merge": (2e-3, 2e-3), "weights": (0.0, 2e-3), "restore": (1e-2, 1e-2), "bias": (1e-3, 1e-3)},
    torch.bfloat16: {"merge": (2e-2, 2e-2), "weights": (0.0, 2e-2), "restore": (5e-2, 5e-2), "bias": (1e-2, 1e-2)},
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    rtol, atol = TOLERANCES[dtype][what]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def reference_slots(x: torch.Tensor, layout, tolerance: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """The ranked slots of ``x`` computed in float64 (test-only sorts and gathers), ``(B, N)``,
    and ``(B, blocks)``: whether a block holds a near-tie (two scores within ``tolerance``
    that decide which sources merge, or a merging token's best two staying tokens), where
    float32 rounding may choose the other way."""
    blocks = layout.to_blocks(x.double())
    unit = F.normalize(blocks, dim=-1)
    similarity = unit @ unit.transpose(-1, -2)
    destination = layout.constant("destination", x.device, torch.bool)
    best = torch.where(destination, similarity, -math.inf).amax(dim=-1)
    best = torch.where(destination, -math.inf, best)
    order = best.argsort(dim=-1, descending=True, stable=True)  # ties: the earlier first
    merging = layout.tokens_per_block - layout.slots_per_block
    merges = torch.zeros_like(best, dtype=torch.bool).scatter_(-1, order[..., :merging], True)
    ranked = best.gather(-1, order)
    rank_gap = ranked[..., merging - 1] - ranked[..., merging]
    stays = ~merges
    among_staying = torch.where(stays[..., None, :], similarity, -math.inf)
    top = among_staying.topk(2, dim=-1).values
    choice_gap = torch.where(merges, top[..., 0] - top[..., 1], math.inf).amin(dim=-1)
    position = stays.long().cumsum(dim=-1) - 1
    slots = torch.where(merges, position.gather(-1, among_staying.argmax(dim=-1)), position)
    slots = layout.from_blocks(slots[..., None])[..., 0].to(torch.int32)
    return slots, (rank_gap < tolerance) | (choice_gap < tolerance)


def torch_plan_with_slots(x: torch.Tensor, layout, slot_index: torch.Tensor, monkeypatch) -> MergePlan:
    """The torch path's plan of ``x`` given the kernels' slots: merge, sizes, bias and the
    restore's fit compared without the plan's near-ties."""
    slots = layout.to_blocks(slot_index[..., None].to(torch.float32))[..., 0]
    with monkeypatch.context() as patch:
        patch.setattr(plan_module, "ranked_block_slots", lambda *args: slots)
        return plan_on_layout(x, layout)


CASES = [
    # grid, ratio, channels, batch, dtype, block: 4 blocks of 16 x 16 with 8 x 8 slots (the
    # default ratio); K = 128, the most the kernels take, with 8 channels (one chunk, padded);
    # blocks of 16 x 12 (T = 192, not a power of two); half precision; bfloat16 with 5 x 5
    # slots; blocks of 8 with 40 channels (two chunks); batch 8 with 2 x 3 slots.
    ((32, 32), 0.75, 16, 2, torch.float32, 16),
    ((32, 32), 0.5, 8, 1, torch.float32, 16),
    ((16, 24), 0.75, 24, 3, torch.float32, 16),
    ((32, 32), 0.75, 32, 2, torch.float16, 16),
    ((32, 32), 0.9, 24, 2, torch.bfloat16, 16),
    ((24, 24), 0.6, 40, 1, torch.float16, 8),
    ((16, 16), 0.9, 8, 8, torch.float32, 8),
]


@pytest.mark.parametrize("hw,ratio,channels,batch,dtype,block", CASES)
def test_kernels_plan_merge_fit_and_restore_as_the_torch_path(hw, ratio, channels, batch, dtype, block, monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(batch, hw[0] * hw[1], channels, device=DEVICE).to(dtype)
    layout = merge_layout(hw, ratio, block=block)
    assert kernels.supports(layout) and not layout.padded and layout.num_blocks > 1
    plan = kernels.plan_slots(x, layout)
    assert plan.slot_index.dtype == torch.int32 and plan.batch_size == batch
    assert plan.num_merged == layout.num_merged and plan.merged_hw == layout.merged_hw

    # The plan: the same slots as the torch path, on random tokens; near-ties aside, the
    # same as in float64.
    expected, near_tie = reference_slots(x, layout)
    agree = layout.to_blocks((plan.slot_index == expected)[..., None])[..., 0].all(dim=-1)
    assert (agree | near_tie).all(), "a block without a near-tie was planned otherwise"
    assert agree.float().mean() >= 0.9
    reference = plan_on_layout(x, layout)
    if dtype == torch.float32:
        torch_slots = reference.assignment.float().argmax(dim=-1)
        assert torch.equal(plan.slot_index.long(), layout.from_blocks(torch_slots[..., None])[..., 0])

    # Merge, sizes, bias and restore with those slots.
    reference = torch_plan_with_slots(x, layout, plan.slot_index, monkeypatch)
    merged = plan.merge(x)
    assert merged.dtype == dtype and merged.shape == (batch, layout.num_merged, channels)
    assert_close(merged, reference.merge(x), dtype, "merge")
    assert plan.sizes.dtype == torch.float32 and torch.equal(plan.sizes, reference.sizes)
    assert plan.sizes.sum(dim=-1).eq(layout.num_tokens).all()
    for bias_dtype in {dtype, torch.float32}:
        bias = plan.attention_bias(bias_dtype)
        assert bias.dtype == bias_dtype
        assert_close(bias, reference.attention_bias(bias_dtype), bias_dtype, "bias")
    # Another tensor on the same grid (a UNet level's next block), with other channels.
    other = torch.randn(batch, layout.num_tokens, 8, device=DEVICE).to(dtype)
    assert_close(plan.merge(other), reference.merge(other), dtype, "merge")
    assert_close(plan.restore_weights, reference.restore_weights, dtype, "weights")
    assert torch.allclose(plan.restore_weights.sum(dim=-1), torch.ones(()), atol=1e-4)  # affine
    outputs = torch.randn(batch, layout.num_merged, channels + 3, device=DEVICE).to(dtype)
    restored = plan.restore(outputs)
    assert restored.dtype == dtype and restored.shape == (batch, layout.num_tokens, channels + 3)
    assert_close(restored, reference.restore(outputs), dtype, "restore")


def test_tied_and_zero_tokens_plan_as_the_torch_path():
    # Repeated tokens tie exactly in both paths: ranks and choices break ties by token
    # order alike. All-zero blocks have zero means, which the fit keeps finite.
    torch.manual_seed(1)
    layout = merge_layout((32, 32), 0.75)
    x = torch.randn(2, 1024, 16, device=DEVICE)
    x[0, 300:700] = x[0, :1]
    x[1] = x[1, :1]
    x[1, 512:] = 0.0  # the lower two blocks of the second image
    plan = kernels.plan_slots(x, layout)
    reference = plan_on_layout(x, layout)
    slots = layout.from_blocks(reference.assignment.float().argmax(dim=-1)[..., None])[..., 0]
    assert torch.equal(plan.slot_index.long(), slots)
    restored = plan.restore(plan.merge(x))
    assert torch.isfinite(plan.restore_weights).all() and torch.isfinite(restored).all()
    torch.testing.assert_close(restored, reference.restore(reference.merge(x)), rtol=1e-4, atol=1e-4)
    assert restored[1, 512:].abs().max() == 0.0


def test_merging_the_planned_tokens_again_reuses_the_first_merge(monkeypatch):
    launched = []
    launch = kernels._launch
    monkeypatch.setattr(kernels, "_launch", lambda kernel, *a: launched.append(kernel.__name__) or launch(kernel, *a))
    layout = merge_layout((32, 32), 0.9)
    x = torch.randn(1, 1024, 8, device=DEVICE)
    plan = kernels.plan_slots(x, layout)
    merged = plan.merge(x)
    assert plan.merge(x) is merged
    out = plan.restore(merged * 2)
    plan.restore(merged)  # the fit is made once per plan
    plan.merge(x + 1)  # another tensor: merged
    assert launched == ["_plan_kernel", "_merge_kernel", "_fit_kernel", "_restore_kernel", "_restore_kernel",
                        "_merge_kernel"]
    assert out.shape == x.shape
    # A restore before any merge merges the planned tokens first, for the fit's means.
    launched.clear()
    plan = kernels.plan_slots(x, layout)
    plan.restore(merged)
    assert plan.merge(x) is plan._source_merged
    assert launched == ["_plan_kernel", "_merge_kernel", "_fit_kernel", "_restore_kernel"]


def test_supported_layouts():
    config, kv_only = MaMeConfig(), MaMeConfig(keys_values_only=True)
    # Every SD/SDXL latent grid from 512 to 2048 at the default ratios (levels down to an
    # eighth of the latent), and SDXL's stack merges.
    for side in (64, 96, 128, 32, 48, 16 * 12, 24, 256):
        for ratio in (config.query_ratio, kv_only.kv_ratio, config.stack_ratio):
            layout = merge_layout((side, side), ratio)
            assert kernels.supports(layout) == (layout.num_blocks > 1), layout
    assert kernels.supports(merge_layout((64, 96), 0.75))  # non-square latents
    assert not kernels.supports(merge_layout((13, 13), 0.75, block=8))  # padded blocks
    assert not kernels.supports(merge_layout((64, 64), 0.75, block=None))  # global: bipartite rounds
    assert not kernels.supports(merge_layout((16, 16), 0.75))  # one block: bipartite rounds
    assert not kernels.supports(merge_layout((32, 32), 0.3))  # K = 176 > MAX_SLOTS
    assert not kernels.supports(merge_layout((64, 64), 0.75, block=32))  # T = 1024
    assert not kernels.supports(merge_layout((32, 32), 0.0))  # nothing merges


def test_unsupported_inputs_raise():
    layout = merge_layout((32, 32), 0.75)
    x = torch.randn(1, 1024, 8, device=DEVICE)
    with pytest.raises(ValueError, match="at least two blocks"):
        kernels.plan_slots(torch.randn(1, 169, 8, device=DEVICE), merge_layout((13, 13), 0.75))
    with pytest.raises(ValueError, match="unweighted tokens only"):
        kernels.plan_slots(x, layout, sizes=torch.ones(1, 1024, device=DEVICE))
    with pytest.raises(ValueError, match="must have shape"):
        kernels.plan_slots(x[:, :1000], layout)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        kernels.plan_slots(x.double(), layout)
    plan = kernels.plan_slots(x, layout)
    with pytest.raises(ValueError, match="merge expects"):
        plan.merge(x[:, :1000])
    with pytest.raises(ValueError, match="restore expects"):
        plan.restore(x)


def test_backend_errors_name_what_is_missing(monkeypatch):
    # No backward pass: tensors that want a gradient are refused (under no_grad they pass).
    layout = merge_layout((32, 32), 0.9)
    x = torch.randn(1, 1024, 8, device=DEVICE, requires_grad=True)
    with pytest.raises(RuntimeError, match="no backward pass"):
        kernels.plan_slots(x, layout)
    with torch.no_grad():
        plan = kernels.plan_slots(x, layout)
    with pytest.raises(RuntimeError, match="no backward pass"):
        plan.merge(x)
    if DEVICE == "cpu":  # CPU tensors outside the interpreter
        monkeypatch.setattr(kernels, "interpreted", lambda: False)
        with pytest.raises(RuntimeError, match="runs on CUDA tensors"):
            kernels.plan_slots(x.detach(), layout)
        with pytest.raises(RuntimeError, match="runs on CUDA tensors"):
            plan.restore(torch.zeros(1, layout.num_merged, 8))
    monkeypatch.setattr(kernels, "triton", None)
    with pytest.raises(ValueError, match="needs the triton package"):
        MaMeConfig(backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        MaMeConfig(backend="cuda")


def test_auto_backend_takes_the_kernels_only_where_they_can_run(monkeypatch):
    # backend="auto": the kernels for CUDA tensors that want no gradient; the torch path for
    # anything else, and never an error. backend="triton": the kernels wherever the layout
    # allows. Layouts the kernels do not take: the torch path, for both.
    from torch._subclasses.fake_tensor import FakeTensorMode

    taken = []
    monkeypatch.setattr(kernels, "plan_slots", lambda *a, **k: taken.append("kernels"))
    monkeypatch.setattr(OperatorSettings, "plan_on", lambda *a, **k: taken.append("torch"))
    layout = merge_layout((32, 32), 0.75)
    with FakeTensorMode():  # CUDA tensors without a GPU: shapes only
        on_cuda = torch.empty(1, 1024, 8, device="cuda")
    on_cpu = torch.randn(1, 1024, 8)
    auto = MaMeConfig(backend="auto")
    for tokens, grad, expected in [
        (on_cuda, False, "kernels"),
        (on_cpu, False, "torch"),  # even where the interpreter could run them: tests only
        (on_cuda.requires_grad_(), True, "torch"),  # training: the differentiable path
        (on_cuda, False, "kernels"),  # the same tensor, under no_grad
    ]:
        with torch.set_grad_enabled(grad):
            auto.plan_on(tokens, layout)
        assert taken.pop() == expected
    triton = MaMeConfig(backend="triton")
    assert triton.plan_on(on_cpu, layout) is None and taken.pop() == "kernels"
    for config in (auto, triton):
        config.plan_on(on_cuda.detach(), merge_layout((16, 16), 0.75))  # one block
        assert taken.pop() == "torch"
    MaMeConfig(backend="torch").plan_on(on_cuda.detach(), layout)
    assert taken.pop() == "torch"
    monkeypatch.setattr(kernels, "triton", None)  # triton missing: auto decides when built
    MaMeConfig(backend="auto").plan_on(on_cuda.detach(), layout)
    assert taken.pop() == "torch"


# -- whole UNets -----------------------------------------------------------------------------

UNETS = [
    # tiny SD at 32 x 32: its first level (4 blocks of 16 x 16) on the kernels, the second (one
    # block: bipartite rounds) on the torch path, in one forward.
    ("tiny-sd", (32, 32), 1, {}),
    # SDXL's shape in blocks of 4: both levels on the kernels, the lower one's 2-block
    # transformers merged as deep stacks (plan, merge, fit and restore around the stack).
    ("tiny-sdxl", (32, 32), 1, {"block": 4}),
]


@pytest.mark.parametrize("name,hw,batch,settings", UNETS)
def test_unets_with_the_triton_backend_match_the_torch_backend(name, hw, batch, settings, monkeypatch):
    monkeypatch.setattr("mame_diffusers.diffusers_integration.patching.STACK_MIN_LAYERS", 2)
    launched = Counter()
    launch = kernels._launch
    monkeypatch.setattr(kernels, "_launch", lambda kernel, *a: launched.update([kernel.__name__]) or launch(kernel, *a))
    unet = build_unet(name, seed=0).to(DEVICE)
    inputs = unet_inputs(unet, hw, batch=batch)
    outputs = {}
    for backend in ("torch", "triton", "auto"):
        apply_mame(unet, backend=backend, min_latent_tokens=0, **settings)
        try:
            with torch.no_grad():
                outputs[backend] = unet(**inputs).sample
        finally:
            remove_mame(unet)
    with torch.no_grad():
        stock = unet(**inputs).sample
    assert not torch.equal(outputs["torch"], stock)  # it merged
    assert all(launched[f"_{step}_kernel"] for step in ("plan", "merge", "fit", "restore"))  # with the kernels
    torch.testing.assert_close(outputs["triton"], outputs["torch"], rtol=1e-4, atol=1e-5)
    # "auto": the kernels on CUDA, the torch path on a CPU.
    assert torch.equal(outputs["auto"], outputs["triton" if DEVICE == "cuda" else "torch"])


def meta_unet(name: str) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(unet_config(name))


def test_the_kernels_add_launches_per_merged_call_and_no_aten_operation():
    # Whole forwards on the meta device (nothing runs; every operation is counted): tiny SD
    # at 64 x 64 merges both levels with the kernels. Per level a plan for the queries and
    # one for the keys and values (the default query share 0.5 merges them to different
    # lengths; keys_values_only: one) and one fit where queries restore; per merged
    # self-attention a merge per plan (and one restore); no ATen operation beyond stock's.
    from mame_diffusers.benchmarking.ops import unet_forward_ops

    unet = meta_unet("tiny-sd")
    inputs = unet_inputs(unet, (64, 64))
    attentions = len(self_attention_modules(unet))
    stock = unet_forward_ops(unet, inputs)
    for settings, restores in (({}, True), ({"keys_values_only": True}, False)):
        fused = unet_forward_ops(unet, inputs, {"backend": "triton", **settings})
        launches = Counter({name: fused.pop(name) for name in list(fused) if name.startswith("triton::")})
        plans = 2 if restores else 1
        assert launches == Counter({
            "triton::plan_kernel": 2 * plans, "triton::fit_kernel": 2 * restores,
            "triton::merge_kernel": attentions * plans, "triton::restore_kernel": attentions * restores,
        })
        assert sum(fused.values()) <= sum(stock.values()), fused - stock
        assert not fused - stock  # no operation stock does not run


@pytest.mark.parametrize("name,resolution", [("sd21", 768), ("sdxl", 1024)])
def test_full_size_unets_stay_within_five_percent_of_stock_operations(name, resolution):
    # The launch budget of benchmarks/launch_count.py: SD 2.1 at 768 and SDXL at 1024, batch 2,
    # default settings, merging every call.
    from mame_diffusers.benchmarking.ops import unet_forward_ops

    unet = meta_unet(name)
    inputs = unet_inputs(unet, (resolution // 8, resolution // 8), batch=2)
    stock = sum(unet_forward_ops(unet, inputs).values())
    fused = unet_forward_ops(unet, inputs, {"backend": "triton"})
    assert any(op.startswith("triton::") for op in fused)
    assert sum(fused.values()) <= 1.05 * stock, (sum(fused.values()), stock)


# -- torch.compile -------------------------------------------------------------------------


@pytest.mark.parametrize("name,hw,settings", [
    ("tiny-sd", (64, 64), {}),
    ("tiny-sdxl", (32, 32), {"block": 4}),  # with deep stacks' merges and restores
])
def test_compiled_unets_launch_the_kernels_from_one_graph(name, hw, settings, monkeypatch):
    # Under torch.compile the kernels are operators (torch.ops.mame_diffusers) in the one
    # graph, as many of each as an eager forward launches. Traced on the meta device: the
    # graph's shape is the point here, its values the next test's.
    from .graphs import assert_one_graph

    monkeypatch.setattr("mame_diffusers.diffusers_integration.patching.STACK_MIN_LAYERS", 2)
    launched = Counter()
    launch = kernels._launch
    monkeypatch.setattr(kernels, "_launch", lambda kernel, *a: launched.update([kernel.__name__]) or launch(kernel, *a))
    unet = meta_unet(name)
    inputs = unet_inputs(unet, hw)
    apply_mame(unet, backend="triton", min_latent_tokens=0, **settings)
    try:
        with torch.no_grad():
            unet(**inputs)
            graph = assert_one_graph(unet, **inputs)
    finally:
        remove_mame(unet)
    operators = Counter(
        str(node.target).removesuffix(".default") for node in graph.graph.nodes if "mame_diffusers" in str(node.target)
    )
    assert operators == Counter({
        f"mame_diffusers.{step}_slots": launched[f"_{step}_kernel"] for step in ("plan", "merge", "fit", "restore")
    })
    assert operators["mame_diffusers.merge_slots"] >= 2 and operators["mame_diffusers.fit_slots"] >= 1


def test_compiled_unet_computes_what_the_eager_one_does():
    # aot_eager with fullgraph: the same operations as eager, the kernels included.
    unet = build_unet("tiny-sd", seed=0).to(DEVICE)
    inputs = unet_inputs(unet, (32, 32), batch=1)
    apply_mame(unet, backend="triton", min_latent_tokens=0)
    try:
        with torch.no_grad():
            eager = unet(**inputs).sample
            torch._dynamo.reset()
            try:
                compiled = torch.compile(unet, backend="aot_eager", fullgraph=True)(**inputs).sample
            finally:
                torch._dynamo.reset()
    finally:
        remove_mame(unet)
    assert torch.equal(compiled, eager)


COMPILE = """
import json, sys, torch
from mame_diffusers.merging import kernels, merge_layout
report = []
for side, ratio, channels, dtype, capability in [
    (96, 0.75, 320, torch.float16, 90),  # SD 2.1 768, the default ratio: K = 64
    (32, 0.5, 1280, torch.bfloat16, 80),  # SDXL 1024's deep stacks: K = 128 (the most)
    (96, 0.9375, 320, torch.float32, 90),  # keys and values only: K = 16
]:
    compiled = kernels.compile_ahead(merge_layout((side, side), ratio), channels, dtype, capability=capability)
    for name, kernel in compiled.items():
        report.append([str(dtype), capability, name, kernel.asm["ptx"].count(f".target sm_{capability}"),
                       len(kernel.asm["cubin"])])
json.dump(report, sys.stdout)
"""


def test_kernels_compile_for_gpus_without_one():
    # The interpreter runs the kernels' Python, not Triton's compiler: compile all four for
    # a Hopper (sm_90) and an Ampere (sm_80) GPU as SD 2.1 and SDXL latents launch them. In
    # a process of its own: Triton's compiler does not run where its interpreter is on.
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run(
        [sys.executable, "-c", COMPILE], check=False, capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert [row[2] for row in report] == ["plan", "merge", "fit", "restore"] * 3
    for dtype, capability, name, targets, cubin_bytes in report:
        assert targets == 1 and cubin_bytes > 1000, (dtype, capability, name)


TRACE_ON_A_GPU = """
import json, logging, sys, torch
from torch._functorch.aot_autograd import aot_function
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._subclasses.fake_tensor import FakeTensorMode
from mame_diffusers.merging import kernels, merge_layout

# Without a GPU, Triton cannot analyse which arguments a kernel writes (it says so, and
# assumes all): only the graph is checked here.
logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").setLevel(logging.CRITICAL)
layout = merge_layout((96, 96), 0.75)
graphs = []

class Captured(Exception):
    pass

def capture(graph, _):
    graphs.append(graph)
    raise Captured  # nothing can run on fake CUDA tensors

def step(x):
    plan = kernels.plan_slots(x, layout)
    return plan.restore(plan.merge(x) * 2), plan.attention_bias(x.dtype)

with FakeTensorMode():  # CUDA tensors without a GPU: shapes only
    x = torch.empty(2, 96 * 96, 320, device="cuda", dtype=torch.float16)
compiled = torch.compile(step, backend=lambda graph, inputs: aot_function(graph, fw_compiler=capture), fullgraph=True)
try:
    with torch.no_grad():
        compiled(x)
except Captured:
    pass
launches = []
for node in graphs[-1].graph.nodes:
    if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
        tuner = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
        launches.append([tuner.fn.__name__, [config.num_warps for config in tuner.configs], node.kwargs["grid"][0]])
json.dump(launches, sys.stdout)
"""


def test_compiled_on_a_gpu_the_graph_launches_the_kernels():
    # On a GPU, torch.compile traces the operators down to their Triton kernels
    # (torch.library.triton_op), so inductor launches them from its graph (and its CUDA
    # graphs). Traced here on fake CUDA tensors, outside the interpreter: a plan, a merge,
    # the fit and a restore are four launches, with the eager launch settings.
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run(
        [sys.executable, "-c", TRACE_ON_A_GPU], check=False, capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    blocks = merge_layout((96, 96), 0.75).num_blocks
    assert json.loads(result.stdout) == [
        ["_plan_kernel", [8], [blocks, 2, 1]],
        ["_merge_kernel", [4], [blocks, 5, 2]],
        ["_fit_kernel", [8], [blocks, 2, 1]],
        ["_restore_kernel", [8], [blocks * 4, 5, 2]],
    ]
