"""The layers point one way (docs/architecture.md): each test fails on an import that climbs back up."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import copy_sweep

PACKAGE = Path(__file__).resolve().parents[1] / "jepatune"
# What each layer may import, of jepatune's own packages and of the heavy libraries.
MAY_NOT_IMPORT = {
    "trainer": ("jepatune.experiment", "jepatune.analysis", "jepatune.search", "jepatune.spaces", "jepatune.cli",
                "ray", "optuna"),
    "spaces": ("jepatune.experiment", "jepatune.analysis", "jepatune.search", "jepatune.cli", "ray", "torch"),
    "experiment": ("jepatune.analysis", "jepatune.search", "jepatune.cli", "ray", "torch"),
    "analysis": ("jepatune.search", "jepatune.cli", "ray", "torch"),
    "benchmark": ("jepatune.search", "jepatune.cli", "ray"),  # records with the trainer, not Ray
    "search": ("jepatune.cli",),
}


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("layer", sorted(MAY_NOT_IMPORT))
def test_no_layer_imports_one_above_it(layer):
    climbs = [f"{path.relative_to(PACKAGE.parent)} imports {module}"
              for path in sorted((PACKAGE / layer).glob("*.py"))
              for module in sorted(imported_modules(path))
              if any(module == banned or module.startswith(banned + ".") for banned in MAY_NOT_IMPORT[layer])]
    assert not climbs, climbs


def private_uses(path: Path) -> list[str]:
    """`from jepatune.x import _name`, and `module._name` on a jepatune module the file imported."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    modules, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jepatune"):
            for alias in node.names:
                if alias.name.startswith("_") and alias.name != "__version__":
                    found.append(f"from {node.module} import {alias.name}")
                folder = PACKAGE.parent / node.module.replace(".", "/")
                if (folder / f"{alias.name}.py").is_file() or (folder / alias.name / "__init__.py").is_file():
                    modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            modules.update(a.asname for a in node.names if a.name.startswith("jepatune") and a.asname)
    found += [f"{node.value.id}.{node.attr}" for node in ast.walk(tree)
              if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and node.value.id in modules and node.attr.startswith("_")]
    return found


def test_no_private_name_is_used_across_modules():
    private = [f"{path.relative_to(PACKAGE.parent)}: {use}" for path in sorted(PACKAGE.rglob("*.py"))
               for use in private_uses(path)]
    assert not private, private


def heavy_modules_after(code: str) -> dict[str, bool]:
    """Run `code` in a fresh interpreter; say which of Ray and torch it loaded."""
    probe = code + "\nimport json, sys\nprint(json.dumps({m: m in sys.modules for m in ('ray', 'torch')}))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                         cwd=PACKAGE.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_analysis_loads_neither_ray_nor_torch():
    code = ("import jepatune.analysis\n"
            "from jepatune.analysis import ablation, explore, finalists, optuna_io, plots, replay, report, summary, "
            "tables\nimport jepatune.experiment.ray_files, jepatune.experiment.settings")
    assert heavy_modules_after(code) == {"ray": False, "torch": False}


def test_simulating_loads_neither_ray_nor_torch(tmp_path):
    # a benchmark's tables alone (no training): the simulator and its CLI run where neither is installed
    code = ("import sys; sys.path.insert(0, 'tests/benchmark')\n"
            "from test_simulate import synthetic\n"
            "from jepatune.benchmark.surrogate import Surrogate\n"
            "from jepatune.benchmark.simulate import simulate\nfrom jepatune.benchmark.strategy import Strategy\n"
            "from jepatune.benchmark import answers, from_sweep\n"
            "s = Surrogate(synthetic(n=30))\n"
            "sim = simulate(s, [Strategy(startup_trials=4)], repetitions=2, compute_trials=8)\n"
            "assert len(answers.strategy_table(sim, s.noise_floor())) == 1")
    assert heavy_modules_after(code) == {"ray": False, "torch": False}


def test_rebuilding_tables_and_analyze_load_neither_ray_nor_torch(finished_sweep_folder, tmp_path):
    folder = copy_sweep(finished_sweep_folder, tmp_path).folder
    tables = sorted((folder / "tables").glob("*.parquet"))
    for path in tables:
        path.unlink()  # so that the tables are built, not read
    rebuild = f"from jepatune.analysis.tables import write_tables\nwrite_tables({str(folder)!r})"
    assert heavy_modules_after(rebuild) == {"ray": False, "torch": False}
    assert sorted((folder / "tables").glob("*.parquet")) == tables
    analyze = f"from jepatune.cli import main\nassert main(['analyze', {str(folder)!r}]) == 0"
    assert heavy_modules_after(analyze) == {"ray": False, "torch": False}
    assert (folder / "report.md").is_file()
