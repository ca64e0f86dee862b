"""Every committed corpus input (seeds and minimised crashes) replays through its target's check(),
and every target survives a short real fuzzing run (the smoke)."""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"
sys.path.insert(0, str(FUZZ))
import run_all  # noqa: E402

TARGETS = run_all.targets()
SMOKE_SECONDS = 3


@functools.cache
def _load(target: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"fuzz_{target.stem}", target)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _corpus_cases() -> list[tuple[Path, Path]]:
    return [(t, f) for t in TARGETS for f in sorted((FUZZ / "corpus" / t.stem).glob("*")) if f.is_file()]


def test_every_target_has_a_seed_corpus() -> None:
    """Each fuzz target ships seeds in fuzz/corpus/<target>/ (STYLE.md §6)."""
    assert TARGETS, "no fuzz targets found"
    for target in TARGETS:
        corpus = FUZZ / "corpus" / target.stem
        assert corpus.is_dir(), f"{target.stem} has no seed corpus"
        assert any(corpus.iterdir()), f"{target.stem} has no seed corpus"


@pytest.mark.parametrize(("target", "case"), _corpus_cases(), ids=lambda p: p.name if isinstance(p, Path) else str(p))
def test_corpus_replays(target: Path, case: Path) -> None:
    """A committed corpus input satisfies its target's invariant (check() returns)."""
    _load(target).check(case.read_bytes())


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS, ids=lambda p: p.stem)
def test_fuzz_smoke(target: Path) -> None:
    """A few seconds of coverage-guided fuzzing finds no crash."""
    ok, _, tail = run_all.run_target(target, SMOKE_SECONDS)
    assert ok, tail
