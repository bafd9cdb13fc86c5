"""The code's shape (issue: one folder per stage): layering, task signatures, module size.

These fail when a move breaks something silently: a Spark worker or training rank that would
import Prefect, a task called positionally, a plain function shadowed by a task of its name.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = [p for d in ("tasks", "blocks") for p in sorted((ROOT / d).rglob("*.py"))]
# Modules Spark's Python workers and torchrun ranks import: no Prefect, ever.
WORKER_AND_RANK_MODULES = [
    "tasks.silver.cleaning",
    "tasks.silver.parts",
    "tasks.silver.tokenize",
    "tasks.train.run",
    "tasks.train.launch",
    "tasks.train.packing",
    "tasks.train.noise",
    "tasks.train.data",
]
PREFECT_ALLOWED = {"tasks.py", "report.py", "retry.py"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(rel.parts).removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    """Every module an import statement names (lazy ones inside functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def test_nothing_under_tasks_or_blocks_imports_flows():
    offenders = {
        _module_name(p): sorted(m for m in _imports(p) if m == "flows" or m.startswith("flows."))
        for p in PRODUCT
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_prefect_is_imported_only_by_stage_tasks_reporting_retry_and_blocks():
    offenders = [
        _module_name(p)
        for p in (ROOT / "tasks").rglob("*.py")
        if p.name not in PREFECT_ALLOWED
        and any(m == "prefect" or m.startswith("prefect.") for m in _imports(p))
    ]
    assert offenders == []


def test_no_product_module_is_much_over_500_lines():
    sizes = {
        _module_name(p): len(p.read_text(encoding="utf-8").splitlines())
        for p in PRODUCT + sorted((ROOT / "flows").glob("*.py"))
    }
    assert {k: n for k, n in sizes.items() if n > 520} == {}


def test_no_class_is_defined_inside_a_function():
    nested = []
    for p in PRODUCT + sorted((ROOT / "flows").glob("*.py")):
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                nested += [
                    f"{_module_name(p)}.{node.name}.{c.name}"
                    for c in ast.walk(node)
                    if isinstance(c, ast.ClassDef)
                ]
    assert nested == []


def _prefect_tasks():
    from prefect import Task

    for path in (ROOT / "tasks").rglob("tasks.py"):
        module = importlib.import_module(_module_name(path))
        for name, obj in vars(module).items():
            if isinstance(obj, Task) and obj.fn.__module__ == module.__name__:
                yield module, name, obj


def test_every_prefect_task_takes_keyword_only_arguments():
    tasks = list(_prefect_tasks())
    assert len(tasks) >= 8  # bronze, silver, train, tracking, landing, pipeline tasks
    positional = [
        f"{m.__name__}.{name}({p})"
        for m, name, t in tasks
        for p, param in inspect.signature(t.fn).parameters.items()
        if param.kind is not inspect.Parameter.KEYWORD_ONLY
    ]
    assert positional == []


def test_no_task_shares_its_name_with_a_plain_function():
    plain = {}
    for p in (ROOT / "tasks").rglob("*.py"):
        if p.name == "tasks.py":
            continue
        for node in ast.parse(p.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.FunctionDef):
                plain.setdefault(node.name, _module_name(p))
    clashes = {
        f"{m.__name__}.{name}": plain[fn_name]
        for m, name, t in _prefect_tasks()
        for fn_name in {name, t.fn.__name__}
        if fn_name in plain
    }
    assert clashes == {}


def test_repeated_helpers_exist_once():
    """The slug rule, the repo root and the loss-curve plot each have one definition."""
    sources = {
        _module_name(p): p.read_text(encoding="utf-8")
        for p in PRODUCT + sorted((ROOT / "flows").glob("*.py"))
    }
    slug_rule = [m for m, s in sources.items() if 'r"[^A-Za-z0-9_.-]+"' in s]
    assert slug_rule == ["tasks.lakehouse.layout"]
    roots = [m for m, s in sources.items() if "Path(__file__).resolve().parent.parent" in s]
    assert roots == ["tasks"]
    plots = [m for m, s in sources.items() if "def plot_loss_curve(" in s]
    assert len(plots) == 1, plots


def test_worker_and_rank_modules_import_without_prefect(tmp_path):
    """In a fresh interpreter: what Spark workers and torchrun ranks load pulls in no Prefect."""
    code = (
        "import importlib, json, sys\n"
        f"for m in {WORKER_AND_RANK_MODULES!r}:\n"
        "    importlib.import_module(m)\n"
        "print(json.dumps(sorted(k for k in sys.modules if k.split('.')[0] == 'prefect')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_spark_worker_zip_is_self_sufficient(tmp_path):
    """The zip shipped to Spark workers imports the tokenize module with nothing else on path."""
    from tasks.silver.spark import WORKER_MODULES

    zpath = tmp_path / "worker.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for rel in WORKER_MODULES:
            z.write(ROOT / rel, rel)
    code = (
        f"import sys; sys.path = [p for p in sys.path if p not in ('', '.', {str(ROOT)!r})]\n"
        f"sys.path.insert(0, {str(zpath)!r})\n"
        "import tasks.silver.tokenize as t\n"
        "assert t.__file__.startswith(sys.path[0]), t.__file__\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-I", "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_cli_user_error_names_the_file_without_importing_torch(tmp_path):
    missing = tmp_path / "nope.jsonl"
    code = (
        "import sys, runpy\n"
        "sys.argv = ['flows', 'bronze', '--set', 'source.dataset=json', '--set', "
        f"'source.data_files={missing}', '--set', 'lakehouse.root={tmp_path / 'lake'}']\n"
        "try:\n"
        "    runpy.run_module('flows', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code, 'torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    last = out.stdout.strip().splitlines()[-1]
    assert last == "exit 2 False", out.stdout[-2000:] + out.stderr[-2000:]
    assert "nope.jsonl" in out.stdout + out.stderr


@pytest.mark.parametrize("name", ["pipeline", "bronze", "silver", "train", "watch", "maintain"])
def test_flow_help_works(name):
    out = subprocess.run(
        [sys.executable, "-m", "flows", name, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0 and "--set" in out.stdout
