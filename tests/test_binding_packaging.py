"""repmlp_rt as installed: importing without torch or beside it, the public names and typing
files, and the repmlp_infer binary on PATH."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import repmlp_rt


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(check=False, args=[sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_import_in_fresh_interpreter_without_torch(fake_artifact):
    code = (
        "import sys, numpy as np, repmlp_rt\n"
        "assert 'torch' not in sys.modules, 'repmlp_rt imported torch'\n"
        f"rt = repmlp_rt.Runtime({str(fake_artifact)!r})\n"
        "out = repmlp_rt.infer(rt, np.zeros((2, 3, 32, 32), np.float32))\n"
        "assert out.shape == (2, 10) and 'torch' not in sys.modules\n"
        "print('ok', repmlp_rt.__version__)\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


@pytest.mark.parametrize("order", ["torch_first", "repmlp_rt_first"])
def test_import_alongside_torch(fake_artifact, order):
    imports = "import torch, repmlp_rt" if order == "torch_first" else "import repmlp_rt, torch"
    code = (
        "import warnings; warnings.simplefilter('ignore', DeprecationWarning)\n"
        f"{imports}\n"
        f"path = {str(fake_artifact)!r}\n"
        "x = torch.randn(2, 3, 32, 32)\n"
        "ref = torch.jit.load(path)(x)\n"
        "torch.testing.assert_close(repmlp_rt.Runtime(path).infer(x), ref, rtol=1e-5, atol=1e-5)\n"
        "print('ok')\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr


def test_public_api():
    for name in repmlp_rt.__all__:
        assert hasattr(repmlp_rt, name), name
    package = Path(repmlp_rt.__file__).parent
    assert (package / "py.typed").exists()
    assert (package / "_runtime.pyi").exists()
    assert issubclass(repmlp_rt.ArtifactError, RuntimeError)
    assert issubclass(repmlp_rt.InputError, ValueError)


def test_binary_is_on_path_after_install():
    found = shutil.which("repmlp_infer")
    assert found, "repmlp_infer is not on PATH: pip install --no-build-isolation -e ."
    result = subprocess.run(check=False, args=[found, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "ARTIFACT" in result.stdout
