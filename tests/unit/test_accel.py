"""The compiled data path and its Python reference: which one runs, and that both are tested."""

from __future__ import annotations

import ast
import importlib.machinery
import os
import subprocess
import sys
from pathlib import Path

import pytest

from amqproxy import accel

ROOT = Path(__file__).resolve().parents[2]


def test_setup_compiles_exactly_the_modules_accel_names():
    tree = ast.parse((ROOT / "setup.py").read_text())
    (listed,) = [
        node.value for node in ast.walk(tree) if isinstance(node, ast.Assign) and node.targets[0].id == "COMPILED"
    ]
    paths = [ast.literal_eval(element) for element in listed.elts]
    assert [p.removesuffix(".py").replace("/", ".") for p in paths] == list(accel.COMPILED)


def _implementation(env: dict[str, str]) -> str:
    """`amqproxy --version` run with `env` on top of this test's environment, less the switch to
    the Python sources (the pure-Python run of the unit tests sets it)."""
    inherited = {key: value for key, value in os.environ.items() if key != accel.PURE_ENV}
    result = subprocess.run(
        [sys.executable, "-m", "amqproxy", "--version"],
        cwd=ROOT,
        env={**inherited, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split("(")[1].split()[0]


def test_the_version_says_which_implementation_runs():
    compiled = any(
        (ROOT / (name.replace(".", "/") + suffix)).exists()
        for name in accel.COMPILED
        for suffix in importlib.machinery.EXTENSION_SUFFIXES
    )
    assert _implementation({}) == ("cython" if compiled else "python")
    assert _implementation({accel.PURE_ENV: "1"}) == "python"


def test_this_test_run_uses_the_implementation_it_was_asked_for():
    """tox runs the suite with the compiled modules it has just built, then the unit tests again
    with AMQPROXY_PURE_PYTHON=1; AMQPROXY_TEST_IMPLEMENTATION says which this run must be."""
    expected = os.environ.get("AMQPROXY_TEST_IMPLEMENTATION")
    if not expected:
        pytest.skip("AMQPROXY_TEST_IMPLEMENTATION not set (tox sets it)")
    assert accel.implementation() == expected
