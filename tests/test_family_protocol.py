"""The family protocol holds: nothing outside `model/<family>/` imports a concrete family or
names its module attributes (parallelism, training, checkpoints, inference and the planner read
the FamilySpec), and every registered family honours the spec's contract."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from meshlm.model.registry import BUILTIN, build_model, family_names, family_spec, meta_model

SRC = Path(__file__).resolve().parents[1] / "src" / "meshlm"
# Module names common enough to appear in any code (or in more than one family) on their own,
# or as English words in messages ("down", "up").
GENERIC = {
    "layers",
    "norm",
    "output",
    "attention",
    "rope",
    "blocks",
    "embedding",
    "dropout",
    "proj",
    "head",
    "down",
    "up",
}


def _family_dirs() -> dict[str, Path]:
    return {name: Path(*BUILTIN[name][1].split(".")[1:-1]) for name in family_names() if name in BUILTIN}


# Still being moved onto the family protocol (the engine's DecodeState): empty when issue 11 is done.
PENDING: set[Path] = set()


def _outside(family_dir: Path):
    """The generic code: every module outside the families' folders (a family's folder may name
    its own modules, whose names can coincide with another family's) and the registry."""
    families = list(_family_dirs().values())
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC)
        if not any(rel.parts[: len(d.parts)] == d.parts for d in families) and rel != Path("model/registry.py"):
            if rel not in PENDING:
                yield rel, ast.parse(path.read_text())


def _module_attributes(name: str) -> set[str]:
    from family_cases import FAMILY_CASES

    from meshlm.config import load_config

    names: set[str] = set()
    for overrides in FAMILY_CASES.values():
        cfg = load_config(None, overrides)
        if cfg.model.family == name:
            names |= {part for path, _ in meta_model(cfg.model).named_modules() for part in path.split(".")}
    return {n for n in names if not n.isdigit() and n and n not in GENERIC}


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


@pytest.mark.parametrize("family", sorted(_family_dirs()))
def test_no_module_outside_a_family_imports_it(family):
    package = "meshlm." + ".".join(_family_dirs()[family].parts)
    offenders = []
    for rel, tree in _outside(_family_dirs()[family]):
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{rel}: {n}" for n in names if n == package or n.startswith(package + ".")]
    assert offenders == []


@pytest.mark.parametrize("family", sorted(_family_dirs()))
def test_no_module_outside_a_family_names_its_module_attributes(family):
    attributes = _module_attributes(family)
    assert attributes, "the check must look for something"
    offenders = []
    for rel, tree in _outside(_family_dirs()[family]):
        skip = _docstrings(tree)
        for node in ast.walk(tree):
            words: list[str] = []
            if isinstance(node, ast.Attribute):
                words = [node.attr]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
                words = [w for part in node.value.split() for w in part.strip("'\"(),:").split(".")]
            offenders += [f"{rel}:{node.lineno}: {w}" for w in words if w in attributes]
    assert offenders == []


@pytest.mark.parametrize("family", family_names())
def test_every_family_honours_the_spec(family):
    """Build the tiny case of each family: blocks, stage modules and the stats formulas agree
    with the built model; the forward maps tokens to logits of the vocabulary size."""
    from family_cases import FAMILY_CASES

    from meshlm.config import load_config

    spec = family_spec(family)
    cases = [o for o in FAMILY_CASES.values() if load_config(None, o).model.family == family]
    assert cases, f"add a case of family '{family}' to tests/family_cases.py"
    for overrides in cases:
        cfg = load_config(None, overrides + ["model.vocab_size=97", "model.max_seq_len=32", "data.seq_len=16"])
        model = build_model(cfg.model, seed=0)
        blocks = getattr(model, spec.blocks)
        assert isinstance(blocks, torch.nn.ModuleDict) and list(blocks) == [str(i) for i in range(len(blocks))]
        assert len(blocks) == spec.n_blocks(cfg.model)
        for name in spec.first_stage + spec.last_stage:
            assert hasattr(model, name), name
        unique = {id(p): p for p in model.parameters()}
        assert spec.count_params(cfg.model) == sum(p.numel() for p in unique.values())
        logits = model(torch.randint(0, 97, (2, 7)))
        assert logits.shape == (2, 7, 97)
        assert spec.flops_per_token(cfg.model, 7, True) > 0
