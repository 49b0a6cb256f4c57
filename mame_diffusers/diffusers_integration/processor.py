"""The attention processor: :class:`MaMeProcessor`.

Self-attention merges its tokens before attention (MaMe), attends over the merged tokens
with proportional attention, and restores every token after it (MaRe), before the residual
add. Cross-attention, and self-attention at the levels ``max_downsample`` leaves out, run
the processor that was there before (``fallback``).
"""

from __future__ import annotations

import inspect
import sys
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from ..merging import MergePlan
from ..per_thread import PerThread
from .config import MaMeConfig
from .tracking import GridTracker, TransformerRecord, nearest_power_of_two

if TYPE_CHECKING:
    from ..merging.kernels import SlotPlan

__all__ = ["MaMeProcessor"]

#: The code of the forward in which every self-attention MaMe merges runs: a bare processor
#: finds its token grid in that call (its ``height`` and ``width``).
_TRANSFORMER_FORWARD = Transformer2DModel.forward.__code__


@dataclass(eq=False)
class _BareForward:
    """What a processor set with ``set_attn_processor`` (no tracker) knows of the forward its
    thread is in: the modules called so far (a module called again starts a new forward), the
    largest grid among them (the first level) and the plans its levels share."""

    modules: set = field(default_factory=set)
    largest_tokens: int = 0
    level_plans: dict = field(default_factory=dict)


class MaMeProcessor:
    """Attention processor that merges self-attention tokens (MaMe) and restores them (MaRe).

    ``unet.set_attn_processor(MaMeProcessor())`` works as it is: the processor finds each
    call's token grid in the ``Transformer2DModel`` running it. :func:`mame_diffusers.apply_mame`
    gives each module its own instance, wired to hooks that record the latent size and every
    grid. Calls it does not merge (cross-attention, levels beyond ``max_downsample``,
    ``ratio=0``, calls below ``min_latent_tokens``) go to ``fallback``, by default diffusers'
    ``AttnProcessor2_0``, so they are unchanged.
    """

    def __init__(
        self,
        ratio: float | None = None,
        *,
        fallback: Callable[..., torch.Tensor] | None = None,
        config: MaMeConfig | None = None,
        **settings: Any,
    ) -> None:
        """Settings as :class:`MaMeConfig` takes them (``ratio``, ``max_downsample``, ...), or
        a ready ``config``: not both."""
        if ratio is not None:
            settings["ratio"] = ratio
        if config is not None and settings:
            raise TypeError(
                f"MaMeProcessor takes either config= or settings, not both: got config and {', '.join(settings)}"
            )
        self.config = config if config is not None else MaMeConfig(**settings)
        self.fallback = fallback if fallback is not None else AttnProcessor2_0()
        self._fallback_kwargs = _accepted_keywords(self.fallback)
        # Set by apply_mame: the UNet's tracker and the record of this module's transformer.
        self._tracker: GridTracker | None = None
        self._record: TransformerRecord | None = None
        # Bare use only: each thread's view of its current forward, and whether the one
        # warning about a grid it cannot see was given.
        self._bare = PerThread(_BareForward())
        self._warned_no_grid = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_bare": PerThread(_BareForward())}

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        hw = self._grid_to_attend(attn, hidden_states, encoder_hidden_states)
        if hw is None:
            if temb is not None:
                kwargs["temb"] = temb
            if self._fallback_kwargs is not None:
                kwargs = {k: v for k, v in kwargs.items() if k in self._fallback_kwargs}
            return self.fallback(
                attn, hidden_states, *args, encoder_hidden_states=encoder_hidden_states,
                attention_mask=attention_mask, **kwargs,
            )
        if attention_mask is not None:
            raise ValueError(
                "MaMe merges self-attention tokens and cannot apply an attention_mask to them; "
                "remove the mask or remove MaMe from this model"
            )
        return self._merged_attention(attn, hidden_states, hw, temb)

    # -- which calls merge, and on which grid ----------------------------------------------

    def _grid_to_attend(
        self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None
    ) -> tuple[int, int] | None:
        """The token grid when this call takes the merged path, else ``None`` (fallback)."""
        if encoder_hidden_states is not None or attn.is_cross_attention:
            return None
        if hidden_states.ndim == 4:
            hw = (int(hidden_states.shape[-2]), int(hidden_states.shape[-1]))
            tokens = hw[0] * hw[1]
        else:
            tokens = int(hidden_states.shape[1])
            hw = None
        if self._tracker is not None:
            if not self._tracker.current.merging:
                return None
            hw = self._tracked_grid(hw, tokens)
            if self._record.stack is not None:
                # Inside a merged stack: the merged path, whose size bias keeps attention
                # proportional (and empty slots weightless).
                return hw
        else:
            # A bare processor cannot see the latent: its own batch of tokens stands in.
            if not self.config.merges_call(hidden_states.shape[0] * tokens, hidden_states.device):
                return None
            hw = self._bare_grid(attn, hw, tokens)
        return hw if self.config.ratio > 0.0 else None

    def _tracked_grid(self, hw: tuple[int, int] | None, tokens: int) -> tuple[int, int] | None:
        record = self._record
        stack = record.stack
        recorded = stack.plan.merged_hw if stack is not None else record.hw
        if hw is None:
            if recorded is None or recorded[0] * recorded[1] != tokens:
                raise RuntimeError(
                    f"MaMe expected self-attention over the recorded {recorded} token grid, got {tokens} "
                    "tokens; this module does not run inside a Transformer2DModel as apply_mame assumed"
                )
            hw = recorded
        if stack is not None:  # a merged stack's grid, whatever its level
            return hw
        return hw if self._tracker.within(hw, self.config.max_downsample) else None

    def _bare_grid(self, attn: Attention, hw: tuple[int, int] | None, tokens: int) -> tuple[int, int] | None:
        forward = self._bare.get()
        if id(attn) in forward.modules:  # called again: a new forward
            forward = _BareForward()
            self._bare.set(forward)
        forward.modules.add(id(attn))
        forward.largest_tokens = max(forward.largest_tokens, tokens)
        if hw is None:
            hw = _enclosing_transformer_grid() if not torch.compiler.is_compiling() else None
            if hw is None or hw[0] * hw[1] != tokens:
                self._warn_no_grid(tokens)
                return None
        level = nearest_power_of_two((forward.largest_tokens / tokens) ** 0.5)
        return hw if level <= self.config.max_downsample else None

    def _warn_no_grid(self, tokens: int) -> None:
        if not self._warned_no_grid:
            self._warned_no_grid = True
            how = "while torch.compile traces" if torch.compiler.is_compiling() else "outside a Transformer2DModel"
            warnings.warn(
                f"MaMeProcessor cannot see the token grid of a {tokens}-token self-attention called {how}, "
                "so such calls run unmerged. Use mame_diffusers.apply_mame(pipe_or_unet), which records the "
                "exact grid of every block (and works under torch.compile), or pass (B, C, H, W) inputs.",
                stacklevel=4,
            )

    def _plan(
        self, tokens: torch.Tensor, hw: tuple[int, int], ratio_name: str
    ) -> MergePlan | SlotPlan:
        """A merge plan for ``tokens`` at the config's ``ratio_name``: made here, or shared
        with the other blocks of this level in this forward."""
        plans = self._tracker.current.level_plans if self._tracker is not None else self._bare.get().level_plans
        key = (hw, ratio_name)
        maker, plan = plans.get(key, (None, None))
        if plan is None or maker is self and self._tracker is not None:
            # The block that made a plan makes it again when gradient checkpointing
            # recomputes it: a recomputation must run what its forward ran.
            plan = self.config.plan_on(tokens, self.config.layout(hw, ratio_name))
            plans[key] = (self, plan)
        return plan

    # -- the merged path --------------------------------------------------------------------

    def _merged_attention(
        self, attn: Attention, hidden_states: torch.Tensor, hw: tuple[int, int], temb: torch.Tensor | None
    ) -> torch.Tensor:
        # The steps of diffusers' AttnProcessor2_0, with MaMe after the input norms and MaRe
        # before the residual add (tests keep the two equal where nothing merges).
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        config = self.config
        stack = self._record.stack if self._record is not None else None
        query_plan = context_plan = None
        if stack is None:
            # Inside a merged stack the tokens are merged already: attention weighs them by
            # their sizes and merges no further.
            if config.query_ratio > 0:
                query_plan = self._plan(hidden_states, hw, "query_ratio")
            if config.query_ratio == config.kv_ratio and query_plan is not None:
                context_plan = query_plan
            else:
                context_plan = self._plan(hidden_states, hw, "kv_ratio")
        queries = query_plan.merge(hidden_states) if query_plan is not None else hidden_states
        if context_plan is None:
            context = hidden_states
        else:
            context = queries if context_plan is query_plan else context_plan.merge(hidden_states)
        # Keys stand for as many tokens as their slot (or their merged token) holds.
        weights_plan = context_plan if context_plan is not None else stack.plan
        key_bias = weights_plan.attention_bias(hidden_states.dtype)

        query = attn.to_q(queries)
        key = attn.to_k(context)
        value = attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # As in AttnProcessor2_0: SDPA's default scale; SDPA accumulates in float32 already,
        # so nothing more is needed for attn.upcast_attention.
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=key_bias.to(query.dtype)[:, None, None, :])
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        # Restore weights are affine (each row sums to one), so restoring after the output
        # projection (bias included) equals restoring before it, on C channels.
        if query_plan is not None:
            out = query_plan.restore(out)

        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        if attn.rescale_output_factor != 1.0:  # dividing by 1 would only cost a kernel
            out = out / attn.rescale_output_factor
        return out


def _enclosing_transformer_grid() -> tuple[int, int] | None:
    """The token grid of the ``Transformer2DModel`` call this attention runs in, read from
    that call's ``height`` and ``width`` (``None`` when there is none)."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code is _TRANSFORMER_FORWARD:
            height, width = frame.f_locals.get("height"), frame.f_locals.get("width")
            if isinstance(height, int) and isinstance(width, int):
                return height, width
            return None
        frame = frame.f_back
    return None


def _accepted_keywords(processor: Callable[..., Any]) -> set[str] | None:
    """Keyword names the processor takes; ``None`` when it takes any (``**kwargs``)."""
    try:
        params = inspect.signature(processor.__call__).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def unwrapped(processor: Callable[..., Any]) -> Callable[..., Any]:
    """The first processor under any MaMeProcessor wrappers, so that MaMe never wraps MaMe."""
    while isinstance(processor, MaMeProcessor):
        processor = processor.fallback
    return processor
