"""The package metadata a user installs (pyproject.toml): floors not pins, triton only where it
runs, benchmark-only packages and faiss in extras, one faiss per environment, nothing outside
the two packages in the wheel."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower()


def test_core_requirements_are_floors_without_benchmark_packages() -> None:
    deps = PROJECT["dependencies"]
    names = {_name(d) for d in deps}
    assert {"torch", "numpy", "safetensors"} <= names
    assert not [d for d in deps if "==" in d.split(";")[0]], (
        "an exact pin replaces the user's packages"
    )
    assert not names & {"matplotlib", "pytest", "pytest-benchmark", "jsonschema", "faiss-gpu-cu12"}
    torch = next(d for d in deps if _name(d) == "torch")
    assert ">=" in torch
    triton = [d for d in deps if _name(d) == "triton"]
    assert all("sys_platform == 'linux'" in d for d in triton)


def test_no_extra_installs_both_faiss_builds() -> None:
    extras = PROJECT["optional-dependencies"]

    def resolved(extra: str, seen: frozenset[str] = frozenset()) -> set[str]:
        names: set[str] = set()
        for req in extras[extra]:
            if _name(req) == PROJECT["name"]:
                inner = re.search(r"\[(.*)\]", req)
                for sub in inner.group(1).split(",") if inner else []:
                    if sub.strip() not in seen:
                        names |= resolved(sub.strip(), seen | {extra})
            else:
                names.add(_name(req))
        return names

    core = {_name(d) for d in PROJECT["dependencies"]}
    for extra in extras:
        names = resolved(extra) | core
        assert not ({"faiss-cpu", "faiss-gpu-cu12"} <= names), extra
    assert "matplotlib" in resolved("bench")


def test_the_wheel_holds_only_the_two_packages() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {p.split(".")[0] for p in include} == {"imrnns", "imrnns_kernels"}
    assert PROJECT["license"] == "Apache-2.0" and "LICENSE" in PROJECT["license-files"]
    assert (ROOT / "LICENSE").is_file() and (ROOT / "constraints.txt").is_file()
