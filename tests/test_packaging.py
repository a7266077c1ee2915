"""The built wheel holds the recipes: installed into a fresh environment outside the checkout,
``pda train`` resolves them and ``pda train --help`` runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "src" / "primal_dual_attention" / "configs"

RESOLVE = """
import json
import primal_dual_attention
from primal_dual_attention.cli import build_parser, resolve_config
from primal_dual_attention.training.config import dataset_config_path

recipe = dataset_config_path("uea", "Handwriting")
out = {"package": primal_dual_attention.__file__, "recipe": str(recipe), "found": recipe.is_file()}
for argv in (["train", "--dataset", "Handwriting"], ["train", "--task", "lra-listops"]):
    out[argv[-1]] = resolve_config(build_parser().parse_args(argv)).to_dict()
print(json.dumps(out))
"""


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result.stdout


def test_wheel_installed_outside_the_checkout_resolves_the_bundled_recipes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    _run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-w",
          str(tmp_path / "wheels")], source, env)
    (wheel,) = (tmp_path / "wheels").glob("primal_dual_attention-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
          str(wheel)], tmp_path, env)
    # this environment's dependencies, without the editable install of this package: path lines
    # of a .pth file join sys.path, but the .pth files inside that folder are not processed
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                     tmp_path, env).strip())
    ours = dict.fromkeys((sysconfig.get_path("purelib"), sysconfig.get_path("platlib")))
    (site / "dependencies.pth").write_text("\n".join(ours) + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = json.loads(_run([str(python), "-c", RESOLVE], elsewhere, env))
    assert Path(out["package"]).is_relative_to(venv) and Path(out["recipe"]).is_relative_to(venv)
    assert out["found"]
    for name, recipe in (("Handwriting", "uea/Handwriting.yaml"), ("lra-listops", "lra/listops.yaml")):
        expected = yaml.safe_load((RECIPES / recipe).read_text())
        assert {k: out[name][k] for k in expected} == expected, name
    assert out["lra-listops"]["dim"] == 64  # not the default 128: the recipe was applied

    help_text = _run([str(venv / "bin" / "pda"), "train", "--help"], elsewhere, env)
    assert "--dataset" in help_text
