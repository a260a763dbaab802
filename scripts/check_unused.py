#!/usr/bin/env python3
"""List public functions, classes and methods defined under src/ that nothing under src/ uses.

A definition counts as used when its name appears anywhere in src/ other than its own `def` or
`class` line: as a name, an attribute (`obj.name`), a keyword argument, or a string literal
(getattr-style lookups). Re-exports do not count: `__all__` lists and import statements only
pass a name on. Name-based like vulture, so a name used anywhere keeps every definition of it.

Framework entry points are not "unused": functions under a call decorator (`@app.get(...)`,
`@field_validator(...)`), and the names in scripts/check_unused_allow.txt (one per line,
`name  # why`; `Class.method` or `module:name` to allow one definition only).

Usage: scripts/check_unused.py [SRC_DIR]; prints `path:line: kind name` and exits 1 if any.
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALLOW_FILE = Path(__file__).with_name("check_unused_allow.txt")


@dataclass(frozen=True)
class Definition:
    path: Path
    line: int
    kind: str  # function | class | method
    name: str
    qualname: str  # Class.method or name
    module: str  # dotted module path relative to the source root


def _is_public(name: str) -> bool:
    return not name.startswith("_")


def _entry_point(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> bool:
    """Decorated with a call (`@app.get("/x")`, `@validator("f")`): the framework calls it."""
    return any(isinstance(d, ast.Call) for d in node.decorator_list)


def definitions(tree: ast.Module, path: Path, module: str) -> list[Definition]:
    out = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            kind = "class" if isinstance(node, ast.ClassDef) else "function"
            if _is_public(node.name) and not _entry_point(node):
                out.append(Definition(path, node.lineno, kind, node.name, node.name, module))
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if (isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
                            and _is_public(item.name) and not _entry_point(item)):
                        out.append(Definition(path, item.lineno, "method", item.name,
                                              f"{node.name}.{item.name}", module))
    return out


def _all_lists(tree: ast.Module) -> set[int]:
    """ids of the string nodes inside `__all__ = [...]` (re-exports, not uses)."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
                ids.update(id(n) for n in ast.walk(node.value) if isinstance(n, ast.Constant))
    return ids


def _docstrings(tree: ast.Module) -> set[int]:
    """ids of docstring nodes: prose that names a function does not use it."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def references(tree: ast.Module) -> set[str]:
    """Every name this module uses: names, attributes, keywords, and strings that are a name
    or a dotted / `module:name` path (getattr, entry points), but not prose."""
    skip = _all_lists(tree) | _docstrings(tree)
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            used.add(node.id)
        elif isinstance(node, ast.Attribute):
            used.add(node.attr)
        elif isinstance(node, ast.keyword) and node.arg:
            used.add(node.arg)
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and id(node) not in skip):
            parts = node.value.strip().replace(":", ".").split(".")
            if all(w.isidentifier() for w in parts):
                used.update(parts)
    return used


def load_allow(path: Path = ALLOW_FILE) -> set[str]:
    if not path.is_file():
        return set()
    return {line.split("#", 1)[0].strip() for line in path.read_text().splitlines()
            if line.split("#", 1)[0].strip()}


def unused(src: Path, allow: set[str] | None = None) -> list[Definition]:
    """Public definitions under `src` that nothing under `src` uses, in file order."""
    allow = load_allow() if allow is None else allow
    defs: list[Definition] = []
    used: set[str] = set()
    for path in sorted(src.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        module = ".".join(path.relative_to(src).with_suffix("").parts)
        defs += definitions(tree, path, module)
        used |= references(tree)
    return [d for d in defs if d.name not in used and d.name not in allow
            and d.qualname not in allow and f"{d.module}:{d.qualname}" not in allow]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    src = Path(argv[0]) if argv else ROOT / "src"
    found = unused(src)
    for d in found:
        where = d.path.relative_to(ROOT) if d.path.is_relative_to(ROOT) else d.path
        print(f"{where}:{d.line}: {d.kind} {d.qualname}")
    if found:
        print(f"{len(found)} public definitions that nothing in {src} uses: delete them, use "
              f"them, or list a framework entry point in {ALLOW_FILE.name}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
