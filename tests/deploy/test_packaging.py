"""What `pip install` puts on a machine: one namespace (`ferry`), every module of the
source folders, the bundled data, and versions from the lock files.

Ferry once installed four top-level names (`common`, `services`, `kernels`, `bench`), each
also a PyPI package; transformers 5.25 imports Hugging Face's `kernels` and found Ferry's.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Source folder at the repository root -> the package it installs as.
SOURCE_ROOTS = {"ferry": "ferry", "common": "ferry.common", "services": "ferry.services",
                "kernels": "ferry.kernels", "bench": "ferry.bench"}
BARE_NAMES = ("common", "services", "kernels", "bench")


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def python_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split()
    return [ROOT / f for f in listed]


def test_package_dir_maps_each_root_folder_into_ferry():
    setuptools = pyproject()["tool"]["setuptools"]
    assert setuptools["package-dir"] == {pkg: folder for folder, pkg in SOURCE_ROOTS.items()}
    expected = set()
    for folder, package in SOURCE_ROOTS.items():
        for path in (ROOT / folder).rglob("*"):
            if path.is_dir() and not {"__pycache__", "results"} & set(path.parts) and (
                    any(path.glob("*.py")) or any(path.glob("*.json"))):
                rel = path.relative_to(ROOT / folder).parts
                expected.add(".".join((package, *rel)))
        expected.add(package)
    assert set(setuptools["packages"]) == expected, "list every package in pyproject.toml"


def test_the_bare_root_folders_cannot_shadow_an_installed_package():
    # No __init__.py: with the repository root on sys.path, `import kernels` still finds
    # an installed `kernels` (a regular package wins over a namespace portion).
    for name in BARE_NAMES:
        assert not (ROOT / name / "__init__.py").exists(), f"{name}/__init__.py is back"


def test_no_module_imports_a_bare_generic_name():
    offenders = []
    for path in python_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names
                          if n.split(".")[0] in BARE_NAMES]
    assert not offenders, "\n".join(offenders)


def test_transformers_and_ferry_kernels_in_one_process_from_the_repo_root():
    """Run from the repository root with it on sys.path (as pytest and `python -m` do):
    transformers must get Hugging Face's `kernels`, Ferry its own."""
    pytest.importorskip("transformers")
    script = (
        "import sys; sys.path.insert(0, '.')\n"
        "import transformers\n"
        "from transformers.integrations import hub_kernels\n"
        "from ferry.kernels.backend import get_backend\n"
        "from ferry.services.worker.model.loader import load_model\n"
        "import importlib.util\n"
        "spec = importlib.util.find_spec('kernels')  # Hugging Face's, if installed\n"
        f"assert spec.origin is None or not spec.origin.startswith({str(ROOT / 'kernels')!r})\n"
        "print(get_backend('torch').name)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "torch"


@pytest.mark.slow
def test_a_built_wheel_holds_only_ferry(tmp_path):
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("ferry_serve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert top - dist_info == {"ferry"}, sorted(top)
    # every module and bundled profile of the source folders is in it
    for folder, package in SOURCE_ROOTS.items():
        prefix = package.replace(".", "/")
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".json") and "__pycache__" not in path.parts \
                    and "results" not in path.relative_to(ROOT).parts:
                rel = path.relative_to(ROOT / folder).as_posix()
                assert f"{prefix}/{rel}" in names, f"{folder}/{rel} is not in the wheel"
    (entry_points,) = [n for n in names if n.endswith("entry_points.txt")]
    assert "ferry = ferry.services.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_lock_files_pin_every_package_and_match_the_makefile():
    for lock in ("cpu", "gpu"):
        lines = [line for line in (ROOT / "requirements" / f"{lock}.lock").read_text()
                 .splitlines() if line and not line.lstrip().startswith("#")]
        assert lines and all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==\S+", line)
                             for line in lines), lock
        pinned = {line.split("==")[0].lower() for line in lines}
        for must in ("torch", "pyzmq", "transformers", "pytest", "setuptools"):
            assert must in pinned, f"{lock}.lock lacks {must}"
    cpu = (ROOT / "requirements" / "cpu.lock").read_text()
    assert re.search(r"^torch==\S+\+cpu$", cpu, re.M), "the CPU lock must pin the CPU build"
    makefile = (ROOT / "Makefile").read_text()
    assert "-r $(LOCK)" in makefile and "requirements/$(if $(HAS_GPU),gpu,cpu).lock" in makefile
    assert "--no-deps --no-build-isolation -e ." in makefile  # Ferry adds nothing unlocked


def test_the_interop_client_has_its_own_lock_and_venv_and_make_test_builds_it():
    """aiperf (tests/e2e/test_interop_aiperf.py) is pinned in requirements/interop.lock and
    installed into .venv-interop, never into .venv; `make test` builds that venv first, so
    CI always runs the interop test."""
    lines = [line for line in (ROOT / "requirements" / "interop.lock").read_text()
             .splitlines() if line and not line.lstrip().startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==\S+", line) for line in lines)
    assert "aiperf==0.13.0" in lines
    for lock in ("cpu", "gpu"):
        assert "aiperf" not in (ROOT / "requirements" / f"{lock}.lock").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test: .*\binterop\b", makefile, re.M), "make test must build it"
    assert "-r requirements/interop.lock" in makefile
    assert "-o requirements/interop.lock requirements/interop.in" in makefile  # make lock
    assert ".venv-interop/" in (ROOT / ".gitignore").read_text().splitlines()


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "pip").exists(), reason="no make setup venv")
def test_the_setup_venv_has_exactly_the_locked_versions():
    """What `make setup` installed is what the lock says (no drift, nothing extra)."""
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        pytest.skip("tests are not running in the make setup venv")
    lock = "gpu" if shutil.which("nvidia-smi") and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True).returncode == 0 else "cpu"
    want = {}
    for line in (ROOT / "requirements" / f"{lock}.lock").read_text().splitlines():
        if line and not line.lstrip().startswith("#"):
            name, version = line.split("==")
            want[canonical(name)] = version
    frozen = subprocess.run([sys.executable, "-m", "pip", "list", "--format=freeze",
                             "--exclude-editable"], capture_output=True, text=True,
                            check=True).stdout.split()
    have = {canonical(n): v for n, v in (line.split("==") for line in frozen)}
    have.pop("pip", None)
    assert {n: v for n, v in have.items() if want.get(n) != v} == {}, "installed != lock"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()
