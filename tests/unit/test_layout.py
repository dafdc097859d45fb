"""The package's layout rules, checked: modules import each other in one direction only.

Imports used only for type hints count too: they are coupling all the same. The legs of the
proxy meet through the Protocols in channel.py (ClientLeg, ChannelSink), the pool through
upstream.UpstreamPool and pool.ChannelOwner, the proxy through client.SessionHost,
admin.AdminTarget and metrics.LiveSource; the settings through tls.TLSSettings, auth.AuthSettings
and limits.LimitSettings.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "amqproxy"


def import_graph() -> dict[str, set[str]]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.with_suffix("").relative_to(PACKAGE.parent).parts)
        modules[name.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    graph[name].add(full if full in modules else target)
            elif isinstance(node, ast.Import):
                graph[name].update(alias.name for alias in node.names)
        graph[name] = {target for target in graph[name] if target in modules and target != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    found = cycles(import_graph())
    assert found == [], f"modules importing each other in a circle: {found}"


def test_the_two_legs_never_import_each_other():
    graph = import_graph()
    assert "amqproxy.client" not in graph["amqproxy.upstream"]
    assert "amqproxy.upstream" not in graph["amqproxy.channel"]
    assert "amqproxy.client" not in graph["amqproxy.channel"]
    assert not graph["amqproxy.protocol.closing"] - {"amqproxy.protocol"}
