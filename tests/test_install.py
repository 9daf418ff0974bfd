"""Declared dependencies: pyproject.toml ranges (what the code works with) vs requirements.txt (what CI
installs): the ranges admit the GPU machines' torch 2.11 / torchvision 0.26 and every CI pin."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]


def _ranges() -> dict[str, Requirement]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {canonicalize_name(r.name): r for r in map(Requirement, deps)}


def _ci_set() -> dict[str, Requirement]:
    out = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            out[canonicalize_name(req.name)] = req
    return out


def test_pyproject_ranges_admit_gpu_builds_and_ci_pins() -> None:
    ranges = _ranges()
    for name, ok, bad in [
        ("torch", ["2.11.0", "2.11.0+cu128", "2.12.1", "2.14.1", "2.14.1+cu130"], ["2.10.1", "2.15.0"]),
        ("torchvision", ["0.26.0", "0.26.0+cu128", "0.29.1"], ["0.25.0", "0.30.0"]),
        ("av", ["18.1.0", "19.0.1"], []),
    ]:
        spec = ranges[name].specifier
        assert all(spec.contains(v) for v in ok), (name, spec, ok)
        assert not any(spec.contains(v) for v in bad), (name, spec, bad)
    for name in ("matplotlib", "transformers"):
        assert name in ranges


def test_requirements_is_the_exact_ci_set_inside_the_ranges() -> None:
    ranges, ci = _ranges(), _ci_set()
    assert str(ci["torch"].specifier) == "==2.14.1" and str(ci["torchvision"].specifier) == "==0.29.1"
    missing = sorted(set(ranges) - set(ci))
    assert not missing, f"requirements.txt lacks {missing} (CI would not install them)"
    for name, req in ci.items():
        pins = [s.version for s in req.specifier if s.operator == "=="]
        for v in pins:
            if name in ranges:
                assert ranges[name].specifier.contains(v), f"CI pins {name}=={v} outside {ranges[name]}"
