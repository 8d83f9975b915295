"""The package's import graph follows its layers, and importing a piece pulls only what it needs.

Layers, top may import bottom, never the reverse (:data:`LAYERS`):
cli > eval > rl > curriculum > rewards > reward / policies > data > leaves. Leaves (small pure
modules and self-contained folders) may import each other as long as they form no cycle.

Two checks:

- static: every ``import finpercep.X`` / ``from finpercep.X import ...`` in ``src/finpercep``, at
  module level and inside functions, read from the source with :mod:`ast`;
- at run time: each unit is imported in a fresh process and what it pulled in (project modules and
  heavy third-party modules) is compared with the layers and with the optional extras.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import finpercep

PACKAGE = Path(finpercep.__file__).parent

LEAF = 0
LAYERS: dict[str, int] = {
    "io": LEAF,
    "types": LEAF,
    "checks": LEAF,
    "config": LEAF,
    "metrics": LEAF,
    "viz": LEAF,
    "distributed": LEAF,
    "runs": LEAF,
    "backbones": LEAF,
    "baselines": LEAF,
    "data": 1,
    "reward": 2,
    "policies": 2,
    "rewards": 3,
    "curriculum": 4,
    "rl": 5,
    "eval": 6,
    "cli": 7,
}
"""Every top-level module and subpackage of ``finpercep`` -> its layer. A unit may import units of a
strictly lower layer only (``reward`` and ``policies`` share a layer, so neither imports the other);
leaves may also import other leaves. A new module must be given its layer here."""

ROOT = "finpercep"
"""The package itself (``finpercep/__init__.py``): Python loads it before any submodule, so any unit
may read what it defines (``__version__``); its own body imports nothing from the package, and its
one project import (``load_reward``) sits in the lazy module ``__getattr__``."""

OLD_PATHS = ("finpercep.eval.metrics",)
"""Re-exports kept for users of older import paths; nothing inside the package imports through them."""

HEAVY = ("cv2", "scipy", "skimage", "matplotlib", "ncnn", "yaml", "tqdm", "diffusers", "peft", "transformers")
"""Third-party modules the probes report. tqdm is reported only: torch itself imports it."""
OPTIONAL = ("cv2", "scipy", "skimage", "matplotlib", "ncnn", "yaml", "diffusers", "peft", "transformers")
"""Modules that no unit may pull in at import time (each is imported inside the function that needs
it; scipy at import time is allowed for ``baselines`` only, see :data:`IMPORTS_SCIPY`)."""
IMPORTS_SCIPY = ("baselines",)
"""Units whose import needs scipy (the ``metrics`` extra): their own callers import them lazily."""


def unit_of(module: str) -> str:
    """``finpercep.data.sheet`` -> ``data``; ``finpercep`` -> :data:`ROOT`."""
    parts = module.split(".")
    return ROOT if len(parts) == 1 else parts[1]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _is_submodule(name: str) -> bool:
    """Whether ``finpercep.<name>`` is a module or subpackage (not an attribute of the root)."""
    return (PACKAGE / f"{name}.py").is_file() or (PACKAGE / name / "__init__.py").is_file()


def imports_in(source: str, module: str, is_package: bool = False) -> list[tuple[int, str, bool]]:
    """``(line, imported module, inside a function)`` for every import of a ``finpercep`` module in
    ``source``, the code of module ``module`` (relative imports resolved against it). ``from
    finpercep import X`` counts as an import of ``finpercep.X`` when ``X`` is a submodule, else of
    the root package."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((child.lineno, a.name, in_function) for a in child.names if a.name.split(".")[0] == ROOT)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    parts = package.split(".")
                    target = ".".join(parts[: len(parts) - (child.level - 1)] + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target == ROOT:
                    found.extend((child.lineno, f"{ROOT}.{a.name}" if _is_submodule(a.name) else ROOT, in_function)
                                 for a in child.names)
                elif target.split(".")[0] == ROOT:
                    found.append((child.lineno, target, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(source), False)
    return found


def project_imports(path: Path) -> list[tuple[int, str, bool]]:
    """:func:`imports_in` of the file ``path`` inside ``src/finpercep``."""
    return imports_in(path.read_text(encoding="utf-8"), _module_name(path), path.name == "__init__.py")


def _graph() -> tuple[dict[tuple[str, str], list[str]], set[str]]:
    """Unit-level edges ``(from, to) -> ["file:line"]`` over ``src/finpercep`` and the units seen."""
    edges: dict[tuple[str, str], list[str]] = {}
    units: set[str] = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        src = unit_of(_module_name(path))
        units.add(src)
        for line, module, _ in project_imports(path):
            dst = unit_of(module)
            if dst != src and ROOT not in (src, dst):  # the root has its own test
                edges.setdefault((src, dst), []).append(f"{path.relative_to(PACKAGE.parent)}:{line}")
    return edges, units


def _cycle(edges: set[tuple[str, str]]) -> list[str] | None:
    """One cycle of the directed graph ``edges`` as ``[a, b, ..., a]``, or None."""
    succ: dict[str, list[str]] = {}
    for a, b in edges:
        succ.setdefault(a, []).append(b)
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def dfs(u: str) -> list[str] | None:
        state[u] = 1
        path.append(u)
        for v in sorted(succ.get(u, [])):
            if state.get(v) == 1:
                return path[path.index(v):] + [v]
            if v not in state and (c := dfs(v)):
                return c
        state[u] = 2
        path.pop()
        return None

    for u in sorted(succ):
        if u not in state and (c := dfs(u)):
            return c
    return None


# ---------------------------------------------------------------------------------------------
# Static: the source


def test_imports_in_reads_every_form_of_import() -> None:
    """The AST reader sees module-level and in-function imports, ``from finpercep import X`` of a
    submodule and of a root attribute, and relative imports; :func:`_cycle` finds a cycle."""
    code = ("import finpercep.io\nfrom finpercep.data import sheet\nfrom finpercep import metrics, __version__\n"
            "from . import common\nfrom ..rewards import fused\nimport torch\n\n"
            "def f():\n    import finpercep.eval.report\n")
    assert imports_in(code, "finpercep.rl.probe") == [
        (1, "finpercep.io", False),
        (2, "finpercep.data", False),
        (3, "finpercep.metrics", False),
        (3, "finpercep", False),
        (4, "finpercep.rl", False),
        (5, "finpercep.rewards", False),
        (9, "finpercep.eval.report", True),
    ]
    assert imports_in("from . import x", "finpercep.rl", is_package=True) == [(1, "finpercep.rl", False)]
    assert _cycle({("a", "b"), ("b", "c"), ("c", "a")}) == ["a", "b", "c", "a"]
    assert _cycle({("a", "b"), ("b", "c"), ("a", "c")}) is None


def test_every_unit_has_a_layer() -> None:
    _, units = _graph()
    units.discard(ROOT)
    assert units == set(LAYERS), (
        f"units without a layer: {sorted(units - set(LAYERS))}; layers without a unit: {sorted(set(LAYERS) - units)} "
        "(give a new module its place in LAYERS)"
    )


def test_imports_go_down_the_layers_and_form_no_cycle() -> None:
    edges, _ = _graph()
    wrong = [
        f"{a} (layer {LAYERS[a]}) -> {b} (layer {LAYERS[b]}) at {', '.join(where)}"
        for (a, b), where in sorted(edges.items())
        if not (LAYERS[b] < LAYERS[a] or LAYERS[a] == LAYERS[b] == LEAF)
    ]
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)
    cycle = _cycle(set(edges))
    assert cycle is None, f"folder-level import cycle: {' -> '.join(cycle or [])}"


def test_root_package_imports_nothing_eagerly_and_nobody_uses_old_paths() -> None:
    root = [(line, m) for line, m, lazy in project_imports(PACKAGE / "__init__.py") if not lazy]
    assert root == [], f"finpercep/__init__.py imports {root} at import time; import inside __getattr__ instead"
    # `from finpercep import NAME` elsewhere may read only what the root itself defines (__version__):
    # its lazy names (load_reward) would hide an edge to a higher layer.
    body = ast.parse((PACKAGE / "__init__.py").read_text(encoding="utf-8")).body
    defined = {t.id for n in body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    lazy_reads = [f"{path.relative_to(PACKAGE.parent)}:{n.lineno} reads finpercep.{a.name}"
                  for path in sorted(PACKAGE.rglob("*.py"))
                  for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                  if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module == ROOT
                  for a in n.names if not _is_submodule(a.name) and a.name not in defined]
    assert not lazy_reads, "import from the defining module instead:\n" + "\n".join(lazy_reads)
    old = [f"{path.relative_to(PACKAGE.parent)}:{line} imports {m}"
           for path in sorted(PACKAGE.rglob("*.py")) if _module_name(path) not in OLD_PATHS
           for line, m, _ in project_imports(path) if m in OLD_PATHS]
    assert not old, "import the leaf, not the old path:\n" + "\n".join(old)


def test_old_metric_path_reexports_the_same_objects() -> None:
    import finpercep.eval as ev
    import finpercep.eval.metrics as old
    import finpercep.metrics as new

    assert old.__all__ and all(getattr(old, n) is getattr(new, n) for n in old.__all__)
    assert ev.pixel_auroc is new.pixel_auroc and ev.order_accuracy is new.order_accuracy


# ---------------------------------------------------------------------------------------------
# Run time: what importing each unit pulls in

_PROBE = r"""
import json, os, sys
import numpy, PIL.Image, torch  # third-party core, loaded once before the probes fork

HEAVY, OPTIONAL, targets = (json.loads(a) for a in sys.argv[1:4])
assert not [m for m in sys.modules if m.split(".")[0] in OPTIONAL or m.startswith("finpercep")], "probe not clean"
results = {}
for name, code in targets.items():
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a child that has never imported finpercep runs one target
        os.close(r)
        try:
            exec(code, {})
            out = {"finpercep": sorted(m for m in sys.modules if m.startswith("finpercep")),
                   "heavy": sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))}
        except BaseException as e:
            out = {"error": f"{type(e).__name__}: {e}"}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    results[name] = json.loads(data)
print(json.dumps(results))
"""


def _probe(targets: dict[str, str]) -> dict[str, dict[str, list[str]]]:
    """Run each target's code in its own fresh child process (forked from one interpreter that has
    imported only numpy, PIL and torch) and return what each pulled in."""
    if not hasattr(os, "fork"):
        pytest.skip("the import probe forks one child per unit (POSIX only)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(HEAVY), json.dumps(OPTIONAL), json.dumps(targets)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    errors = {k: v["error"] for k, v in results.items() if "error" in v}
    assert not errors, f"imports failed: {errors}"
    for name, got in results.items():  # shown with -s, and in the report of a failing test
        units = sorted({unit_of(m) for m in got["finpercep"]} - {ROOT})
        print(f"{name:32s} units={units} heavy={got['heavy']}")
    return results


@pytest.fixture(scope="module")
def pulled() -> dict[str, dict[str, list[str]]]:
    targets = {unit: f"import finpercep.{unit}" for unit in LAYERS}
    targets["finpercep"] = "import finpercep"
    targets["finpercep.load_reward"] = "import finpercep; finpercep.load_reward"
    targets["finpercep.curriculum.schedule"] = "import finpercep.curriculum.schedule"
    for module in DIFFUSERS_MODULES:  # the diffusers extra is imported inside their functions only
        targets[module] = f"import {module}"
    return _probe(targets)


@pytest.mark.parametrize("unit", list(LAYERS))
def test_importing_a_unit_pulls_nothing_from_its_layer_or_above(pulled: dict, unit: str) -> None:
    got = pulled[unit]
    above = sorted(m for m in got["finpercep"]
                   if (u := unit_of(m)) not in (ROOT, unit)
                   and not (LAYERS[u] < LAYERS[unit] or LAYERS[u] == LAYERS[unit] == LEAF))
    assert not above, f"import finpercep.{unit} pulled in {above}"
    optional = sorted(set(got["heavy"]) & set(OPTIONAL) - ({"scipy"} if unit in IMPORTS_SCIPY else set()))
    assert not optional, f"import finpercep.{unit} pulled in {optional}; import them inside the function that needs them"


def test_import_finpercep_and_load_reward_stay_light(pulled: dict) -> None:
    assert pulled["finpercep"]["finpercep"] == ["finpercep"]
    got = pulled["finpercep.load_reward"]
    assert not set(got["heavy"]) & set(OPTIONAL), got["heavy"]
    assert {unit_of(m) for m in got["finpercep"]} <= {ROOT, "reward", "backbones", "checks", "config", "io", "types"}


DIFFUSERS_MODULES = ("finpercep.policies.diffusion_onestep", "finpercep.policies.diffusion_multistep",
                     "finpercep.policies.diffusion_base", "finpercep.policies.diffusers_folder",
                     "finpercep.policies.diffusers_tiny")
"""The modules of the ``diffusers`` extra (diffusers, peft, transformers): importing them pulls none of it."""


@pytest.mark.parametrize("module", DIFFUSERS_MODULES)
def test_the_diffusers_policy_modules_import_without_the_extra(pulled: dict, module: str) -> None:
    assert not set(pulled[module]["heavy"]) & {"diffusers", "peft", "transformers"}, pulled[module]["heavy"]


def test_curriculum_schedule_does_not_load_the_reward_model(pulled: dict) -> None:
    got = pulled["finpercep.curriculum.schedule"]["finpercep"]
    assert not [m for m in got if m.startswith(("finpercep.reward.model", "finpercep.reward.api",
                                                "finpercep.backbones", "finpercep.data", "finpercep.policies"))], got


# ---------------------------------------------------------------------------------------------
# Optional extras: a missing one fails where it is needed, naming the extra


def test_require_returns_the_module_or_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from finpercep.checks import require

    assert require("json", extra="core") is json
    assert require("os.path", extra="core") is os.path
    monkeypatch.setitem(sys.modules, "cv2", None)  # what an environment without opencv looks like
    with pytest.raises(ImportError, match=r"cv2 is not installed .*pip install 'finpercep\[data\]'"):
        require("cv2", extra="data")
    with pytest.raises(ImportError, match=r"scipy\.no_such_module is not installed .*'finpercep\[metrics\]'"):
        require("scipy.no_such_module", extra="metrics")
    # An installed module that itself imports something missing is a bug there, not a missing extra.
    (tmp_path / "fp_broken_dep.py").write_text("import fp_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="fp_no_such_dependency") as e:
        require("fp_broken_dep", extra="data")
    assert "finpercep[" not in str(e.value)


def test_a_missing_extra_fails_in_the_function_that_needs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from finpercep.data.degradations import jpeg_compress
    from finpercep.viz import heatmap_overlay, pyplot

    assert pyplot().get_backend().lower() == "agg"  # installed: files only, no display needed
    img = torch.rand(3, 8, 8)
    monkeypatch.setitem(sys.modules, "cv2", None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"finpercep\[data\]"):
        jpeg_compress(img, 50)
    with pytest.raises(ImportError, match=r"finpercep\[report\]"):
        heatmap_overlay(img, torch.zeros(8, 8))
    with pytest.raises(ImportError, match=r"finpercep\[report\]"):
        pyplot()
