"""The compiled data path and its Python reference: which one runs, and that both are tested."""

from __future__ import annotations

import ast
import importlib.machinery
import os
import shutil
import subprocess
import sys
import time
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


def _implementation(env: dict[str, str], root: Path = ROOT) -> str:
    """`amqproxy --version` run with `env` on top of this test's environment, less the switch to
    the Python sources (the pure-Python run of the unit tests sets it)."""
    inherited = {key: value for key, value in os.environ.items() if key != accel.PURE_ENV}
    result = subprocess.run(
        [sys.executable, "-m", "amqproxy", "--version"],
        cwd=root,
        env={**inherited, "PYTHONPATH": str(root), **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split("(")[1].split()[0]


def _fresh_extension(root: Path, name: str) -> bool:
    """The module's extension exists and was built from its source as it is now."""
    source = root / (name.replace(".", "/") + ".py")
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        extension = source.with_name(source.stem + suffix)
        if extension.exists():
            return extension.stat().st_mtime >= source.stat().st_mtime
    return False


def test_the_version_says_which_implementation_runs():
    fresh = [_fresh_extension(ROOT, name) for name in accel.COMPILED]
    expected = "cython" if all(fresh) else "mixed" if any(fresh) else "python"
    assert _implementation({}) == expected
    assert _implementation({accel.PURE_ENV: "1"}) == "python"


def test_a_source_edited_since_the_build_runs_as_python_and_the_version_says_mixed(tmp_path):
    if not all(_fresh_extension(ROOT, name) for name in accel.COMPILED):
        pytest.skip("needs the compiled modules, freshly built (python setup.py build_ext --inplace)")
    shutil.copytree(ROOT / "amqproxy", tmp_path / "amqproxy", copy_function=shutil.copy2)  # mtimes kept
    edited = tmp_path / "amqproxy" / "outbox.py"
    later = time.time() + 10  # after every extension's build
    os.utime(edited, (later, later))
    assert _implementation({}, tmp_path) == "mixed"
    assert _implementation({accel.PURE_ENV: "1"}, tmp_path) == "python"


def test_this_test_run_uses_the_implementation_it_was_asked_for():
    """tox runs the suite with the compiled modules it has just built, then the unit tests again
    with AMQPROXY_PURE_PYTHON=1; AMQPROXY_TEST_IMPLEMENTATION says which this run must be."""
    expected = os.environ.get("AMQPROXY_TEST_IMPLEMENTATION")
    if not expected:
        pytest.skip("AMQPROXY_TEST_IMPLEMENTATION not set (tox sets it)")
    assert accel.implementation() == expected


def test_enum_members_read_as_plain_class_attributes():
    """amqproxy drops 3.11's EnumType.__getattr__ (gone in 3.12): members, lookups by name and
    value, and a member named like an Enum property still resolve; misses still raise."""
    import enum

    from amqproxy.protocol.closing import Effect

    assert "__getattr__" not in vars(enum.EnumType)

    class Odd(enum.Enum):
        name = "n"  # shadows Enum.name: 3.11 puts a property in the class dict for it
        value = "v"
        PLAIN = "p"

    assert Odd.name.value == "n" and Odd.value.name == "value" and Odd.PLAIN is Odd("p") is Odd["PLAIN"]
    assert Effect.DRAIN is Effect("drain") is Effect["DRAIN"] and Effect.DRAIN.name == "DRAIN"
    with pytest.raises(AttributeError):
        Effect.MISSING  # noqa: B018
    with pytest.raises(AttributeError):
        Effect.__missing_dunder__  # noqa: B018
