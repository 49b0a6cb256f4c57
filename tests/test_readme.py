"""The README's quick start runs as written (on the tiny UNet instead of SD 2.1's, for time)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def quick_start_code() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1, "the quick start holds one Python block"
    return blocks[0]


def test_readme_is_a_front_page():
    assert len(README.read_text(encoding="utf-8")) <= 16_000


def test_quick_start_runs_and_restores_the_unet():
    code = quick_start_code()
    assert 'build_unet("sd21")' in code and "(80, 80)" in code  # what the README promises
    small = code.replace('build_unet("sd21")', 'build_unet("tiny-sd")').replace("(80, 80)", "(16, 16)")
    namespace: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(small, str(README), "exec"), namespace)
    assert re.search(r"stock [\d.]+ s, MaMe [\d.]+ s: [\d.]+x faster", printed.getvalue())
    error = float(namespace["error"])
    assert 0 < error < 0.5  # MaMe merged, and stayed close to stock
    # remove_mame left the UNet exactly as it was: the stock output again, bit for bit.
    _, again = namespace["forward"]()
    assert (again == namespace["stock"]).all()
