"""`make run` installs only what running needs; `make test` adds the dev extras. The
product's modules import nothing from the dev extras, so the lean install runs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("events", "actors", "streams", "infra")


def _dry_run(target: str, into: Path) -> str:
    """What `make TARGET` would run on a fresh clone (no .venv yet)."""
    for name in ("Makefile", "pyproject.toml", "requirements-lock.txt"):
        shutil.copy2(ROOT / name, into / name)
    done = subprocess.run(
        ["make", "-n", target], cwd=into, capture_output=True, text=True, check=True
    )
    return done.stdout


def test_make_run_installs_the_runtime_only(tmp_path: Path) -> None:
    installs = [line for line in _dry_run("run", tmp_path).splitlines() if "pip install" in line]
    assert any(line.rstrip().endswith("-e .") for line in installs), installs
    assert not any("[dev]" in line for line in installs), installs


def test_make_test_adds_the_dev_extras(tmp_path: Path) -> None:
    plan = _dry_run("test", tmp_path)
    assert "-e '.[dev]'" in plan, plan


def test_the_product_imports_nothing_from_the_dev_extras() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["dev"]
    # Distribution names to import names (the ones that differ).
    renamed = {"import-linter": "importlinter", "kubernetes-validate": "kubernetes_validate",
               "confluent-kafka": "confluent_kafka", "pytest-asyncio": "pytest_asyncio",
               "pytest-timeout": "pytest_timeout"}  # fmt: skip
    dev = {renamed.get(n, n) for n in (spec.split("==")[0] for spec in extras)}
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for package in PRODUCT
        for p in (ROOT / package).rglob("*.py")
    )
    probe = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(dev)!r})))\n"
    )
    # Without the coverage of the suite's own processes (it would load `coverage`).
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")}
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", f"the product imports dev extras: {done.stdout}"
