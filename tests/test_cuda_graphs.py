"""Recording into CUDA graphs, checked without a GPU (the recording state is faked).

While a CUDA graph records, kernels do not run: a constant cached then would hold garbage
until the first replay, so the operator records it with the graph instead. And replays
launch nothing, so UNet calls merge from a smaller size than eager CUDA calls do.
"""

import torch

import mame_diffusers.merging.layout as layout_module
from mame_diffusers import MaMeConfig
from mame_diffusers.defaults import DEFAULT_MIN_LATENT_TOKENS
from mame_diffusers.merging import cuda_graph_recording, merge_layout


def test_recording_is_seen_on_cuda_devices_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert cuda_graph_recording(torch.device("cuda"))
    assert cuda_graph_recording("cuda:0")
    assert not cuda_graph_recording(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert not cuda_graph_recording(torch.device("cuda"))


def test_constants_asked_for_while_recording_are_not_kept(monkeypatch):
    layout = merge_layout((16, 16), 0.75, block=8)
    device, dtype = torch.device("cpu"), torch.float64  # a dtype no other test caches
    layout._constants.pop(("destination", device, dtype), None)
    monkeypatch.setattr(layout_module, "cuda_graph_recording", lambda device: True)
    recorded = layout.constant("destination", device, dtype)
    assert ("destination", device, dtype) not in layout._constants
    monkeypatch.setattr(layout_module, "cuda_graph_recording", lambda device: False)
    kept = layout.constant("destination", device, dtype)
    assert layout._constants[("destination", device, dtype)] is kept
    assert torch.equal(recorded, kept)
    # Once kept (built by an eager call before recording), recording reads the kept one.
    monkeypatch.setattr(layout_module, "cuda_graph_recording", lambda device: True)
    assert layout.constant("destination", device, dtype) is kept


def test_unet_calls_being_recorded_merge_from_a_smaller_size(monkeypatch):
    config, cuda = MaMeConfig(), torch.device("cuda")
    sd21_768_batch2 = 2 * 96 * 96
    sd21_512_batch2 = 2 * 64 * 64
    assert DEFAULT_MIN_LATENT_TOKENS["cuda-graph"] < DEFAULT_MIN_LATENT_TOKENS["cuda"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert not config.merges_call(sd21_768_batch2, cuda)  # eager: launch-bound
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert config.merges_call(sd21_768_batch2, cuda)  # measured 1.08x on an H200
    assert not config.merges_call(sd21_512_batch2, cuda)  # measured level (1.00x)
    # An explicit threshold is the user's, recorded or not.
    assert not MaMeConfig(min_latent_tokens=10**6).merges_call(sd21_768_batch2, cuda)
    assert config.merges_call(1, torch.device("cpu"))
