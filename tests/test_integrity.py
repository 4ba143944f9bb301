"""Self-verifying artifacts (docs/ARTIFACT.md, "Self-verification"): the digest of every record
and the probe, checked at load by repmlp_infer, repmlp_rt.Runtime and repmlp_rt.infer; the
published file is the verified file; files that disagree with themselves are refused."""

import hashlib
import json
import re
import shutil
import struct
import warnings
import zipfile

import numpy as np
import pytest
import repmlp_rt
import runtime_helpers as helpers
import torch
from test_runtime_cli import assert_error, run_cli

from repmlp import integrity
from repmlp.artifact import build_artifact


def _record_span(path, prefix):
    """(name, data offset, size) of the largest record whose name starts with ``prefix``."""
    data = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        infos = [i for i in archive.infolist() if i.filename.split("/", 1)[1].startswith(prefix)]
    info = max(infos, key=lambda i: i.compress_size)
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    return info.filename, info.header_offset + 30 + name_len + extra_len, info.compress_size


def _rewrite(source, target, *, manifest=None, probe=None):
    """Copy of an artifact with its manifest and/or probe replaced, sealed again: a file that is
    internally consistent (the digest holds) but says something else."""
    extra = {"manifest.json": "", integrity.PROBE_RECORD: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(source), map_location="cpu", _extra_files=extra)
        new_manifest = manifest(json.loads(extra["manifest.json"])) if manifest else json.loads(extra["manifest.json"])
        new_probe = integrity.load_probe(extra[integrity.PROBE_RECORD])
        if probe:
            new_probe = probe(new_probe)
        torch.jit.save(module, str(target), _extra_files={
            "manifest.json": json.dumps(new_manifest), integrity.PROBE_RECORD: integrity.probe_bytes(new_probe)})
    integrity.seal(str(target))
    return target


@pytest.fixture()
def flipped(small_artifact, tmp_path):
    """The small artifact with one byte flipped in the middle of its largest weight record."""
    path = tmp_path / "flipped.pt"
    shutil.copyfile(small_artifact, path)
    name, offset, size = _record_span(path, "constants/")
    data = bytearray(path.read_bytes())
    data[offset + (size // 8) * 4 + 3] ^= 0xFF  # the sign and exponent byte of a float32 weight
    path.write_bytes(bytes(data))
    return path, name.split("/", 1)[1]


def test_a_flipped_weight_byte_fails_the_self_check_everywhere(flipped, tmp_path):
    path, record = flipped
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    npy = helpers.write_npy(tmp_path / "x.npy", x)
    message = f"self-check failed: record '{record}' does not match its SHA-256 digest"
    assert_error(run_cli(path, npy), 1, message)
    with pytest.raises(repmlp_rt.ArtifactError, match=re.escape(message)):
        repmlp_rt.Runtime(path)
    with pytest.raises(repmlp_rt.ArtifactError, match=re.escape(message)):
        repmlp_rt.infer(path, x)

    # Without the digest, the probe sees this one (not every flip: a low mantissa bit may stay
    # under the tolerance, which is what the digest is for).
    with pytest.raises(repmlp_rt.ArtifactError, match="self-check failed: worst relative error"):
        repmlp_rt.Runtime(path, verify_digest=False)
    assert_error(run_cli(path, npy, "--no-verify-digest"), 1, "self-check failed: worst relative error")

    # The opt-out is the user's choice: the same file loads and answers without a word.
    result = run_cli(path, npy, "--no-verify")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    runtime = repmlp_rt.Runtime(path, verify=False)
    assert runtime.self_check is None
    np.testing.assert_array_equal(repmlp_rt.infer(path, x, verify=False), runtime.infer(x))
    # ... and what it answers is the corrupted model's (torch.jit.load agrees), not the build's.
    # Up to float32 rounding: Python's executor optimizes the graph, the runtime's does not, and
    # with some kernels (AVX2) the two differ in the last bit.
    answer = torch.from_numpy(runtime.infer(x))
    with torch.no_grad():
        reference = helpers.load_reference(path)(torch.from_numpy(x))
    torch.testing.assert_close(answer, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())


def test_the_intact_artifact_passes_and_reports_its_check(small_artifact, tmp_path):
    runtime = repmlp_rt.Runtime(small_artifact)
    check = runtime.self_check
    manifest = runtime.manifest
    assert check["tolerance"] == manifest["probe"]["tolerance"]["cpu"] == 1e-4
    assert 0 <= check["error"] <= check["tolerance"]
    info = run_cli(small_artifact, "--info", "--json")
    assert json.loads(info.stdout)["runtime"]["self_check"]["tolerance"] == 1e-4
    assert "self-check:     passed" in run_cli(small_artifact, "--info").stdout
    assert "off (--no-verify)" in run_cli(small_artifact, "--info", "--no-verify").stdout


def test_a_probe_beyond_the_tolerance_names_the_worst_error_and_the_tolerance(small_artifact, tmp_path):
    # As a machine that computes 1% off would look: the stored outputs and the computed ones
    # disagree while every record is intact.
    def skew(probe):
        out = probe["forward_images/output"].clone()
        out[0, 0] += 0.01 * out.abs().max()
        return {**probe, "forward_images/output": out}

    path = _rewrite(small_artifact, tmp_path / "skewed.pt", probe=skew)
    # The expected error, from torch.jit.load's output (an independent path) and the stored probe.
    stored = integrity.load_probe(zipfile.ZipFile(path).read(
        [n for n in zipfile.ZipFile(path).namelist() if n.endswith("extra/probe.pt")][0]))
    got = helpers.load_reference(path).forward_images(stored["forward_images/input"])
    ref = stored["forward_images/output"]
    expected = ((got.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
    with pytest.raises(repmlp_rt.ArtifactError, match="self-check failed") as info:
        repmlp_rt.Runtime(path)
    found = re.search(r"worst relative error (\S+) in forward_images\(\), tolerance (\S+) \(float32 on cpu\)",
                      str(info.value))
    assert found, str(info.value)
    assert float(found.group(1)) == pytest.approx(expected, rel=1e-2)
    assert float(found.group(2)) == 1e-4
    assert_error(run_cli(path, "--info"), 1, "self-check failed: worst relative error")
    assert repmlp_rt.Runtime(path, verify=False).self_check is None


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda m: {**m, "input": {**m["input"], "shape": [3, 64, 64]}},
         "manifest.json says input shape [3, 64, 64], the graph's input_shape() is [3, 32, 32]"),
        (lambda m: {**m, "output": {**m["output"], "num_classes": 11}},
         "manifest.json says 11 classes, the graph's labels() has 10"),
        (lambda m: {**m, "output": {**m["output"], "labels": [f"x{i}" for i in range(10)]}},
         "manifest.json's labels differ from the graph's labels()"),
        (lambda m: {**m, "input": {**m["input"], "compute_dtype": "float16"}},
         "manifest.json says compute dtype float16, the graph's compute_dtype() is float32"),
        (lambda m: {k: v for k, v in m.items() if k != "probe"}, "no probe tolerance"),
    ],
)
def test_a_manifest_that_disagrees_with_the_graph_is_refused(small_artifact, tmp_path, edit, fragment):
    path = _rewrite(small_artifact, tmp_path / "disagrees.pt", manifest=edit)
    with pytest.raises(repmlp_rt.ArtifactError, match=re.escape(fragment)):
        repmlp_rt.Runtime(path)


def test_an_artifact_without_the_self_check_records(tmp_path):
    path = helpers.save_fake_artifact(tmp_path / "old.pt", verifiable=False)
    with pytest.raises(repmlp_rt.ArtifactError, match="has no digest.json record, so it cannot be verified"):
        repmlp_rt.Runtime(path)
    assert repmlp_rt.Runtime(path, verify=False).num_classes == 10


def test_an_altered_but_resealed_record_list_is_refused(small_artifact, tmp_path):
    # A record added after sealing is not covered by the digest.
    path = tmp_path / "extended.pt"
    shutil.copyfile(small_artifact, path)
    with zipfile.ZipFile(path, "a") as archive:
        top = archive.namelist()[0].split("/", 1)[0]
        archive.writestr(f"{top}/extra/note.txt", "hello")
    with pytest.raises(repmlp_rt.ArtifactError, match="record 'extra/note.txt' is not covered by the digest"):
        repmlp_rt.Runtime(path)


def test_the_published_file_is_the_verified_file(tmp_path, monkeypatch):
    """The last reload check reads the very bytes that are renamed into place (sealed with
    their digest), and the build reports their sha256."""
    verified = []
    real_load = torch.jit.load

    def hashing_load(path, *args, **kwargs):
        verified.append(hashlib.sha256(open(path, "rb").read()).hexdigest())
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(torch.jit, "load", hashing_load)
    out = tmp_path / "digits.pt"
    report = build_artifact(out=str(out))
    published = hashlib.sha256(out.read_bytes()).hexdigest()
    assert verified and verified[-1] == published
    assert report.sha256 == published
    integrity.check_digest(str(out))  # sealed, every record listed


def test_the_digest_covers_every_record(small_artifact):
    with zipfile.ZipFile(small_artifact) as archive:
        names = {n.split("/", 1)[1] for n in archive.namelist()}
        digest = json.loads(archive.read(next(n for n in archive.namelist() if n.endswith("extra/digest.json"))))
        for name, sha in digest["records"].items():
            member = next(n for n in archive.namelist() if n.split("/", 1)[1] == name)
            assert hashlib.sha256(archive.read(member)).hexdigest() == sha
    assert set(digest["records"]) == names - {"extra/digest.json"}
    assert {"extra/manifest.json", "extra/probe.pt", "constants.pkl"} <= set(digest["records"])


@pytest.mark.parametrize("names", [
    ["archive/archive_format", "archive/extra/manifest.json", "archive/data/w.bin"],  # a top folder (both formats)
    ["archive_format", "extra/manifest.json", "data/w.bin"],  # none
    ["extra/manifest.json", "archive_format", "data/w.bin"],  # none, a folder first
])
def test_seal_and_check_digest_read_either_record_layout(tmp_path, names):
    path = tmp_path / "a.zip"
    contents = [b"pt2", b"{}", bytes(range(256)) * 4]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in zip(names, contents):
            archive.writestr(name, data)
    top = "archive/" if names[0].startswith("archive/") else ""
    bare = [name[len(top):] for name in names]
    digests = integrity.seal(str(path))
    assert digests == {name: hashlib.sha256(data).hexdigest() for name, data in zip(bare, contents)}
    with zipfile.ZipFile(path) as archive:
        assert archive.namelist()[-1] == f"{top}extra/digest.json"  # beside the other records
        assert json.loads(archive.read(f"{top}extra/digest.json"))["records"] == digests
    integrity.check_digest(str(path))
    assert integrity.read_record(str(path), "data/w.bin") == contents[2]

    changed = tmp_path / "changed.zip"  # another w.bin, a CRC-32 that holds, the old digest
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(changed, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, b"other" if info.filename.endswith("w.bin") else src.read(info))
    with pytest.raises(integrity.IntegrityError, match=re.escape("records differ from digest.json: ['data/w.bin']")):
        integrity.check_digest(str(changed))

    data = bytearray(path.read_bytes())
    data[data.find(contents[2]) + 100] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(integrity.IntegrityError, match="record data/w.bin cannot be read"):  # its CRC-32
        integrity.check_digest(str(path))
