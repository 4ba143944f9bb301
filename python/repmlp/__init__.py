"""RepMLPNet for deployment: plain PyTorch model, exact re-parameterization, checkpoint I/O."""

from .model import (
    RepMLPNet,
    create_model,
    fuse_model,
    reparameterize_model,
)
from .variants import ArchConfig, Preprocessing, VARIANTS, list_variants

__all__ = [
    "ArchConfig",
    "Preprocessing",
    "RepMLPNet",
    "VARIANTS",
    "create_model",
    "fuse_model",
    "list_variants",
    "reparameterize_model",
]
