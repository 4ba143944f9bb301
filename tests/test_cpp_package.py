"""The C++ package: `cmake --install` into a temporary prefix, then a fresh CMake project
(examples/cpp) that finds it with only CMAKE_PREFIX_PATH, built and run against repmlp_infer;
and each installed public header compiled alone.

Reuses the build tree that `pip install` / `make install` left in build/cmake, so only the
example and the header checks compile here (about a minute on a loaded 2-core host)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import repmlp_infer_binary

ROOT = Path(__file__).resolve().parents[1]
# The CMake build folder setup.py used (make test-torch-latest builds in another one).
BUILD_TREE = ROOT / os.environ.get("REPMLP_CMAKE_BUILD_DIR", "build/cmake")
DIGITS = sorted((ROOT / "examples" / "digits" / "images").glob("*.png"))
HEADERS = ["errors.hpp", "image.hpp", "runtime.hpp"]


def _tool(name: str) -> str:
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found (pip install {name})")
    return found


def _run(*args, cwd=None) -> str:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, check=False,
                            timeout=900)
    assert result.returncode == 0, f"{args}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def _configure_and_build(source: Path, build: Path, prefix: Path) -> None:
    # A consumer's configure: nothing but CMAKE_PREFIX_PATH (and the generator).
    _run(_tool("cmake"), "-S", source, "-B", build, "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={_tool('ninja')}",
         f"-DCMAKE_PREFIX_PATH={prefix}")
    _run(_tool("cmake"), "--build", build, "-j", os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "2"))


@pytest.fixture(scope="module")
def prefix(tmp_path_factory) -> Path:
    if not (BUILD_TREE / "CMakeCache.txt").exists():
        pytest.fail(f"{BUILD_TREE} has no CMake build: run `make install` first")
    prefix = tmp_path_factory.mktemp("prefix")
    _run(_tool("cmake"), "--install", BUILD_TREE, "--prefix", prefix)
    return prefix


def test_installed_files(prefix):
    files = sorted(str(p.relative_to(prefix)) for p in prefix.rglob("*") if not p.is_dir())
    version = _run(sys.executable, "-c", "import repmlp_rt; print(repmlp_rt.__version__)").strip()
    major_minor = ".".join(version.split(".")[:2])
    libs = list(prefix.rglob("librepmlp_rt.so"))  # in lib, lib64 or lib/<multiarch>
    assert len(libs) == 1, files
    lib = str(libs[0].parent.relative_to(prefix))
    expected = {
        "bin/repmlp_infer",
        f"{lib}/librepmlp_rt.so.{version}",
        f"{lib}/librepmlp_rt.so.{major_minor}",
        f"{lib}/librepmlp_rt.so",
        *(f"include/repmlp_rt/{header}" for header in HEADERS),
        f"{lib}/cmake/repmlp_rt/repmlp_rtConfig.cmake",
        f"{lib}/cmake/repmlp_rt/repmlp_rtConfigVersion.cmake",
        f"{lib}/cmake/repmlp_rt/repmlp_rtTargets.cmake",
        f"{lib}/cmake/repmlp_rt/repmlp_rt_torch.cmake",
    }
    assert expected <= set(files), sorted(expected - set(files))
    # only the per-configuration targets file comes on top
    assert [f for f in files if f not in expected] == [f"{lib}/cmake/repmlp_rt/repmlp_rtTargets-release.cmake"]
    assert os.path.realpath(prefix / lib / "librepmlp_rt.so") == str(prefix / lib / f"librepmlp_rt.so.{version}")
    dynamic = _run("readelf", "-d", prefix / lib / f"librepmlp_rt.so.{version}")
    assert f"Library soname: [librepmlp_rt.so.{major_minor}]" in dynamic


def test_example_matches_repmlp_infer(prefix, digits_artifact, tmp_path):
    _configure_and_build(ROOT / "examples" / "cpp", tmp_path / "build", prefix)
    example = _run(tmp_path / "build" / "repmlp_classify", "--workers", 4, digits_artifact, *DIGITS)
    cli = _run(repmlp_infer_binary(), "--json", digits_artifact, *DIGITS)
    # the installed repmlp_infer gives the same lines as the one on PATH
    installed_cli = _run(prefix / "bin" / "repmlp_infer", "--json", digits_artifact, *DIGITS)
    got = [json.loads(line) for line in example.splitlines()]
    expected = [json.loads(line) for line in cli.splitlines()]
    assert len(got) == len(expected) == len(DIGITS) == 20
    assert [json.loads(line) for line in installed_cli.splitlines()] == expected
    for mine, theirs in zip(got, expected):
        assert mine["input"] == theirs["input"]
        assert [t["index"] for t in mine["topk"]] == [t["index"] for t in theirs["topk"]]
        assert [t["label"] for t in mine["topk"]] == [t["label"] for t in theirs["topk"]]
        for a, b in zip(mine["topk"], theirs["topk"]):
            assert abs(a["score"] - b["score"]) <= 1e-6, (mine, theirs)


def test_each_public_header_compiles_alone(prefix, tmp_path):
    source = tmp_path / "headers"
    source.mkdir()
    for header in HEADERS:
        (source / f"{header}.cpp").write_text(f"#include <repmlp_rt/{header}>\n")
    (source / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.21)\n"
        "project(repmlp_rt_headers LANGUAGES CXX)\n"
        "set(CMAKE_CXX_STANDARD 17)\n"  # older than the headers need: the package raises it
        "find_package(repmlp_rt CONFIG REQUIRED)\n"
        f"add_library(headers OBJECT {' '.join(f'{h}.cpp' for h in HEADERS)})\n"
        "target_link_libraries(headers PRIVATE repmlp_rt::runtime)\n")
    _configure_and_build(source, tmp_path / "build", prefix)
