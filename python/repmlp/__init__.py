"""RepMLPNet for deployment: plain PyTorch model, exact re-parameterization, checkpoint I/O."""

from ._version import __version__
from .checkpoints import CheckpointError, export_state_dict, load_checkpoint
from .model import (
    RepMLPNet,
    create_model,
    fuse_model,
    reparameterize_model,
)
from .variants import ArchConfig, Preprocessing, VARIANTS, list_variants

__all__ = [
    "__version__",
    "CheckpointError",
    "export_state_dict",
    "load_checkpoint",
    "ArchConfig",
    "Preprocessing",
    "RepMLPNet",
    "VARIANTS",
    "create_model",
    "fuse_model",
    "list_variants",
    "reparameterize_model",
]
