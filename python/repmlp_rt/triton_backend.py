"""A Triton Inference Server Python-backend model that serves a RepMLPNet artifact with repmlp_rt.

``repmlp-triton-repo ARTIFACT REPO --backend python`` copies this file to
``REPO/<name>/1/model.py``, beside the artifact; ``config.pbtxt`` says which file that is
(parameter ``ARTIFACT``). The tensors are those of ``repmlp_rt.oip``: ``INPUT__0`` (FP32
``[C, H, W]``, normalized) or ``IMAGE`` (BYTES ``[1]``, an encoded image of any size, run
through the artifact's own preprocessing), exactly one per request; outputs ``OUTPUT__0``
(logits) or one per feature map. Each ``execute`` runs the items of all its requests
together, one model call per input shape; a request that cannot be run (an undecodable image,
both inputs, neither) gets its own error and the others their answers.

The backend's stub runs this file in its own Python, which does not read ``PYTHONPATH``, and
the stub of Triton's pip wheel is built against numpy 1.x. The stub imports this file first,
then ``triton_python_backend_utils`` (which imports numpy), then calls ``initialize``. So,
when imported as ``model.py``, this file reads the ``PYTHON_PATH`` parameter (``--python-path``)
from the ``config.pbtxt`` beside its version folder and puts those folders at the front of
``sys.path`` before anything imports numpy; nothing but the standard library is imported at
module level. The artifact is loaded with its self-check; a file that fails it makes
``initialize`` raise, so Triton marks the model UNAVAILABLE with the runtime's message.
"""

import json
import os
import re
import sys

# config.pbtxt parameters written by repmlp_rt.triton.
ARTIFACT = "ARTIFACT"
THREADS = "THREADS"
PYTHON_PATH = "PYTHON_PATH"


def parameter(config, key, default=""):
    """A string parameter of the model configuration (Triton passes it as JSON)."""
    return config.get("parameters", {}).get(key, {}).get("string_value", default)


def prepend_python_path(value):
    """Puts the folders of a ``PYTHON_PATH`` value (os.pathsep-separated) first on ``sys.path``,
    in order."""
    folders = [folder for folder in value.split(os.pathsep) if folder]
    for folder in reversed(folders):
        while folder in sys.path:
            sys.path.remove(folder)
        sys.path.insert(0, folder)
    return folders


def configured_python_path(config_file):
    """The ``PYTHON_PATH`` parameter of a config.pbtxt as written by repmlp-triton-repo (its
    folders hold no quotes or backslashes), or "" when there is none."""
    try:
        with open(config_file, encoding="utf-8") as file:
            text = file.read()
    except OSError:
        return ""
    match = re.search(r'key:\s*"' + PYTHON_PATH + r'"\s*value:\s*\{\s*string_value:\s*"([^"]*)"', text)
    return match.group(1) if match else ""


if __name__ != "repmlp_rt.triton_backend":  # loaded by the stub as <model>/1/model.py
    prepend_python_path(configured_python_path(
        os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config.pbtxt")))


class TritonPythonModel:
    """One model instance (one stub process): one ``repmlp_rt.Runtime``."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        prepend_python_path(parameter(config, PYTHON_PATH))  # as served, should it differ from the file
        import numpy
        import triton_python_backend_utils

        import repmlp_rt
        from repmlp_rt import oip

        self.np, self.pb_utils, self.oip = numpy, triton_python_backend_utils, oip
        if int(numpy.__version__.split(".")[0]) >= 2:
            # Under numpy 2 the stub (built against numpy 1.x) misreads every output array: the
            # client gets an error or an empty tensor. Refuse to load instead, with the reason.
            raise RuntimeError(f"numpy {numpy.__version__} from {os.path.dirname(numpy.__file__)}: the Python "
                               "backend's stub is built against numpy 1.x and misreads numpy 2 arrays; put a "
                               "folder with numpy<2 first on its path (repmlp-triton-repo --python-path)")
        folder = os.path.join(args["model_repository"], args["model_version"])
        artifact = os.path.join(folder, parameter(config, ARTIFACT))
        threads = int(parameter(config, THREADS, "0")) or None
        device = "cpu"
        if args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args['model_instance_device_id']}"
        # Self-check on: a corrupt or altered artifact raises ArtifactError here and the model
        # stays UNAVAILABLE with that message.
        self.runtime = repmlp_rt.Runtime(artifact, device=device, threads=threads,
                                         warmup_batch=max(1, config.get("max_batch_size", 1)))
        self.names = {name: oip.output_name(self.runtime.output_kind, name) for name in self.runtime.output_names}

    def _input(self, request, name):
        tensor = self.pb_utils.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    def _error(self, message):
        return self.pb_utils.InferenceResponse(error=self.pb_utils.TritonError(message))

    def _run(self, items):
        """Every output for every item: one model call per (dtype, shape) group."""
        results = {}
        for members in self.oip.group_by_shape(items):
            outputs = self.runtime.infer_outputs(self.np.stack([items[i] for i in members]))
            for name, values in outputs.items():
                target = results.get(self.names[name])
                if target is None:
                    target = results[self.names[name]] = self.np.empty((len(items), *values.shape[1:]),
                                                                       dtype=self.np.float32)
                target[members] = values
        return results

    def execute(self, requests):
        responses = [None] * len(requests)
        items, spans = [], []
        for r, request in enumerate(requests):
            try:
                given = self.oip.request_items({name: self._input(request, name)
                                                for name in (self.oip.INPUT, self.oip.IMAGE)})
            except ValueError as error:  # repmlp_rt.InputError: this request only
                responses[r] = self._error(str(error))
                continue
            spans.append((r, len(items), len(given)))
            items += given
        if not items:
            return responses
        try:
            results = self._run(items)
        except Exception as error:  # the model failed (e.g. out of memory): this batch's requests say so
            for r, _, _ in spans:
                responses[r] = self._error(f"{type(error).__name__}: {error}")
            return responses
        for r, start, count in spans:
            tensors = [self.pb_utils.Tensor(name, values[start:start + count]) for name, values in results.items()]
            responses[r] = self.pb_utils.InferenceResponse(output_tensors=tensors)
        return responses

    def finalize(self):
        self.runtime = None
