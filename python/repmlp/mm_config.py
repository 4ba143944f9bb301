"""The input size and preprocessing an mmcls/mmpretrain checkpoint's saved config names.

Both save their config in the checkpoint's ``meta['config']``: the config file's text (mmcv's
``Config.pretty_text``: assignments of literals and ``dict(...)`` calls) or the dict itself.
The text is read with :mod:`ast`, never executed: literals, lists, tuples, dicts, ``dict(...)``
with keywords and names assigned earlier in the text are understood, anything else is skipped.
From the test pipeline come the resize (mmcls ``Resize``, mmpretrain ``Resize``/``ResizeEdge``),
the center crop (the input size), the interpolation and the normalization.
"""

import ast
from typing import Any, Dict, List, Mapping, Optional, Tuple

__all__ = ["MetaPreprocessing", "config_from_meta", "preprocessing_from_config"]

MetaPreprocessing = Dict[str, Any]  # img_size and Preprocessing fields


class _Unknown(Exception):
    """An expression the reader does not evaluate."""


def _evaluate(node: ast.AST, names: Mapping[str, Any]) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_evaluate(e, names) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Dict):
        out: Dict[Any, Any] = {}
        for key, value in zip(node.keys, node.values):
            if key is None:
                out.update(_evaluate(value, names))
            else:
                out[_evaluate(key, names)] = _evaluate(value, names)
        return out
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand, names)
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        out = {}
        for keyword in node.keywords:
            value = _evaluate(keyword.value, names)
            if keyword.arg is None:
                out.update(value)
            else:
                out[keyword.arg] = value
        return out
    raise _Unknown(type(node).__name__)


def config_from_meta(meta: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The config saved in a checkpoint's ``meta`` as a dict ({} when there is none)."""
    config = (meta or {}).get("config")
    if isinstance(config, Mapping):
        return dict(config)
    if not isinstance(config, str):
        return {}
    try:
        tree = ast.parse(config)
    except SyntaxError:
        return {}
    names: Dict[str, Any] = {}
    for statement in tree.body:
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1 and isinstance(statement.targets[0], ast.Name):
            try:
                names[statement.targets[0].id] = _evaluate(statement.value, names)
            except (_Unknown, TypeError, ValueError):
                continue
    return names


def _get(config: Mapping[str, Any], *path: str) -> Any:
    node: Any = config
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def _test_pipeline(config: Mapping[str, Any]) -> List[Mapping[str, Any]]:
    for path in (("data", "test", "pipeline"), ("test_dataloader", "dataset", "pipeline"), ("test_pipeline",)):
        pipeline = _get(config, *path)
        if isinstance(pipeline, list) and all(isinstance(step, Mapping) for step in pipeline):
            return pipeline
    return []


def _pair(value: Any) -> Optional[Tuple[int, int]]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    return None


def _resize(step: Mapping[str, Any]) -> Dict[str, Any]:
    """Resize mode and size of one resize step; {} when it is not one the reader knows."""
    kind = step.get("type")
    size = step.get("size", step.get("scale"))
    if kind == "ResizeEdge" and step.get("edge", "short") == "short" and isinstance(size, int):
        return {"resize_mode": "short_side", "resize": (size, size)}
    if kind != "Resize":
        return {}
    pair = _pair(size)
    if pair is None:
        return {}
    if -1 in pair:  # mmcls: (N, -1) scales the short side to N
        short = max(pair)
        return {"resize_mode": "short_side", "resize": (short, short)}
    if isinstance(size, int) and step.get("adaptive_side", "short") == "short" and "size" in step:
        return {"resize_mode": "short_side", "resize": pair}
    return {"resize_mode": "exact", "resize": pair}


def _normalization(config: Mapping[str, Any], pipeline: List[Mapping[str, Any]]) -> Dict[str, Any]:
    sources = [step for step in pipeline if step.get("type") == "Normalize"]
    sources += [_get(config, "data_preprocessor"), _get(config, "model", "data_preprocessor"), _get(config, "img_norm_cfg")]
    for source in sources:
        if isinstance(source, Mapping) and "mean" in source and "std" in source:
            return {"mean": tuple(float(v) for v in source["mean"]), "std": tuple(float(v) for v in source["std"])}
    return {}


def preprocessing_from_config(config: Mapping[str, Any]) -> MetaPreprocessing:
    """``img_size`` and :class:`~repmlp.variants.Preprocessing` fields the config's test pipeline
    names (only those it names)."""
    pipeline = _test_pipeline(config)
    found: Dict[str, Any] = {}
    for step in pipeline:
        found.update(_resize(step))
        if step.get("type") in ("Resize", "ResizeEdge") and isinstance(step.get("interpolation"), str):
            found["interpolation"] = step["interpolation"]
        if step.get("type") == "CenterCrop" and _pair(step.get("crop_size")) is not None:
            found["img_size"] = _pair(step["crop_size"])
    if "img_size" not in found:
        size = _pair(_get(config, "model", "backbone", "img_size"))
        if size is not None:
            found["img_size"] = size
    found.update(_normalization(config, pipeline))
    return found
