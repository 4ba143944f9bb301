"""Helpers shared by the builder, the tests and the benchmarks."""

import contextlib
import hashlib
import os
import warnings
from typing import Iterable, Iterator, Optional, Tuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "count_flops",
    "first_line",
    "is_exporting",
    "new_file_mode",
    "output_error",
    "quiet_jit",
    "randomize_bn_",
    "randomize_model_",
    "script_module",
    "sha256_file",
    "shape_string",
]

# torch 2.13+ warns on every torch.jit.script/freeze/save/load call; only those are silenced.
JIT_DEPRECATION_MESSAGE = r"`torch\.jit\.\w+` is deprecated"


def output_error(out: torch.Tensor, ref: torch.Tensor) -> Tuple[float, float]:
    """(max |out - ref|, that divided by max |ref|): the verification metric of the builder,
    the probe and the runtime's self-check."""
    diff = (out.double() - ref.double()).abs().max().item()
    return diff, diff / max(ref.double().abs().max().item(), 1e-12)


@contextlib.contextmanager
def quiet_jit() -> Iterator[None]:
    """TorchScript is deprecated from torch 2.13 on: silence exactly that warning (a
    DeprecationWarning in 2.13, a FutureWarning later) around our own jit calls."""
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category, message=JIT_DEPRECATION_MESSAGE)
        yield


def script_module(module: nn.Module) -> torch.jit.ScriptModule:
    """``torch.jit.script(module)``, after dropping stale entries of TorchScript's builtin table.

    ``torch.jit._builtins`` keys its table of builtin functions by ``id()`` without holding
    every object: when an operator gains overloads (an AOTInductor compile adds some to
    ``quantized_decomposed`` ops), ``torch.ops`` replaces its op object and the freed one leaves
    its id behind, soon the address of another object. A list or number of a module created at
    such an address is taken for a builtin, and scripting fails with "builtin cannot be used as
    a value" (seen once in the test suite, after the AOTInductor tests). A module's data
    attributes are never builtins, so their ids in the table are stale entries.
    """
    builtin_table = getattr(getattr(torch.jit, "_builtins", None), "_get_builtin_table", None)
    if builtin_table is not None:
        by_id = builtin_table()
        for sub in module.modules():
            for value in vars(sub).values():
                if not callable(value):
                    by_id.pop(id(value), None)
    return torch.jit.script(module)


def is_exporting() -> bool:
    """True while torch.export traces the caller, False in eager mode and in TorchScript
    (which compiles only the first branch of an ``if torch.jit.is_scripting()``)."""
    if torch.jit.is_scripting():
        return False
    else:
        return torch.compiler.is_exporting()


@torch.no_grad()
def randomize_bn_(model: nn.Module, generator: Optional[torch.Generator] = None) -> nn.Module:
    """Give every BN non-trivial statistics and affine parameters.

    With fresh BNs (mean 0, var 1, weight 1, bias 0) a wrong fold can still look right, so
    every equivalence check starts from this.
    """
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.2)
            module.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
            if module.weight is not None:
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.2)
    return model


@torch.no_grad()
def randomize_model_(model: nn.Module, seed: int = 0, randomize_bn: bool = True) -> nn.Module:
    """Seeded random weights (PyTorch's default init, reproducible) and, optionally, BN stats."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            fan_in = module.weight[0].numel()
            bound = 1.0 / fan_in**0.5
            module.weight.copy_((torch.rand(module.weight.shape, generator=generator) * 2 - 1) * bound)
            if module.bias is not None:
                module.bias.copy_((torch.rand(module.bias.shape, generator=generator) * 2 - 1) * bound)
    if randomize_bn:
        randomize_bn_(model, generator)
    return model


def count_flops(model: nn.Module) -> int:
    """FLOPs (2 x multiply-adds) of one forward pass on one image, counted by torch."""
    config = model.config
    param = next(model.parameters())
    x = torch.zeros(1, config.in_channels, *config.img_size, dtype=param.dtype, device=param.device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return int(counter.get_total_flops())


def sha256_file(path: str) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def first_line(exc: BaseException) -> str:
    """An exception's first line of text (torch's messages carry long explanations)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def shape_string(dims: Iterable[int]) -> str:
    """``(3, 224, 224)`` as ``3x224x224``."""
    return "x".join(str(int(d)) for d in dims)


def new_file_mode(base: int = 0o666) -> int:
    """``base`` less the process umask: the mode open() gives a new file (mkstemp gives 0o600).
    The umask is read by setting it and restoring it."""
    mask = os.umask(0o022)
    os.umask(mask)
    return base & ~mask
