"""No dead public code: every public function, class and method under src/ is used by src/
(scripts/check_unused.py; framework entry points listed in scripts/check_unused_allow.txt)."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_unused", ROOT / "scripts" / "check_unused.py")
check_unused = sys.modules["check_unused"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_unused)


def test_the_check_finds_unused_definitions_and_only_those(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text('''"""Mentions unused_fn in prose, which is no use."""
__all__ = ["unused_fn", "used"]


def used(): ...
def unused_fn(): ...
def dyn(): ...
def _private(): ...


@app.get("/x")
def route(): ...


class Model:
    def forward(self): ...
    def meth_unused(self): ...
    def called(self): ...


class Orphan: ...
''')
    (tmp_path / "pkg" / "b.py").write_text('''from .a import Model, unused_fn, used
used()
Model().called()
getattr(object, "dyn")
''')
    found = check_unused.unused(tmp_path, allow={"forward"})
    assert {d.qualname for d in found} == {"unused_fn", "Model.meth_unused", "Orphan"}
    assert {d.kind for d in found} == {"function", "method", "class"}
    # an allow-list entry for one definition only
    found = check_unused.unused(tmp_path, allow={"forward", "Model.meth_unused", "pkg.a:Orphan"})
    assert [d.qualname for d in found] == ["unused_fn"]


def test_src_has_no_unused_public_definitions():
    found = check_unused.unused(ROOT / "src")
    listing = "\n".join(f"{d.path.relative_to(ROOT)}:{d.line}: {d.kind} {d.qualname}"
                        for d in found)
    assert not found, f"public definitions that nothing in src/ uses:\n{listing}"
