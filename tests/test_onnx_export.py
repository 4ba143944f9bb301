"""ONNX export of the fused model (repmlp.onnx_export): one file serves every batch size.

ONNX Runtime runs the one exported file at batch 1 and 5; both match the fused PyTorch model
element-wise. About 15 s (one export of the small model).
"""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import make_model, relative_close
from repmlp import fuse_model
from repmlp.onnx_export import export_onnx



@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    fused = fuse_model(make_model())
    path = str(tmp_path_factory.mktemp("onnx") / "small.onnx")
    export_onnx(fused, path)
    return fused, path


def test_one_file_runs_at_batch_1_and_5(exported):
    fused, path = exported
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "x" and isinstance(inp.shape[0], str), f"batch not symbolic: {inp.shape}"
    c, h, w = fused.config.in_channels, *fused.config.img_size
    for batch in (1, 5):
        x = torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = fused(x)
        (got,) = session.run(None, {"x": x.numpy()})
        assert got.shape == (batch, fused.config.num_classes)
        relative_close(torch.from_numpy(np.asarray(got)), expected, rtol=1e-5)


def test_export_to_a_missing_folder_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        export_onnx(fuse_model(make_model()), str(tmp_path / "missing" / "m.onnx"))
