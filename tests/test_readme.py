"""Every Python example in README.md and docs/ runs as written, so the documentation cannot drift
from the API. Names an example leaves to the reader (a prompt, keys, a padding mask) come from
``_reader_inputs``; everything else the example must import or build itself."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from primal_dual_attention import MultiHeadAttention

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
OPTIONAL_PACKAGES = ("timm", "transformers")


def _examples() -> list:
    examples = []
    for document in DOCUMENTS:
        text = document.read_text()
        for match in PYTHON_BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            name = f"{document.relative_to(ROOT)}:{line}"
            examples.append(pytest.param(match.group(1), id=name))
    return examples


def _reader_inputs() -> dict[str, object]:
    """The free names of the examples: batch 2, 7 tokens, dim 128 in 8 heads of 16; the second
    sequence ends in one padding token (True = padding, SPEC §1)."""
    batch, tokens, dim, heads = 2, 7, 128, 8
    pad = torch.zeros(batch, tokens, dtype=torch.bool)
    pad[1, -1] = True
    head_shape = (batch, heads, tokens, dim // heads)
    return {
        "prompt": torch.randn(batch, tokens, dim),
        "x_next": torch.randn(batch, 1, dim),
        "x_t": torch.randn(batch, 1, dim),
        "prompt_ids": torch.randint(0, 256, (batch, 5)),
        "input_ids": torch.randint(0, 32000, (batch, 6)),
        "mask": torch.ones(batch, 6, dtype=torch.long),
        "q": torch.randn(head_shape),
        "k": torch.randn(head_shape),
        "v": torch.randn(head_shape),
        "pad": pad,
        "layer": MultiHeadAttention(dim, heads, variant="bn_sh", causal=True),
    }


def test_the_documents_have_examples():
    assert len(_examples()) >= 6


@pytest.mark.parametrize("source", _examples())
def test_documented_example_runs(source: str):
    for package in OPTIONAL_PACKAGES:
        if re.search(rf"^\s*(import|from) {package}\b", source, re.M):
            pytest.importorskip(package)
    exec(compile(source, "<example>", "exec"), _reader_inputs())
