"""Builds and installs the repmlp (pure Python) and repmlp_rt (C++ runtime) packages.

    pip install --no-build-isolation .      # or -e . ; torch==2.13.0 must already be installed

CMake (driven from build_ext) builds the core library, the repmlp_infer binary and the
extension repmlp_rt._runtime in build/cmake (incremental, reused by later builds). The binary
is installed into the environment's bin/ (on PATH) through data_files. The C++ library and its
CMake package are installed with CMake itself (docs/CPP.md): `cmake --install build/cmake`.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.editable_wheel import editable_wheel

ROOT = Path(__file__).resolve().parent
# REPMLP_CMAKE_BUILD_DIR: a second build folder, for a second environment (make test-torch-latest).
CMAKE_BUILD_DIR = Path(os.environ.get("REPMLP_CMAKE_BUILD_DIR", ROOT / "build" / "cmake")).resolve()
CLI_BINARY = CMAKE_BUILD_DIR / "bin" / "repmlp_infer"

try:
    import torch  # noqa: F401  (the C++ runtime builds against the LibTorch in this wheel)
except ImportError:
    sys.exit("repmlp: torch is not importable at build time: install `torch==2.13.0` first, "
             "then run `pip install --no-build-isolation .`")


def read_version() -> str:
    text = (ROOT / "python" / "repmlp_rt" / "_version.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.MULTILINE).group(1)


def read_requirements(name: str) -> list[str]:
    """Requirement lines of a requirements file (comments and blank lines dropped)."""
    lines = (ROOT / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def find_tool(name: str) -> str | None:
    """A tool from this interpreter's environment first (pip's cmake/ninja), then PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        cmake = find_tool("cmake")
        if cmake is None:
            sys.exit("repmlp: cmake not found: pip install cmake ninja")
        ext_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        ext_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DREPMLP_PYTHON_OUTPUT_DIR={ext_dir}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('REPMLP_BUILD_TYPE', 'Release')}",
        ]
        if os.environ.get("REPMLP_THIRD_PARTY_PREFIX"):
            args.append(f"-DREPMLP_THIRD_PARTY_PREFIX={os.environ['REPMLP_THIRD_PARTY_PREFIX']}")
        ninja = find_tool("ninja")
        if ninja and not (CMAKE_BUILD_DIR / "CMakeCache.txt").exists():
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        CMAKE_BUILD_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.check_call([cmake, "-S", str(ROOT), "-B", str(CMAKE_BUILD_DIR), *args])
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "2")
        subprocess.check_call([cmake, "--build", str(CMAKE_BUILD_DIR), "-j", jobs])
        if not CLI_BINARY.exists():
            sys.exit(f"repmlp: {CLI_BINARY} was not built (see CMake's output above)")


class EditableWheel(editable_wheel):
    """`pip install -e` support for data_files (the repmlp_infer binary).

    setuptools' editable_wheel installs "non editable" files by asking the distribution for
    `has_data`, which does not exist (it is `has_data_files`), so data_files are silently
    dropped. Install them into the wheel's .data/data folder, as a regular wheel would.
    """

    def _run_build_commands(self, *args, **kwargs):
        result = super()._run_build_commands(*args, **kwargs)
        if self.distribution.has_data_files() and not hasattr(self.distribution, "has_data"):
            self.run_command("install_data")
        return result


setup(
    name="repmlp",
    version=read_version(),
    description="RepMLPNet: model package, artifact builder and LibTorch C++ runtime",
    python_requires=">=3.10",
    package_dir={"": "python"},
    packages=find_packages("python"),
    package_data={"repmlp_rt": ["py.typed", "*.pyi"], "repmlp": ["data/*.pth"]},
    ext_modules=[CMakeExtension("repmlp_rt._runtime")],
    cmdclass={"build_ext": CMakeBuild, "editable_wheel": EditableWheel},
    # The real binary (RPATH to torch/lib) goes to <env>/bin, next to the console scripts.
    data_files=[("bin", [os.path.relpath(CLI_BINARY, ROOT)])],
    entry_points={"console_scripts": [
        "repmlp-build = repmlp.cli:main",
        "repmlp-serve = repmlp_rt.serve:main",
        "repmlp-classify = repmlp_rt.batch:main",
        "repmlp-eval = repmlp_rt.eval:main",
        "repmlp-triton-repo = repmlp_rt.triton:main",
    ]},
    install_requires=["numpy", "torch>=2.11"],
    # Ray Serve / Ray Data / Triton client: pip install '.[serve]' (pins: requirements-serve.txt).
    extras_require={"serve": read_requirements("requirements-serve.txt")},
    zip_safe=False,
)
