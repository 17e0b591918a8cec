"""The external programs the driver runs, derived from its source (not a hand-kept list).

Scans every module of the package with `ast` and collects:
- argv[0] of each process it starts: the first element of a list/tuple literal passed as the
  first argument of a call named run / Popen / check_output / check_call / call (directly, or
  through a local variable assigned such a literal in the same function, `argv = [...]`);
- names passed to shutil.which("...");
- module-level constants named *TOOLS (tuple/list/set of names, or a dict keyed by them), the
  driver's own declaration of what it needs (checked at start-up).
An argv[0] built with an f-string (f"mkfs.{fs_type}") is returned as a template ("mkfs.{}");
expand() turns templates into names with the values the caller supplies, and refuses a
template it was given no values for (so a new dynamic tool name cannot slip through).
"""
from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

RUNNERS = frozenset({"run", "Popen", "check_output", "check_call", "call"})
_TOOLS_NAME = re.compile(r"(^|_)TOOLS$")


@dataclass
class Scan:
    tools: dict[str, set[str]] = field(default_factory=dict)       # name -> "file:line" sources
    templates: dict[str, set[str]] = field(default_factory=dict)   # "mkfs.{}" -> sources

    def add(self, table: dict[str, set[str]], name: str, where: str) -> None:
        table.setdefault(name, set()).add(where)


def _call_name(node: ast.Call) -> str:
    f = node.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


def _head(node: ast.AST) -> ast.AST | None:
    """The first element of an argv literal (also `[..] + rest`)."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _head(node.left)
    if isinstance(node, (ast.List, ast.Tuple)) and node.elts:
        return node.elts[0]
    return None


def _record(scan: Scan, head: ast.AST | None, where: str) -> None:
    if isinstance(head, ast.Constant) and isinstance(head.value, str) and head.value:
        scan.add(scan.tools, head.value, where)
    elif isinstance(head, ast.JoinedStr):
        parts = ["{}" if isinstance(v, ast.FormattedValue) else str(v.value)
                 for v in head.values if isinstance(v, (ast.FormattedValue, ast.Constant))]
        scan.add(scan.templates, "".join(parts), where)


def _local_argvs(func: ast.AST) -> dict[str, list[ast.AST]]:
    out: dict[str, list[ast.AST]] = {}
    for node in ast.walk(func):
        if isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name) and _head(node.value) is not None:
                    out.setdefault(t.id, []).append(node.value)
    return out


def _scan_scope(scan: Scan, scope: ast.AST, rel: str) -> None:
    local = _local_argvs(scope)
    for node in ast.walk(scope):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        name, first = _call_name(node), node.args[0]
        where = f"{rel}:{node.lineno}"
        if name == "which":
            _record(scan, first, where)
        elif name in RUNNERS:
            while isinstance(first, ast.BinOp) and isinstance(first.op, ast.Add):
                first = first.left               # argv + [dev]
            if isinstance(first, ast.Name):
                for value in local.get(first.id, []):
                    _record(scan, _head(value), where)
            else:
                _record(scan, _head(first), where)


def _scan_constants(scan: Scan, tree: ast.Module, rel: str) -> None:
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, ast.AnnAssign) and node.value is not None else []
        value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
        if not any(isinstance(t, ast.Name) and _TOOLS_NAME.search(t.id) for t in targets):
            continue
        elts = value.keys if isinstance(value, ast.Dict) else \
            value.elts if isinstance(value, (ast.Tuple, ast.List, ast.Set)) else []
        for e in elts:
            _record(scan, e, f"{rel}:{node.lineno}")


def scan_package(root: Path) -> Scan:
    """Scan every .py file below `root` (a package directory)."""
    scan = Scan()
    for path in sorted(root.rglob("*.py")):
        rel = str(path.relative_to(root.parent))
        tree = ast.parse(path.read_text(), filename=rel)
        _scan_constants(scan, tree, rel)
        for node in ast.walk(tree):          # a variable argv is resolved within its function
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                _scan_scope(scan, node, rel)
    return scan


def expand(scan: Scan, values: Mapping[str, Iterable[str]]) -> dict[str, set[str]]:
    """Tool names with their sources, templates expanded with `values[template]`."""
    out = {k: set(v) for k, v in scan.tools.items()}
    missing = sorted(t for t in scan.templates if t not in values)
    if missing:
        raise ValueError(f"argv[0] templates with no known values: {missing} "
                         f"(from {[sorted(scan.templates[t]) for t in missing]}); "
                         f"tell the caller which names they expand to")
    for template, sources in scan.templates.items():
        for v in values[template]:
            out.setdefault(template.replace("{}", v, 1), set()).update(sources)
    return out
