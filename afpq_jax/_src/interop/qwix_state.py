"""Saving and restoring a qwix-quantized model's state (packed codes and scales, not float weights) with orbax.

The directory holds ``state/`` (an orbax tree of the leaves, keyed ``leaf_00000``...) and ``manifest.json``:
each leaf's path (`jax.tree_util.keystr`), shape and dtype, plus each packed weight's scheme, weight count and
bytes — so the recorded bits per weight are what the files hold. Restoring needs the model's structure: pass
the same model class with the same rules (an abstract ``nnx.eval_shape`` one is enough); a different structure
is a `CheckpointError` naming the first leaf that differs. Written into a temporary sibling, then renamed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from afpq_jax._src.checkpoint import staging_dir, write_arrays
from afpq_jax._src.errors import CheckpointError
from afpq_jax._src.interop.qwix_providers import packed_weights

MANIFEST = "manifest.json"
STATE_DIR = "state"
FORMAT = "afpq-jax-qwix-state-v1"


def _leaves(tree: Any) -> tuple[list[str], list[Any], Any]:
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree)
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [jax.tree_util.keystr(p) for p, _ in flat], [v for _, v in flat], treedef


def _packed_summary(tree: Any) -> dict[str, Any]:
    layers, weights, bits = {}, 0, 0
    for path, pw in packed_weights(tree).items():
        nbytes = pw.qt.nbytes
        count = pw.layout.k * pw.layout.n
        layers[path] = {"scheme": pw.scheme.to_json(), "shape": list(pw.layout.shape),
                        "contracting": list(pw.layout.contracting), "weights": count, "bytes": nbytes}
        weights += count
        bits += 8 * nbytes
    return {"layers": layers, "weights": weights, "bits_per_weight": bits / weights if weights else None}


def save_state(model: Any, path: str | os.PathLike, *, overwrite: bool = False) -> dict[str, Any]:
    """Writes a quantized NNX model's state (or a Linen params tree) to ``path``; returns the manifest."""
    keys, values, _ = _leaves(model)
    manifest = {"format": FORMAT, "leaves": [{"path": k, "shape": list(np.shape(v)), "dtype": str(v.dtype)}
                                             for k, v in zip(keys, values)],
                "packed": _packed_summary(model)}
    with staging_dir(Path(path), overwrite) as tmp:
        write_arrays(tmp / STATE_DIR, {f"leaf_{i:05d}": v for i, v in enumerate(values)})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def restore_state(target: Any, path: str | os.PathLike) -> Any:
    """Restores what `save_state` wrote into ``target``: an NNX model (abstract or not) of the same class and
    rules, updated in place and returned; or a params tree of the same structure (abstract leaves allowed),
    returned restored."""
    import orbax.checkpoint as ocp

    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: no readable {MANIFEST} ({type(e).__name__}); not a state written by "
                              f"afpq_jax.qwix.save_state") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r}, this afpq-jax reads {FORMAT!r}")
    keys, values, treedef = _leaves(target)
    saved = manifest["leaves"]
    for i, (k, v) in enumerate(zip(keys, values)):
        if i >= len(saved) or saved[i]["path"] != k or tuple(saved[i]["shape"]) != tuple(np.shape(v)) or \
                saved[i]["dtype"] != str(v.dtype):
            got = saved[i] if i < len(saved) else "nothing"
            raise CheckpointError(f"{path}: leaf {k} {v.dtype}{tuple(np.shape(v))} of the target is {got} in the "
                                  f"checkpoint; restore into the same model class quantized with the same rules")
    if len(saved) != len(keys):
        raise CheckpointError(f"{path}: the checkpoint has {len(saved)} leaves, the target {len(keys)}; restore "
                              f"into the same model class quantized with the same rules")
    # Leaves of the same shapes can hold another format (nf4 and fp4 codes look alike): the schemes must agree.
    saved_layers = manifest.get("packed", {}).get("layers", {})
    for layer, pw in packed_weights(target).items():
        was = saved_layers.get(layer, {}).get("scheme")
        if was != pw.scheme.to_json():
            raise CheckpointError(f"{path}: {layer} was saved as {was}, the target quantizes it as "
                                  f"{pw.scheme.to_json()}; restore into a model quantized with the same rules")
    abstract = {f"leaf_{i:05d}": jax.ShapeDtypeStruct(np.shape(v), v.dtype) for i, v in enumerate(values)}
    restored = ocp.StandardCheckpointer().restore(path / STATE_DIR, abstract)
    tree = jax.tree_util.tree_unflatten(treedef, [restored[f"leaf_{i:05d}"] for i in range(len(values))])
    if isinstance(target, nnx.Module):
        nnx.update(target, tree)
        return target
    return tree

