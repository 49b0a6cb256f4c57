"""Benchmark reports: environment facts, a Markdown table and a JSON file."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import sys
from pathlib import Path
from typing import Any, Sequence

import torch


def environment(device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> dict[str, Any]:
    """What a number needs next to it: device, versions, threads, the command line."""
    device = torch.device(device)
    info: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "device_type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "command": " ".join(sys.argv),
    }
    if dtype is not None:
        info["dtype"] = str(dtype).replace("torch.", "")
    for package in ("diffusers", "transformers", "tomesd"):
        info[package] = package_version(package)
    return info


def package_version(package: str) -> str | None:
    """The installed version of ``package``; ``None`` when it cannot be imported.

    Read from the package's metadata first: tomesd, for one, has no ``__version__``.
    """
    try:
        __import__(package)
    except ImportError:
        return None
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:  # imported from a source tree
        return getattr(sys.modules[package], "__version__", "unknown")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], formats: dict[str, str] | None = None) -> str:
    """A GitHub Markdown table of ``rows`` (dicts), one column per key in ``columns``."""
    formats = formats or {}

    def cell(row: dict[str, Any], key: str) -> str:
        value = row.get(key)
        if value is None:
            return "-"
        if key in formats and isinstance(value, (int, float)):
            return format(value, formats[key])
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row, key) for key in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_report(path: str | Path, payload: dict[str, Any], table: str, *, header: bool = True) -> tuple[Path, Path]:
    """Write ``payload`` as JSON and ``table`` as Markdown next to it (``path`` without suffix),
    the Markdown after a line naming the device and the command unless ``header=False``
    (for a report that writes its own)."""
    base = Path(path)
    base.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = base.with_suffix(".json"), base.with_suffix(".md")
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    env = payload.get("environment", {})
    first = f"Device: {env.get('device', '?')}; torch {env.get('torch', '?')}; command: `{env.get('command', '?')}`\n\n"
    md_path.write_text((first if header else "") + table + "\n")
    return json_path, md_path
