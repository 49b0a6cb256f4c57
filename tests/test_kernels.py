"""The Triton kernels (``backend="triton"``) against the torch path, run in Triton's
interpreter on a CPU (``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` where there is no GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from mame_diffusers import MaMeConfig, apply_mame, merge_layout, plan_merge, remove_mame  # noqa: E402
from mame_diffusers import kernels  # noqa: E402
from mame_diffusers.diffusers_integration import self_attention_modules  # noqa: E402
from mame_diffusers.merging import MergePlan  # noqa: E402
from mame_diffusers.offline import build_unet, unet_inputs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def torch_slots(plan: MergePlan) -> torch.Tensor:
    """``(B, N)``: the slot each token joins in a torch plan (copy restore of the slot numbers)."""
    batch = plan.batch_size
    numbers = torch.arange(plan.num_merged, dtype=torch.float64, device=plan.assignment.device)
    return plan.restore(numbers.expand(batch, -1)[..., None].contiguous())[..., 0].round().to(torch.int32)


CASES = [
    # grid, ratio, tau, channels: 4x4 anchors of 2x2 cells with a halo of 2 (keys/values at
    # ratio 0.5), 8x4 anchors of 1x2 cells, 2x2 anchors whose halo reaches a whole block over
    # (the default keys/values ratio), a non-square grid; taus that raise the own anchor's
    # floor, take any candidate, and keep every token in its cell.
    ((16, 16), 0.75, 0.0, 40),
    ((16, 16), 0.5, -1.0, 24),
    ((32, 32), 0.9375, 0.0, 16),
    ((16, 24), 0.75, 0.3, 72),
    ((16, 16), 0.75, 1.0, 24),
    ((12, 12), 0.75, 0.0, 24),  # blocks of 6 x 6 tokens, 3 x 3 anchors: partly filled tiles
    # Cells of unequal sizes: 3 x 3 anchors in blocks of 8, 5 x 5 in 8, 4 x 3 in 7.
    ((16, 16), 0.84, 0.0, 24),
    ((24, 16), 0.6, 0.2, 16),
    ((14, 14), 0.75, -1.0, 16),
]


@pytest.mark.parametrize("hw,ratio,tau,channels", CASES)
def test_kernels_plan_merge_and_restore_as_the_torch_path(hw, ratio, tau, channels):
    torch.manual_seed(0)
    x = torch.randn(2, hw[0] * hw[1], channels, device=DEVICE)
    layout = merge_layout(hw, ratio)
    assert kernels.supports(layout)
    reference = plan_merge(x, hw, ratio=ratio, tau=tau)
    plan = kernels.plan_slots(x, layout, tau=tau)

    assert torch.equal(plan.slot_index, torch_slots(reference))
    merged = plan.merge(x)
    torch.testing.assert_close(merged, reference.merge(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(plan.sizes, reference.sizes.float())
    for proportional in (True, False):
        torch.testing.assert_close(
            plan.attention_bias(x.dtype, proportional=proportional),
            reference.attention_bias(x.dtype, proportional=proportional),
        )
    # Another tensor on the same grid (a UNet level's next block), with other channels.
    other = torch.randn(2, hw[0] * hw[1], 8, device=DEVICE)
    torch.testing.assert_close(plan.merge(other), reference.merge(other), rtol=1e-5, atol=1e-5)
    outputs = torch.randn(2, layout.num_merged, channels, device=DEVICE)
    assert torch.equal(plan.restore(outputs), reference.restore(outputs))


@pytest.mark.parametrize("hw,ratio,tau", [((16, 16), 0.75, 0.0), ((24, 16), 0.6, 0.2), ((16, 16), 0.5, -1.0)])
def test_kernels_with_token_sizes_as_the_torch_path(hw, ratio, tau):
    # Merged tokens merged again (deep stacks): sizes of several tokens, fractions, and
    # weightless slots, some filling whole anchor cells (no anchor there).
    torch.manual_seed(2)
    num_tokens = hw[0] * hw[1]
    x = torch.randn(2, num_tokens, 24, device=DEVICE)
    sizes = torch.randint(0, 4, (2, num_tokens), device=DEVICE).float()
    sizes[0, :40] = 0.0
    sizes[1, 5] = 2.5
    layout = merge_layout(hw, ratio)
    reference = plan_merge(x, hw, ratio=ratio, tau=tau, sizes=sizes)
    plan = kernels.plan_slots(x, layout, tau=tau, sizes=sizes)
    assert torch.equal(plan.slot_index, torch_slots(reference))
    torch.testing.assert_close(plan.merge(x), reference.merge(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plan.sizes, reference.sizes.float())
    assert (plan.sizes == 0).any()  # empty slots, whose bias keeps them out of attention
    torch.testing.assert_close(plan.attention_bias(torch.float32), reference.attention_bias(torch.float32))
    other = torch.randn(2, num_tokens, 8, device=DEVICE)
    torch.testing.assert_close(plan.merge(other), reference.merge(other), rtol=1e-5, atol=1e-5)


def means_by_slot(x: torch.Tensor, slot_index: torch.Tensor, num_merged: int) -> torch.Tensor:
    """Each slot's mean of the tokens whose index names it (index ops: a test reference)."""
    sums = torch.zeros(x.shape[0], num_merged, x.shape[-1], dtype=torch.float64, device=x.device)
    sums.scatter_add_(1, slot_index.long()[..., None].expand(-1, -1, x.shape[-1]), x.double())
    counts = torch.zeros(x.shape[0], num_merged, dtype=torch.float64, device=x.device)
    counts.scatter_add_(1, slot_index.long(), torch.ones_like(slot_index, dtype=torch.float64))
    return sums / counts.clamp_min(1)[..., None]


def test_kernels_in_half_precision_and_with_identical_tokens():
    # Half precision, and a grid of repeated tokens: they tie with their own anchor and with
    # others, and the tie-break must keep them in their own cell, as the torch path does.
    torch.manual_seed(1)
    hw, ratio = (16, 16), 0.75
    x = torch.randn(2, 256, 32, device=DEVICE).half()
    x[:, 128:] = x[:, :1]
    layout = merge_layout(hw, ratio)
    reference = torch_slots(plan_merge(x, hw, ratio=ratio))
    plan = kernels.plan_slots(x, layout, tau=0.0)
    # The torch path rounds scores to half precision on a GPU, the kernel keeps float32: a
    # near-tie may go the other way there.
    assert (plan.slot_index == reference).float().mean() >= (1.0 if DEVICE == "cpu" else 0.98)
    assert torch.equal(plan.slot_index[:, 128:], reference[:, 128:])  # the tied tokens break ties alike
    expected = means_by_slot(x, plan.slot_index, layout.num_merged)
    torch.testing.assert_close(plan.merge(x).double(), expected, rtol=1e-3, atol=1e-3)


def test_merging_the_planned_tokens_again_reuses_the_first_merge():
    x = torch.randn(1, 256, 16, device=DEVICE)
    plan = kernels.plan_slots(x, merge_layout((16, 16), 0.75), tau=0.0)
    assert plan.merge(x) is plan.merge(x)


def test_unsupported_layouts_and_settings_take_the_torch_path_or_raise():
    # A grid that blocks do not tile (13 = 7 + 6: padded blocks), and a global layout.
    padded = merge_layout((13, 13), 0.75)
    assert not kernels.supports(padded)
    assert not kernels.supports(merge_layout((64, 64), 0.75, block=None))  # 1,024 candidates
    config = MaMeConfig(backend="triton")
    x = torch.randn(1, 169, 8, device=DEVICE)
    assert isinstance(config.plan_on(x, padded), MergePlan)
    with pytest.raises(ValueError, match="blocks that tile the grid"):
        kernels.plan_slots(x, padded, tau=0.0)
    square = merge_layout((16, 16), 0.75)
    tokens = torch.randn(1, 256, 8, device=DEVICE)
    assert isinstance(config.plan_on(tokens, square), kernels.SlotPlan)
    assert isinstance(config.plan_on(tokens, square, torch.ones(1, 256, device=DEVICE)), kernels.SlotPlan)
    with pytest.raises(ValueError, match="sizes must have shape"):
        kernels.plan_slots(tokens, square, tau=0.0, sizes=torch.ones(1, 255, device=DEVICE))


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"backend": "cuda"}, "backend must be one of"),
        ({"backend": "triton", "anchor": "ranked", "halo": 0}, "takes no other anchor"),
        ({"backend": "triton", "restore": "affine"}, "takes no other restore"),
        ({"backend": "triton", "temperature": 0.1, "refine": 1}, "temperature, refine"),
    ],
)
def test_backend_settings_are_checked(settings, message):
    with pytest.raises(ValueError, match=message):
        MaMeConfig(**settings)


def test_auto_backend_takes_the_kernels_only_where_they_can_run(monkeypatch):
    # backend="auto": the kernels for CUDA tensors that want no gradient, with the default
    # operator; the torch path for anything else, and never an error.
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mame_diffusers.merging import OperatorSettings

    taken = []
    monkeypatch.setattr(kernels, "plan_slots", lambda *a, **k: taken.append("kernels"))
    monkeypatch.setattr(OperatorSettings, "plan_on", lambda *a, **k: taken.append("torch"))
    layout = merge_layout((16, 16), 0.75)
    with FakeTensorMode():  # CUDA tensors without a GPU: shapes only
        on_cuda = torch.empty(1, 256, 8, device="cuda")
    on_cpu = torch.randn(1, 256, 8)
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
    assert MaMeConfig(backend="triton").plan_on(on_cpu, layout) is None and taken.pop() == "kernels"
    # Options the kernels lack: the torch path, where backend="triton" refuses them.
    MaMeConfig(backend="auto", anchor="ranked", halo=0, restore="affine").plan_on(on_cuda.detach(), layout)
    assert taken.pop() == "torch"
    monkeypatch.setattr(kernels, "triton", None)  # triton missing
    MaMeConfig(backend="auto").plan_on(on_cuda.detach(), layout)
    assert taken.pop() == "torch"


def test_backend_errors_name_what_is_missing(monkeypatch):
    x = torch.randn(1, 256, 8, device=DEVICE)
    layout = merge_layout((16, 16), 0.75)
    with pytest.raises(RuntimeError, match="no backward pass"):
        kernels.plan_slots(x.requires_grad_(), layout, tau=0.0)
    if DEVICE == "cpu":
        monkeypatch.setattr(kernels, "interpreted", lambda: False)
        with pytest.raises(RuntimeError, match="runs on CUDA tensors"):
            kernels.plan_slots(x.detach(), layout, tau=0.0)
    monkeypatch.setattr(kernels, "triton", None)
    with pytest.raises(ValueError, match="needs the triton package"):
        MaMeConfig(backend="triton")


@pytest.mark.parametrize("name,hw,settings", [
    ("tiny-sd", (16, 16), {"ratio": 0.5}),
    ("tiny-sd", (16, 16), {"ratio": 0.75, "query_share": 1.0}),
    # SDXL's shape: a deep stack merged by the kernels, and its self-attention with sizes.
    ("tiny-sdxl", (32, 32), {"ratio": 0.5, "stack_min_layers": 2}),
])
def test_unets_with_the_triton_backend_match_the_torch_backend(name, hw, settings, monkeypatch):
    planned = []
    plan_slots = kernels.plan_slots
    monkeypatch.setattr(kernels, "plan_slots", lambda *a, **k: planned.append(1) or plan_slots(*a, **k))
    unet = build_unet(name, seed=0).to(DEVICE)
    inputs = unet_inputs(unet, hw)  # on the UNet's device
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
    assert planned  # with the kernels
    torch.testing.assert_close(outputs["triton"], outputs["torch"], rtol=1e-4, atol=1e-5)
    # "auto": the kernels on CUDA, the torch path on a CPU.
    assert torch.equal(outputs["auto"], outputs["triton" if DEVICE == "cuda" else "torch"])


COMPILE = """
import json, sys, torch
from mame_diffusers import MaMeConfig, kernels, merge_layout
layout = merge_layout((96, 96), MaMeConfig().kv_ratio)
report = []
for dtype, capability, weighted in [
    (torch.float16, 90, False), (torch.bfloat16, 80, False), (torch.float32, 90, False), (torch.float16, 90, True)
]:
    compiled = kernels.compile_ahead(layout, 320, dtype, capability=capability, weighted=weighted)
    for name, kernel in compiled.items():
        report.append([str(dtype), capability, name, kernel.asm["ptx"].count(f".target sm_{capability}"),
                       len(kernel.asm["cubin"])])
json.dump(report, sys.stdout)
"""


def test_kernels_compile_for_gpus_without_one():
    # The interpreter runs the kernels' Python, not Triton's compiler: compile them for a
    # Hopper (sm_90) and an Ampere (sm_80) GPU as a 768x768 SD 2.1 latent launches them (and
    # with token sizes, as in deep stacks). In a process of its own: Triton's compiler does
    # not run where its interpreter is on.
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", COMPILE], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert len(report) == 12
    for dtype, capability, name, targets, cubin_bytes in report:
        assert targets == 1 and cubin_bytes > 1000, (dtype, capability, name)


@pytest.mark.parametrize("name,hw,settings,backend", [
    ("tiny-sd", (16, 16), {"ratio": 0.5}, "aot_eager"),
    ("tiny-sdxl", (32, 32), {"ratio": 0.5, "stack_min_layers": 2}, "aot_eager"),  # with a deep stack's restore
    # Inductor compiles the kernels into its own graph on a GPU (benchmarks/gpu_triton.sh).
    pytest.param("tiny-sd", (16, 16), {"ratio": 0.5}, "inductor", marks=pytest.mark.skipif(DEVICE != "cuda", reason="GPU")),
])
def test_compiled_unets_launch_the_kernels_from_one_graph(name, hw, settings, backend, monkeypatch):
    # Under torch.compile the kernels are operators (torch.ops.mame_diffusers) in the one
    # graph, as many of each as an eager forward launches, and the compiled UNet computes
    # what the eager one does.
    from collections import Counter

    from .graphs import assert_one_graph

    launched = Counter()
    launch = kernels._launch
    monkeypatch.setattr(kernels, "_launch", lambda kernel, *a: launched.update([kernel.__name__]) or launch(kernel, *a))
    unet = build_unet(name, seed=0).to(DEVICE)
    inputs = unet_inputs(unet, hw)  # on the UNet's device
    apply_mame(unet, backend="triton", min_latent_tokens=0, **settings)
    try:
        with torch.no_grad():
            eager = unet(**inputs).sample
            graph = assert_one_graph(unet, **inputs)
            torch._dynamo.reset()
            try:
                compiled = torch.compile(unet, backend=backend, fullgraph=True)(**inputs).sample
            finally:
                torch._dynamo.reset()
    finally:
        remove_mame(unet)
    operators = Counter(str(node.target) for node in graph.graph.nodes if "mame_diffusers" in str(node.target))
    assert operators == Counter({
        f"mame_diffusers.{operator}_slots": launched[f"_{operator}_kernel"] for operator in ("assign", "merge", "restore")
    })
    assert operators["mame_diffusers.merge_slots"] >= len(self_attention_modules(unet))
    if backend == "aot_eager":  # the same operations
        assert torch.equal(compiled, eager)
    else:  # inductor fuses the operations around the kernels its own way
        torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-4)


TRACE_ON_A_GPU = """
import json, logging, sys, torch
from torch._functorch.aot_autograd import aot_function
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._subclasses.fake_tensor import FakeTensorMode
from mame_diffusers import MaMeConfig, merge_layout

# Without a GPU, Triton cannot analyse which arguments a kernel writes (it says so, and
# assumes all): only the graph is checked here.
logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").setLevel(logging.CRITICAL)
layout = merge_layout((96, 96), 0.84)
graphs = []

class Captured(Exception):
    pass

def capture(graph, _):
    graphs.append(graph)
    raise Captured  # nothing can run on fake CUDA tensors

class Holder:  # as a patched UNet holds its config: apply_mame replaces it
    config = None

def step(x, sizes):
    plan = Holder.config.plan_on(x, layout, sizes)
    return plan.restore(plan.merge(x) * 2), plan.sizes

with FakeTensorMode():  # CUDA tensors without a GPU: shapes only
    x = torch.empty(2, 96 * 96, 320, device="cuda", dtype=torch.float16)
    sizes = torch.empty(2, 96 * 96, device="cuda", dtype=torch.float32)
compiled = torch.compile(step, backend=lambda graph, inputs: aot_function(graph, fw_compiler=capture), fullgraph=True)
report = []
for tau in (0.0, 0.3, 1.0):  # a new tau after compiling: a recompile with a constant tau
    Holder.config = MaMeConfig(backend="triton", tau=tau)
    try:
        with torch.no_grad():
            compiled(x, sizes)
    except Captured:
        pass
    launches = []
    for node in graphs[-1].graph.nodes:
        if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
            tuner = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            arguments = node.kwargs["kwargs"]
            launches.append([tuner.fn.__name__, [config.num_warps for config in tuner.configs], node.kwargs["grid"][0],
                             [arguments.get("tau"), arguments.get("TAU_MODE")]])
    report.append(launches)
json.dump(report, sys.stdout)
"""


def test_compiled_on_a_gpu_the_graph_launches_the_kernels():
    # On a GPU, torch.compile traces the operators down to their Triton kernels
    # (torch.library.triton_op), so inductor launches them from its graph (and its CUDA
    # graphs). Traced here on fake CUDA tensors, outside the interpreter: a plan with token
    # sizes, a merge and a restore are three launches, with the eager launch settings; a
    # config with a new tau recompiles with that tau, a constant (the kernel branches on it).
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", TRACE_ON_A_GPU], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    layout = merge_layout((96, 96), 0.84)
    assert json.loads(result.stdout) == [
        [
            ["_assign_kernel", [8], [layout.num_blocks, 1, 2], [tau, tau_mode]],
            ["_merge_kernel", [4], [layout.num_blocks, 5, 2], [None, None]],
            ["_restore_kernel", [4], [96 * 96 // 32, 5, 2], [None, None]],
        ]
        for tau, tau_mode in [(0.0, 1), (0.3, 1), (1.0, 2)]
    ]


def test_the_kernels_add_one_launch_per_merged_call_and_no_aten_operation():
    # A whole forward on the meta device (nothing runs; every operation is counted): the
    # torch path adds some 8 operations per merged self-attention (SD 2.1: 776 -> 856,
    # benchmarks/launch_count.py), the kernels one launch per merge and one per plan, plus
    # one cast of each plan's key bias.
    from diffusers import UNet2DConditionModel

    from mame_diffusers.benchmarking.ops import unet_forward_ops
    from mame_diffusers.offline import unet_config

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config("tiny-sd"))
    inputs = unet_inputs(unet, (16, 16))
    stock, fused = unet_forward_ops(unet, inputs), unet_forward_ops(unet, inputs, {"backend": "triton"})
    plans = fused.pop("triton::assign_kernel")
    assert fused.pop("triton::merge_kernel") == len(self_attention_modules(unet))  # every attn1 merged
    assert plans == 2  # one per level (the mid block shares the lowest level's)
    assert sum(fused.values()) <= sum(stock.values()) + plans, (fused - stock)
    torch_path = unet_forward_ops(unet, inputs, {"backend": "torch"})
    assert sum(torch_path.values()) >= sum(stock.values()) + 8 * len(self_attention_modules(unet))
