"""ONNX export of the fused model with a dynamic batch (one file for every batch size).

For ONNX Runtime and OpenVINO (``python -m benchmarks.bench`` runs both on this file). The export
goes through ``torch.export`` with a symbolic batch dimension. The fused FFN splits its token
rows into chunks of ``chunk_rows`` (a CPU cache blocking, benchmarks/RESULTS.md); a loop over
a symbolic row count would fix the batch, so the exported copy takes all rows in one chunk
(``chunk_rows`` raised above any batch the export allows). The arithmetic is the same.
"""

import copy
import os
import tempfile
import warnings
from typing import Optional

import torch

from .model import ConvFFN, RepMLPNet

__all__ = ["export_onnx", "MAX_EXPORT_BATCH"]

# Upper bound of the symbolic batch: far beyond any CPU batch, small enough that
# N * H * W rows stay below the raised chunk size for every published input size.
MAX_EXPORT_BATCH = 4096


def export_onnx(model: RepMLPNet, path: str, *, opset: Optional[int] = None) -> str:
    """Write ``model`` (any form; normally :func:`repmlp.fuse_model`'s output) to ``path`` as ONNX
    with input ``x`` (N, C, H, W) float32 and output ``logits`` (N, num_classes), N dynamic.

    The file is written under a temporary name in the target folder and renamed at the end.
    Needs the ``onnx`` and ``onnxscript`` packages. Returns ``path``.
    """
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"output folder {folder} does not exist")
    export_model = copy.deepcopy(model).float().eval()
    h, w = export_model.config.img_size
    for module in export_model.modules():
        if isinstance(module, ConvFFN):
            module.chunk_rows = MAX_EXPORT_BATCH * h * w
    example = torch.randn(2, export_model.config.in_channels, h, w)
    batch = torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        with warnings.catch_warnings():
            # torch.export's own use of an API it deprecated (torch 2.13), nothing to act on here
            warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
            torch.onnx.export(
                export_model,
                (example,),
                tmp,
                dynamo=True,
                external_data=False,
                input_names=["x"],
                output_names=["logits"],
                dynamic_shapes={"x": {0: batch}},
                opset_version=opset,
                verbose=False,
            )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
