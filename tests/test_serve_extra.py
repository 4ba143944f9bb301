"""The serve extra's edges, without a Ray cluster: `import repmlp_rt` stays light, the pinned
set is consistent, the commands fail early and clearly, and request bodies decode as files do."""

import glob
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import repmlp_rt
from helpers import ROOT

DIGIT_PNGS = sorted(glob.glob(os.path.join(ROOT, "examples", "digits", "images", "*.png")))

# Runs `code` in a fresh interpreter in which the serve extra's packages cannot be imported.
WITHOUT_EXTRA = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = ("ray", "tritonclient", "starlette", "aiohttp", "google.protobuf")
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.startswith(BLOCKED):
                raise ImportError(f"No module named {name!r} (blocked by the test)")
    sys.meta_path.insert(0, Block())
""")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_EXTRA + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=120)


def test_import_repmlp_rt_stays_light_without_the_extra(small_artifact):
    result = run_python(f"""
        import sys
        import repmlp_rt
        runtime = repmlp_rt.Runtime({str(small_artifact)!r}, warmup=0)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "ray", "tritonclient", "starlette"))
        assert not heavy, heavy
        try:
            import repmlp_rt.serve
        except ImportError as error:
            print(error)
    """)
    assert result.returncode == 0, result.stderr
    assert "repmlp_rt.serve needs Ray Serve" in result.stdout and "pip install 'repmlp[serve]'" in result.stdout


def test_triton_command_works_without_the_extra(small_artifact, tmp_path):
    """A serving host without Ray can still write a Triton repository."""
    result = run_python(f"""
        from repmlp_rt.triton import write_triton_repository
        write_triton_repository({str(small_artifact)!r}, {str(tmp_path)!r}, name="m")
    """)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "m" / "config.pbtxt").is_file()


def test_pinned_set_passes_pip_check():
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def run_main(main, args, capsys):
    """(exit code, stderr) of a command's main() run in this process."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit:  # argparse usage errors
        code = exit.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("args, code, fragment", [
    (["missing.pt"], 1, "no such file"),
    (["{artifact}", "--max-batch-size", "0"], 2, "expected an integer >= 1, got 0"),
    (["{artifact}", "--max-batch-size", "32", "--max-ongoing-requests", "8"], 2,
     "max_ongoing_requests (8) must be >= max_batch_size (32)"),
    (["{artifact}", "--name", "a/b"], 1, "model name 'a/b'"),
    (["{artifact}", "{artifact}"], 1, "two artifacts are both named 'small'"),
    (["{artifact}", "--batch-wait-ms", "-1"], 2, "expected 0..10000 milliseconds"),
    (["{artifact}", "--name", "m" * 65], 1, "at most 64"),
    (["{artifact}", "--update"], 2, "--update needs --address"),
    (["{artifact}", "--max-queued-requests", "0"], 2, "expected an integer >= 1, got 0"),
    (["{artifact}", "--graceful-shutdown-s", "-1"], 2, "expected 0..3600 seconds"),
    (["{artifact}", "--proxy-location", "Everywhere"], 2, "invalid choice: 'Everywhere'"),
])
def test_serve_command_fails_before_starting_ray(small_artifact, args, code, fragment, capsys, monkeypatch):
    from repmlp_rt import serve

    monkeypatch.setattr(serve, "init_ray", lambda *a: pytest.fail("Ray was started for a bad command line"))
    got, stderr = run_main(serve.main, [a.format(artifact=small_artifact) for a in args], capsys)
    assert got == code, stderr
    assert fragment in stderr


@pytest.mark.parametrize("args, resources", [([], {"node:__internal_head__": 0.001}), (["--no-index-on-head"], None)])
def test_the_index_is_pinned_to_the_head_node_unless_told_otherwise(args, resources):
    """Its replica reserves a sliver of the resource only Ray's head node has (as Serve's
    controller does), so a worker node's loss never takes the index (/v2, the model list) down."""
    pytest.importorskip("ray.serve")
    from ray._common.constants import HEAD_NODE_RESOURCE_NAME

    from repmlp_rt import serve

    assert serve.HEAD_NODE_RESOURCE == HEAD_NODE_RESOURCE_NAME  # the name Ray gives the head's resource
    options = serve._options(serve._parser().parse_args(["x.pt", *args]))
    _, _, app = serve.index_application({}, {}, options)
    actor_options = app._bound_deployment.ray_actor_options
    assert actor_options["num_cpus"] == 0 and actor_options.get("resources") == resources


def test_classify_command_usage_errors(small_artifact, tmp_path, capsys, monkeypatch):
    from repmlp_rt import batch

    monkeypatch.setattr(batch, "init_ray", lambda *a: pytest.fail("Ray was started for a bad command line"))
    out = tmp_path / "out.jsonl"
    cases = [
        ([small_artifact, tmp_path / "nowhere", "--out", out], "no such file or folder"),
        ([small_artifact, tmp_path, "--out", out], "no images found"),
        ([small_artifact, DIGIT_PNGS[0], "--out", tmp_path / "missing" / "out.jsonl"], "does not exist"),
        ([small_artifact, f"@{tmp_path / 'list.txt'}", "--out", out], "cannot read the path list"),
    ]
    for args, fragment in cases:
        code, stderr = run_main(batch.main, args, capsys)
        assert code == 2 and fragment in stderr, stderr
    assert os.listdir(tmp_path) == []


def test_list_images_expands_folders_and_lists(tmp_path):
    from repmlp_rt.batch import list_images

    listing = tmp_path / "list.txt"
    listing.write_text(f"{DIGIT_PNGS[3]}\n\n{DIGIT_PNGS[1]}\n")
    folder = os.path.dirname(DIGIT_PNGS[0])
    assert list_images([folder]) == DIGIT_PNGS
    assert list_images([f"@{listing}", DIGIT_PNGS[0]]) == [DIGIT_PNGS[3], DIGIT_PNGS[1], DIGIT_PNGS[0]]


def test_decode_image_bytes_matches_decode_image(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    jpeg = tmp_path / "noise.jpg"
    Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)).save(jpeg, quality=90)
    for path in [*DIGIT_PNGS[:3], str(jpeg)]:
        with open(path, "rb") as f:
            from_bytes = repmlp_rt.decode_image_bytes(f.read(), name=path)
        np.testing.assert_array_equal(from_bytes, repmlp_rt.decode_image(path))
    with pytest.raises(ValueError, match="cannot decode image upload.png: "):
        repmlp_rt.decode_image_bytes(b"\x89PNG broken", name="upload.png")
    with pytest.raises(ValueError, match="no data"):
        repmlp_rt.decode_image_bytes(b"")
