"""``mame-diffusers``: the command line (thin: the work lives in ``benchmarking``).

    mame-diffusers bench                  # SD 2.1 architecture, offline, 512x512, batch 2
    mame-diffusers bench --quick          # tiny model, seconds
    mame-diffusers bench --arch flux      # a diffusion transformer's forward (pixart, sd3, flux, wan), offline
    mame-diffusers generate --model PixArt-alpha/PixArt-Sigma-XL-2-1024-MS --prompts prompts.txt
    mame-diffusers generate --prompt "a photo of an astronaut"
    mame-diffusers generate --prompts prompts.txt --out images      # one image per prompt
    accelerate launch --num_processes 8 -m mame_diffusers.cli generate --prompts prompts.txt --out images
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .defaults import DEFAULT_RATIO
from .generation import METHODS

_DTYPES = ("float32", "float16", "bfloat16")
#: What --arch builds offline: the SD 2.1 UNet pipeline, or a diffusion transformer
#: (``mame_diffusers.benchmarking.dit.DIT_ARCHS``; named here so that --help imports no torch).
ARCHS = ("sd21", "pixart", "sd3", "flux", "wan")
_RESOLUTION_HELP = (
    "image side in pixels, a multiple of 8 (default: 512; 128 with --quick). Diffusion transformers: a "
    "multiple of 16, default 1024 (256 with --quick); Wan: the frame height, 480 (256 with --quick), "
    "the width 832/480 times that"
)


def _ratio(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"ratio must be in [0, 1), got {text}")
    return value


def _resolution(text: str) -> int:
    value = int(text)
    if value < 64 or value % 8:
        raise argparse.ArgumentTypeError(f"resolution must be a multiple of 8 of at least 64, got {text}")
    return value


def _frames(text: str) -> int:
    value = int(text)
    if value < 1 or (value - 1) % 4:
        raise argparse.ArgumentTypeError(f"frames must be 4k + 1 (1, 5, 9, ..., 33, ..., 81), got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


class _HelpFormatter(argparse.HelpFormatter):
    """``--help`` shows each option's default after its help, unless the help gives it
    already or there is none to show (a flag, a default of ``None`` that the help explains)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or "default" in text
        ):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        shown = shown.replace("%", "%%")  # help strings are %-formatted
        return f"{text} (default: {shown})" if text else f"default: {shown}"


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line and exit status 2, no usage dump; ``--help`` shows defaults."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mame-diffusers", description="MaMe + MaRe token merging for diffusers.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    common = _Parser(add_help=False)
    common.add_argument(
        "--model",
        default=None,
        help="diffusers model id or local folder with real weights: a Stable Diffusion pipeline, or a PixArt-α/Σ, "
        "SD3, Flux or Wan one (its model_index.json tells) (default: --arch's architecture built offline with "
        "random weights)",
    )
    common.add_argument(
        "--arch",
        choices=ARCHS,
        default=None,
        help="the architecture built offline with random weights when there is no --model (default: sd21, the "
        "SD 2.1 pipeline). bench: pixart, sd3, flux or wan time a diffusion transformer's forward (real widths "
        "with a few blocks; tiny with --quick). generate needs real weights for diffusion transformers: pass "
        "their pipeline as --model (PixArt-α/Σ, SD3, Flux, Wan)",
    )
    common.add_argument(
        "--frames",
        type=_frames,
        default=None,
        help="Wan (video) only: frames per video, 4k + 1 (default: bench 33, 17 with --quick; generate 81)",
    )
    common.add_argument("--dtype", default="float32", choices=_DTYPES, help="dtype of the weights and activations")
    common.add_argument(
        "--seed", type=int, default=0, help="seed of the images' noise and of the offline model's random weights"
    )
    common.add_argument("--out", default="outputs", help="folder for the JSON, Markdown and PNG results")
    common.add_argument("--quick", action="store_true", help="tiny random model: a smoke run in seconds")

    bench = commands.add_parser(
        "bench",
        parents=[common],
        help="time the UNet and a short pipeline call: baseline vs MaMe vs tomesd; or a diffusion transformer",
        description="Latency, speed-up and fidelity of MaMe against the SDPA baseline and tomesd "
        "(when installed) at equal merged length, batch 2 (classifier-free guidance). With a diffusion "
        "transformer (--arch pixart, sd3, flux or wan, or a DiT pipeline as --model): its forward at batch 1, "
        "stock vs MaMe, no pipeline calls.",
    )
    bench.add_argument("--device", default="cpu", help="cpu or cuda")
    bench.add_argument("--resolution", type=_resolution, default=None, help=_RESOLUTION_HELP)
    bench.add_argument(
        "--ratios",
        type=_ratio,
        nargs="+",
        default=None,
        help=f"merge ratios to compare (default: {DEFAULT_RATIO}); diffusion transformers: MaMe's DiT default "
        "unless given",
    )
    bench.add_argument(
        "--repeats", type=_positive, default=3, help="timed UNet (or transformer) calls per method (median)"
    )
    bench.add_argument(
        "--steps", type=_positive, default=None, help="UNets: denoising steps in each timed pipeline call (default: 2)"
    )
    bench.add_argument(
        "--pipeline-rounds",
        type=_positive,
        default=None,
        help="UNets: timed pipeline calls per method, median (default: 2)",
    )
    bench.add_argument("--no-pipeline", action="store_true", help="UNets: time the UNet only (DiTs always do)")
    bench.add_argument(
        "--compile", action="store_true", help="torch.compile the UNet (each method compiled; UNets only)"
    )

    generate = commands.add_parser(
        "generate",
        parents=[common],
        help="images: a side-by-side grid for one --prompt, or one image per line of a --prompts file",
        description="With --prompt: one image per method (baseline | tomesd | MaMe), same seed, side by "
        "side in OUT/generate.png. With --prompts FILE: one image per non-blank line, OUT/00000.png, ..., "
        "recorded in OUT/manifest.jsonl; resumable, and split across processes under "
        "`accelerate launch --num_processes N -m mame_diffusers.cli generate ...` (see docs/scale_out.md). "
        "Diffusion transformers (a PixArt-α/Σ, SD3, Flux or Wan pipeline as --model; random-weight ones are "
        "bench's, not generate's): stock | MaMe, no tomesd; Wan's videos are written as animated PNGs.",
    )
    what = generate.add_mutually_exclusive_group()
    what.add_argument("--prompt", default="a photo of an astronaut riding a horse", help="one prompt: the grid")
    what.add_argument(
        "--prompts", metavar="FILE", default=None, help="one prompt per line (blank lines ignored): one image each"
    )
    generate.add_argument(
        "--device",
        default=None,
        help="cpu or cuda. Default: the grid runs on cpu; --prompts runs on the device accelerate gives "
        "each process (its GPU, or the CPU under `accelerate launch --cpu` or without a GPU)",
    )
    generate.add_argument("--resolution", type=_resolution, default=None, help=_RESOLUTION_HELP)
    generate.add_argument(
        "--ratio",
        type=_ratio,
        default=None,
        help=f"merge ratio of MaMe, and of tomesd (default: {DEFAULT_RATIO}); diffusion transformers: MaMe's DiT "
        "default unless given",
    )
    generate.add_argument("--steps", type=_positive, default=25, help="denoising steps per image")
    generate.add_argument(
        "--batch-size",
        type=_positive,
        default=1,
        help="--prompts: prompts per pipeline call (default: 1). With classifier-free guidance the UNet "
        "sees twice as many; on CUDA, MaMe's defaults merge only calls of at least min_latent_tokens "
        "latent tokens (batch x latent height x width), so larger batches are where it pays",
    )
    generate.add_argument(
        "--method",
        choices=METHODS,
        default=None,
        help="--prompts: what runs the UNet (default: mame; stock: the unpatched pipeline)",
    )
    generate.add_argument(
        "--mame",
        metavar="KEY=VALUE",
        action="append",
        default=None,
        help="a further MaMe setting passed to apply_mame, e.g. --mame min_latent_tokens=0 (repeatable); "
        "recorded in the manifest with --ratio",
    )
    generate.add_argument(
        "--compare",
        action="store_true",
        help="--prompts: also run the same prompts with --method stock into OUT/stock/ and report the speed-up",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_library_logs()
    from . import generation
    from .benchmarking import runs
    from .loading import UsageError, resolve_device

    try:
        if args.command == "generate" and args.prompts is not None:
            result = generation.run_prompts(args)
        elif args.command == "generate":
            if args.method is not None or args.compare or args.batch_size != 1:
                raise UsageError(
                    "--method, --compare and --batch-size apply to --prompts; --prompt draws every method"
                )
            result = runs.run_generate(args, resolve_device(args.device or "cpu"))
        else:
            result = runs.run_bench(args, resolve_device(args.device))
    except UsageError as error:
        print(f"mame-diffusers: error: {error}", file=sys.stderr)
        return 2
    for path in result:
        print(f"wrote {Path(path)}")
    return 0


def _quiet_library_logs() -> None:
    """Keep the command's output to its own table: diffusers and transformers log notes
    about optional packages and dtype casts at info/warning level that say nothing here."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
