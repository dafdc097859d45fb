"""The hot-path measuring tool keeps working as the loops change (it drives their internals)."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "hotpath", Path(__file__).resolve().parents[2] / "loadtests" / "hotpath.py"
)
assert _spec is not None and _spec.loader is not None
hotpath = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hotpath)


@pytest.mark.parametrize("kind", hotpath.KINDS)
def test_each_loop_forwards_every_message_of_its_reads(kind):
    assert hotpath.run(kind, reads=3) > 0
