"""Which implementation of the data path runs: the Cython-compiled modules or their Python sources.

setup.py compiles the modules in `COMPILED` with Cython when it can (`pip install .`,
`python setup.py build_ext --inplace`); the .py files stay the reference implementation and the
fallback, and the same tests run against both. A compiled module, when present and built from
the source as it is now, is imported instead of it; AMQPROXY_PURE_PYTHON=1 makes every amqproxy
module load from its .py (`install_source_finder`, called by the package before any submodule
is imported).
"""

from __future__ import annotations

import enum
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from types import ModuleType

# The sans-IO protocol core, the two forwarding loops and what they call per frame or message.
COMPILED = (
    "amqproxy.protocol.codec",
    "amqproxy.protocol.frames",
    "amqproxy.protocol.content",
    "amqproxy.protocol.rules",
    "amqproxy.protocol.closing",
    "amqproxy.protocol.connection",
    "amqproxy.protocol.handshake",
    "amqproxy.protocol.errors",
    "amqproxy.channel",
    "amqproxy.outbox",
    "amqproxy.client",
    "amqproxy.client_channels",
    "amqproxy.client_handshake",
    "amqproxy.upstream",
    "amqproxy.upstream_handshake",
    "amqproxy.upstream_replies",
    "amqproxy.recovery",
)

PURE_ENV = "AMQPROXY_PURE_PYTHON"


class _SourceFinder:
    """Loads an amqproxy module from its .py source when AMQPROXY_PURE_PYTHON is set, or when its
    compiled extension is older than the source (edited since the last build: the extension
    would run old code); otherwise the usual import system finds the extension first."""

    def __init__(self, pure: bool) -> None:
        self.pure = pure

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not name.startswith("amqproxy.") or not path:
            return None
        tail = name.rpartition(".")[2]
        for directory in path:
            source = os.path.join(directory, tail + ".py")
            if not os.path.exists(source):
                continue
            if not self.pure and not _stale_extensions(directory, tail, os.path.getmtime(source)):
                return None
            loader = importlib.machinery.SourceFileLoader(name, source)
            return importlib.util.spec_from_file_location(name, source, loader=loader)
        return None


def _stale_extensions(directory: str, tail: str, source_mtime: float) -> bool:
    """An extension of this module exists beside the source, and it is older than the source."""
    extension = _extension_of(directory, tail)
    return extension is not None and os.path.getmtime(extension) < source_mtime


def _extension_of(directory: str, tail: str) -> str | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        extension = os.path.join(directory, tail + suffix)
        if os.path.exists(extension):
            return extension
    return None


def drop_enum_getattr_hook() -> None:
    """Make `Enum.MEMBER` a plain class-attribute read on Python 3.11, as it is from 3.12 on.

    3.11's `EnumType.__getattr__` (a fallback to `_member_map_`, removed in 3.12 as unneeded:
    every member is in its class's __dict__, or behind a property that finds it) puts CPython's
    slow attribute hook on every enum class: each `Effect.DRAIN` becomes a call of
    `type.__getattribute__` through a wrapper, about 600 instructions instead of 50. The data
    path compares states and effects that way a hundred times per short-lived client
    (`loadtests/hotpath.py --churn`: 1,000,174 instructions per cycle before, 956,119 after)."""
    if sys.version_info < (3, 12) and "__getattr__" in vars(enum.EnumType):
        delattr(enum.EnumType, "__getattr__")


def install_source_finder() -> None:
    if not any(isinstance(f, _SourceFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceFinder(bool(os.environ.get(PURE_ENV))))


def _from_source() -> dict[str, str]:
    """The modules of `COMPILED` loaded from their .py, with that path (imports them all)."""
    paths = {name: importlib.import_module(name).__file__ or "" for name in COMPILED}
    return {name: path for name, path in paths.items() if path.endswith(".py")}


def implementation() -> str:
    """'cython' when every module of `COMPILED` runs compiled, 'python' when none does, 'mixed'
    otherwise (some extensions are older than their sources: rebuild them, or the data path
    runs partly as Python). Imports the modules of `COMPILED`."""
    from_source = len(_from_source())
    if not from_source:
        return "cython"
    return "python" if from_source == len(COMPILED) else "mixed"


def sources_instead_of_extensions() -> list[str]:
    """The modules of `COMPILED` loaded from their .py although an extension exists beside it
    (older than the source), without AMQPROXY_PURE_PYTHON: worth a warning at start-up."""
    if os.environ.get(PURE_ENV):
        return []
    return [
        name
        for name, path in _from_source().items()
        if _extension_of(os.path.dirname(path), name.rpartition(".")[2]) is not None
    ]
