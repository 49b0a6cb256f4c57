"""``StableDiffusionMaMePipeline``: Stable Diffusion with MaMe as a per-call option.

It loads like any diffusers pipeline::

    pipe = StableDiffusionMaMePipeline.from_pretrained("stabilityai/stable-diffusion-2-1")
    pipe = StableDiffusionMaMePipeline.from_pipe(existing_pipe)
    pipe = DiffusionPipeline.from_pretrained(
        model_id_or_path, custom_pipeline=mame_diffusers.CUSTOM_PIPELINE, trust_remote_code=True
    )

and ``pipe(prompt, mame_ratio=0.75)`` runs that call with MaMe; the UNet is left exactly as
it was afterwards, also when the call raises.

Calls from several threads (a server, one pipeline per request made with ``from_pipe``, all
sharing one UNet) each run with exactly their own settings: the UNet holds one set of
settings at a time, calls with equal settings run side by side, and a call with other
settings waits until the calls before it are done (:class:`_UNetSettings`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import weakref
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

# diffusers' Stable Diffusion module imports transformers' CLIPImageProcessor (the safety
# checker's inputs); without torchvision, transformers 5 logs on that import that it falls
# back to the PIL processor. Nothing here uses it: keep the notice out of our import.
_import_notices = logging.getLogger("transformers.utils.import_utils")
_level = _import_notices.level
_import_notices.setLevel(logging.ERROR)
try:
    from diffusers import StableDiffusionPipeline
finally:
    _import_notices.setLevel(_level)

from .api import apply_mame, remove_mame
from .diffusers_integration import MaMeConfig, apply_mame_to_unet, patched_config, uncompiled

__all__ = ["StableDiffusionMaMePipeline"]

#: Call arguments this pipeline adds, and the MaMe setting each one sets.
MAME_CALL_ARGUMENTS = {
    "mame_ratio": "ratio",
    "mame_max_downsample": "max_downsample",
    "mame_keys_values_only": "keys_values_only",
}


class StableDiffusionMaMePipeline(StableDiffusionPipeline):
    """A ``StableDiffusionPipeline`` whose call takes MaMe settings.

    Extra call arguments (all optional; giving any of them turns MaMe on for the call):

    * ``mame_ratio``: the attention budget of merged self-attention, in ``[0, 1)``;
    * ``mame_max_downsample``: merge at attention levels down to this downsampling;
    * ``mame_keys_values_only``: merge only keys and values (nothing to restore).

    Settings not given come from an earlier :func:`mame_diffusers.apply_mame` on this
    pipeline, else from MaMe's defaults. Unknown ``mame_*`` arguments raise ``TypeError``
    (the stock pipeline would drop unknown keyword arguments silently).

    Thread-safe as far as MaMe goes: concurrent calls on pipelines sharing one UNet (this
    class's, e.g. made with ``from_pipe``) each run with their own settings, and calls with
    other settings than the running ones wait for them. Calls through another pipeline class
    sharing the UNet do not wait, and may run with a MaMe call's settings.
    """

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """As diffusers saves pipelines, naming ``StableDiffusionPipeline`` as the class, so
        that plain ``DiffusionPipeline.from_pretrained(folder)`` reopens the folder (diffusers
        knows no ``StableDiffusionMaMePipeline``); ``StableDiffusionMaMePipeline.from_pretrained``
        reopens it as this class, whatever the folder names."""
        super().save_pretrained(save_directory, *args, **kwargs)
        index = Path(save_directory) / "model_index.json"
        config = json.loads(index.read_text())
        config["_class_name"] = StableDiffusionPipeline.__name__
        index.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def __call__(self, *args: Any, **kwargs: Any):
        overrides = _pop_mame_arguments(kwargs)
        unet = uncompiled(self.unet)
        with _settings_of(unet).held(unet, overrides):
            return super().__call__(*args, **kwargs)


def _pop_mame_arguments(kwargs: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(k for k in kwargs if k.startswith("mame_") and k not in MAME_CALL_ARGUMENTS)
    if unknown:
        raise TypeError(
            f"unknown MaMe argument(s) {', '.join(unknown)}; "
            f"StableDiffusionMaMePipeline accepts {', '.join(MAME_CALL_ARGUMENTS)}"
        )
    overrides = {}
    for argument, setting in MAME_CALL_ARGUMENTS.items():
        value = kwargs.pop(argument, None)
        if value is not None:
            overrides[setting] = value
    return overrides


#: The settings of a call without MaMe arguments: the UNet as it is (stock, or as an earlier
#: ``apply_mame`` left it).
_AS_IT_IS = object()


class _UNetSettings:
    """Which settings one UNet runs with, and how many calls are using them.

    Patching a UNet changes it for every thread, so the settings are leased: calls with
    equal settings (a plain call: the UNet as it is) share the UNet; a call with other
    settings waits until the running calls are done, and meanwhile no new call joins them
    (so that it does not wait forever). The first call in applies its settings; the last
    one out puts back what the UNet had before.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._settings: Any = _AS_IT_IS
        #: Running calls, per thread (a thread's call may call the pipeline again).
        self._calls: Counter = Counter()
        #: What an earlier ``apply_mame`` left on the UNet: it comes back after the calls.
        self._before: MaMeConfig | None = None
        #: A call with other settings is waiting: no more calls join the running ones.
        self._closing = False

    @contextmanager
    def held(self, unet: torch.nn.Module, overrides: dict[str, Any]) -> Iterator[None]:
        """The UNet with ``overrides`` over its own settings, for one call."""
        me = threading.get_ident()
        with self._changed:
            settings = self._wanted(unet, overrides)  # validated before anything changes
            if self._calls[me] and settings != self._settings:
                raise RuntimeError(
                    "a call with other MaMe settings started inside a call of this UNet (in a callback?) "
                    "would wait for itself; call it after the outer call returns"
                )
            while self._calls and not self._calls[me] and (settings != self._settings or self._closing):
                self._closing = self._closing or settings != self._settings
                self._changed.wait()
            if not self._calls:
                self._put_on(unet, settings)
            self._calls[me] += 1
        try:
            yield
        finally:
            with self._changed:
                self._calls[me] -= 1
                if not self._calls[me]:
                    del self._calls[me]
                if not self._calls:
                    self._take_off(unet)
                    self._changed.notify_all()

    def _wanted(self, unet: torch.nn.Module, overrides: dict[str, Any]) -> Any:
        """A call's settings: ``overrides`` over the UNet's own settings (those it had before
        the running calls changed them), else MaMe's defaults."""
        if not overrides:
            return _AS_IT_IS
        before = self._before if self._calls else patched_config(unet)
        base = dataclasses.asdict(before) if before is not None else {}
        settings = MaMeConfig(**{**base, **overrides})
        return _AS_IT_IS if settings == before else settings  # already on: nothing to change

    def _put_on(self, unet: torch.nn.Module, settings: Any) -> None:
        self._before, self._settings, self._closing = patched_config(unet), settings, False
        if settings is not _AS_IT_IS:
            try:
                apply_mame(unet, **dataclasses.asdict(settings))
            except BaseException:
                self._take_off(unet)
                raise

    def _take_off(self, unet: torch.nn.Module) -> None:
        if self._settings is not _AS_IT_IS:
            remove_mame(unet)
            if self._before is not None:
                apply_mame_to_unet(unet, self._before)
        self._settings, self._before = _AS_IT_IS, None


#: One lease per UNet, shared by every pipeline that holds it, dropped with the UNet. Kept
#: here rather than on the UNet: an attribute would change the model (and a lock cannot be
#: deep-copied or pickled with it).
_LEASES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LEASES_LOCK = threading.Lock()


def _settings_of(unet: torch.nn.Module) -> _UNetSettings:
    with _LEASES_LOCK:
        lease = _LEASES.get(unet)
        if lease is None:
            lease = _LEASES[unet] = _UNetSettings()
        return lease
