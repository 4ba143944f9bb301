"""Test helpers for the C++ runtime: fake RepMLP-contract artifacts and broken ones.

The fake artifact implements the artifact contract of docs/ARTIFACT.md with a tiny conv net
(forward, forward_images with resize/center-crop/normalize, format_version, input_shape,
labels, compute_dtype, manifest.json, the self-check's probe and digest records), so the
runtime can be tested without the model code (only repmlp.integrity writes the two records).
The same helpers write the bad artifacts: no manifest, wrong format version, a foreign
TorchScript module, a truncated file, random bytes.
"""


import json
import os
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FORMAT_VERSION = 1
EXPORTED_METHODS = ["forward_images", "format_version", "input_shape", "labels", "compute_dtype"]
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# The runtime runs the artifact's own TorchScript graph, so it matches torch.jit.load of the
# same file to float32 rounding.
RTOL, ATOL = 1e-5, 1e-5


class FakeRepMLP(nn.Module):
    """A small conv classifier with the artifact's methods (not RepMLPNet, same contract)."""

    version: torch.jit.Final[int]
    height: torch.jit.Final[int]
    width: torch.jit.Final[int]
    resize: torch.jit.Final[int]
    dtype_name: torch.jit.Final[str]
    class_names: list[str]

    def __init__(self, *, size: int = 32, num_classes: int = 10, version: int = FORMAT_VERSION,
                 dtype_name: str = "float32") -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.head = nn.Linear(16, num_classes)
        self.version = version
        self.height = size
        self.width = size
        self.resize = size + size // 7  # resize the short side, then center-crop
        self.dtype_name = dtype_name
        self.class_names = [f"class_{i}" for i in range(num_classes)]
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.head.weight.dtype)
        x = self.features(x)
        x = x.mean(dim=(2, 3))
        return self.head(x).float()

    @torch.jit.export
    def forward_images(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float().div(255.0)
        in_h, in_w = x.shape[2], x.shape[3]
        if in_h < in_w:
            new_h, new_w = self.resize, max(1, int(self.resize * in_w / in_h))
        else:
            new_h, new_w = max(1, int(self.resize * in_h / in_w)), self.resize
        x = F.interpolate(x, size=[new_h, new_w], mode="bilinear", align_corners=False)
        top = (new_h - self.height) // 2
        left = (new_w - self.width) // 2
        x = x[:, :, top:top + self.height, left:left + self.width]
        x = (x - self.mean) / self.std
        return self.forward(x)

    @torch.jit.export
    def format_version(self) -> int:
        return self.version

    @torch.jit.export
    def input_shape(self) -> list[int]:
        return [3, self.height, self.width]

    @torch.jit.export
    def labels(self) -> list[str]:
        return self.class_names

    @torch.jit.export
    def compute_dtype(self) -> str:
        return self.dtype_name


def _randomize(module: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)


def manifest_for(model: FakeRepMLP) -> dict:
    return {
        "format_version": model.version,
        "model": "fake-repmlp (test helper)",
        "input_shape": [3, model.height, model.width],
        "num_classes": len(model.class_names),
        "labels": list(model.class_names),
        "compute_dtype": model.dtype_name,
        "preprocessing": {"resize": model.resize, "crop": [model.height, model.width],
                          "mean": list(MEAN), "std": list(STD)},
    }


def save_fake_artifact(path: os.PathLike | str, *, size: int = 32, num_classes: int = 10,
                       version: int = FORMAT_VERSION, dtype_name: str = "float32",
                       manifest: bool | dict = True, seed: int = 0, verifiable: bool = True) -> Path:
    """Writes a frozen TorchScript artifact following the contract; returns its path.
    ``verifiable``: with the self-check's probe and digest records (docs/ARTIFACT.md)."""
    from repmlp import integrity

    path = Path(path)
    model = FakeRepMLP(size=size, num_classes=num_classes, version=version, dtype_name=dtype_name)
    _randomize(model, seed)
    model.eval()
    # The probe's reference is the float32 eager model, as in a real build.
    probe = integrity.make_probe(model, model.forward_images, (3, size, size), torch.device("cpu"), seed + 1)
    if dtype_name == "float16":
        model = model.half()
        model.mean.data = model.mean.data.float()
        model.std.data = model.std.data.float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(model)
        frozen = torch.jit.freeze(scripted.eval(), preserved_attrs=EXPORTED_METHODS)
        extra = {}
        if manifest is True:
            content = manifest_for(model)
            if verifiable:
                tolerances = integrity.PROBE_TOLERANCE[dtype_name]
                content["probe"] = integrity.probe_section(probe, tolerances, "the fake model, eager, float32")
            extra["manifest.json"] = json.dumps(content, indent=2)
        elif isinstance(manifest, dict):
            extra["manifest.json"] = json.dumps(manifest)
        if verifiable:
            extra[integrity.PROBE_RECORD] = integrity.probe_bytes(probe)
        torch.jit.save(frozen, str(path), _extra_files=extra)
    if verifiable:
        integrity.seal(str(path))
    return path


class _Foreign(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def save_foreign_torchscript(path: os.PathLike | str, *, with_manifest: bool = False) -> Path:
    """A valid TorchScript file that is not a RepMLP artifact."""
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(_Foreign().eval())
        extra = {"manifest.json": json.dumps({"format_version": 1})} if with_manifest else {}
        torch.jit.save(scripted, str(path), _extra_files=extra)
    return path


def write_non_utf8_version(source: os.PathLike | str, path: os.PathLike | str) -> Path:
    """A copy of the zip archive at ``source`` whose version records start with a byte that is
    not UTF-8 (0x80 added): the loaders then quote it in their error message."""
    import zipfile

    with zipfile.ZipFile(source) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.rsplit("/", 1)[-1] == "version" and data:
                data = bytes([data[0] | 0x80]) + data[1:]
            dst.writestr(info.filename, data)
    return Path(path)


def write_truncated(source: os.PathLike | str, path: os.PathLike | str, fraction: float = 0.5) -> Path:
    data = Path(source).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * fraction)])
    return Path(path)


def write_random_bytes(path: os.PathLike | str, size: int = 4096, seed: int = 0) -> Path:
    Path(path).write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return Path(path)


def make_bad_artifacts(folder: os.PathLike | str, good: os.PathLike | str) -> dict[str, Path]:
    """All the broken artifacts, keyed by a short name, plus the expected message fragment."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "missing": folder / "does_not_exist.pt",
        "empty": _touch(folder / "empty.pt"),
        "truncated": write_truncated(good, folder / "truncated.pt"),
        "random_bytes": write_random_bytes(folder / "random.pt"),
        "foreign": save_foreign_torchscript(folder / "foreign.pt"),
        "checkpoint": _save_checkpoint(folder / "checkpoint.pth"),
        "foreign_with_manifest": save_foreign_torchscript(folder / "foreign_manifest.pt", with_manifest=True),
        "no_manifest": save_fake_artifact(folder / "no_manifest.pt", manifest=False),
        "wrong_version": save_fake_artifact(folder / "wrong_version.pt", version=FORMAT_VERSION + 1),
        # beyond int64: must be compared, not parsed into a number
        "huge_manifest_version": save_fake_artifact(folder / "huge_version.pt",
                                                    manifest={"format_version": 10**22}),
        "directory": folder,
    }


# What the runtime's error message must mention for each bad artifact.
BAD_ARTIFACT_MESSAGES = {
    "missing": "no such file",
    "empty": "cannot load artifact",
    "truncated": "cannot load artifact",
    "random_bytes": "cannot load artifact",
    "foreign": "not a RepMLP artifact",
    "checkpoint": "it is a torch.save() file (a checkpoint?), not a TorchScript artifact",
    "foreign_with_manifest": "not a RepMLP artifact",
    "no_manifest": "no manifest.json",
    "wrong_version": "format version 2",
    "huge_manifest_version": "manifest.json has format_version 10000000000000000000000",
    "directory": "is a directory",
}


def _save_checkpoint(path: Path) -> Path:
    torch.save(nn.Linear(4, 2).state_dict(), path)
    return path


def _touch(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def load_reference(path: os.PathLike | str) -> torch.jit.ScriptModule:
    """torch.jit.load of an artifact, the Python reference the runtime is compared with."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path), map_location="cpu")


def write_npy(path: os.PathLike | str, array: np.ndarray) -> Path:
    np.save(str(path), array)
    return Path(path)


def random_batch(shape, n: int = 4, seed: int = 0) -> np.ndarray:
    """A seeded float32 (n, *shape) batch of standard normal values."""
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def random_images(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


def save_png(path: os.PathLike | str, image_hwc: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(image_hwc, mode="RGB").save(str(path))
    return Path(path)


def run_in_threads(work, count: int, timeout: float = 300.0) -> None:
    """Runs ``work(i)`` for i in range(count), each in its own thread; fails if a thread is
    still running after ``timeout`` seconds, and re-raises the first failure of any kind."""
    failures: list = []

    def guarded(i: int) -> None:
        try:
            work(i)
        except BaseException as error:  # noqa: BLE001 - any failure, re-raised below
            failures.append((i, error))

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)
    assert not any(thread.is_alive() for thread in threads), f"a thread did not finish within {timeout} s"
    if failures:
        i, error = failures[0]
        raise AssertionError(f"thread {i} failed ({len(failures)} thread(s) in all)") from error
