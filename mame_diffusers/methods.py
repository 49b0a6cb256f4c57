"""Ways to run a UNet that the command line, the batch generator and the benchmarks compare:
stock, MaMe with given settings, and tomesd (:class:`Method`), and MaMe settings as the
command line writes them (:func:`parse_mame_settings`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from .loading import UsageError

__all__ = [
    "Method",
    "baseline",
    "check_settings",
    "mame",
    "parse_mame_settings",
    "share_of_tokens",
    "tomesd_method",
]


@dataclass
class Method:
    """A way to run the UNet: ``patch`` before the calls, ``unpatch`` after."""

    name: str
    patch: Callable[[torch.nn.Module], Any]
    unpatch: Callable[[torch.nn.Module], Any]
    settings: dict[str, Any] = field(default_factory=dict)
    #: What the merged self-attentions attend with, e.g. ``"Q N, K/V N/16"``: the equal axis
    #: on which methods compare.
    attends: str = "Q N, K/V N"


def baseline() -> Method:
    return Method("baseline (SDPA)", lambda unet: None, lambda unet: None)


def share_of_tokens(kept: float) -> str:
    """``0.0625`` -> ``"N/16"``: the length a fraction ``kept`` of N tokens comes to."""
    if kept >= 1.0:
        return "N"
    inverse = 1.0 / kept
    return f"N/{round(inverse)}" if abs(inverse - round(inverse)) < 0.05 else f"{kept:.2f}N"


def mame(name: str | None = None, **settings: Any) -> Method:
    """MaMe with ``settings`` (as :func:`apply_mame` takes them)."""
    from .api import apply_mame, remove_mame
    from .diffusers_integration import MaMeConfig

    label = ", ".join(f"{k}={v}" for k, v in settings.items())
    try:
        config = MaMeConfig(**settings)
    except (TypeError, ValueError):  # patching raises the same, and the benchmark records it
        attends = "?"
    else:
        queries, keys = share_of_tokens(1.0 - config.query_ratio), share_of_tokens(1.0 - config.kv_ratio)
        attends = f"Q/K/V {queries}" if queries == keys else f"Q {queries}, K/V {keys}"
    return Method(
        name or (f"MaMe ({label})" if label else "MaMe (defaults)"),
        lambda unet: apply_mame(unet, **settings),
        remove_mame,
        settings,
        attends,
    )


def tomesd_method(ratio: float, **settings: Any) -> Method | None:
    """tomesd at ``ratio`` (its defaults otherwise), or ``None`` when it is not installed."""
    try:
        import tomesd
    except ImportError:
        return None
    extra = "".join(f", {k}={v}" for k, v in settings.items())
    return Method(
        f"tomesd (ratio={ratio}{extra})",
        lambda unet: tomesd.apply_patch(unet, ratio=ratio, **settings),
        tomesd.remove_patch,
        {"ratio": ratio, **settings},
        f"Q/K/V {share_of_tokens(1.0 - ratio)}",  # merged before attention, unmerged after
    )


def _value(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_mame_settings(items: Iterable[str]) -> dict[str, Any]:
    """``["min_latent_tokens=0", "block=8"]`` -> ``{"min_latent_tokens": 0, "block": 8}``.

    Values become ``bool`` (true/false), ``None`` (none/null), ``int`` or ``float`` when they
    read as one, else stay text.
    """
    settings: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UsageError(f"--mame takes KEY=VALUE (a MaMe setting), got {item!r}")
        if key == "ratio":
            raise UsageError("set ratio with --ratio, not --mame")
        settings[key] = _value(value)
    return settings


def check_settings(settings: dict[str, Any], *, dit: bool = False) -> None:
    """One line (:class:`UsageError`) for MaMe settings that ``apply_mame`` would refuse, on a
    UNet or (``dit``) a diffusion transformer."""
    if dit:
        from .dit_integration import DiTMaMeConfig as config_class
    else:
        from .diffusers_integration import MaMeConfig as config_class
    try:
        config_class(**settings)
    except (TypeError, ValueError) as error:
        raise UsageError(f"bad MaMe settings: {error}") from error
