"""The block-by-block driver's checks on the weights it quantizes (`afpq_jax._src.calibration.driver`): a NaN
weight is an error naming its layer, and group scales that saturate their storage dtype are a warning naming the
layer and the fix. Was: the NaN error named no layer; float16 scales saturated at 65504 on a 1e6 outlier
without a word."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

import afpq_jax as aq

FIXTURES = Path(__file__).parent / "fixtures"
TENSOR = "model.layers.1.mlp.down_proj.weight"


def _with_value(tmp_path: Path, value: float) -> Path:
    from safetensors.numpy import load_file, save_file
    d = tmp_path / "model"
    shutil.copytree(FIXTURES / "llama_gqa", d)
    tensors = load_file(str(d / "model.safetensors"))
    tensors[TENSOR] = tensors[TENSOR].copy()
    tensors[TENSOR][3, 5] = value
    save_file(tensors, str(d / "model.safetensors"))
    return d


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_nan_weight_names_its_layer(tmp_path, value):
    model = _with_value(tmp_path, value)
    with pytest.raises(aq.InputError, match=r"layers\.1\.mlp\.down_proj has 1 NaN/inf weights"):
        aq.quantize_pretrained(model, aq.QuantScheme.create("int4", group_size=16), progress=False)


def test_saturated_float16_scales_are_warned_per_layer(tmp_path, caplog):
    model = _with_value(tmp_path, 1e6)  # int4-asym step (max - min) / 15 > 65504
    with caplog.at_level(logging.WARNING, logger="afpq_jax"):
        aq.quantize_pretrained(model, aq.QuantScheme.create("int4", group_size=16), progress=False)
    warned = [r.getMessage() for r in caplog.records if "saturate" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("layers.1.mlp.down_proj: 1 group scale(s) saturate at "
                                                     "float16's largest value 65504"), warned
    assert "--scale-dtype float32" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="afpq_jax"):
        aq.quantize_pretrained(model, aq.QuantScheme.create("int4", group_size=16, scale_dtype="float32"),
                               progress=False)
    assert "saturate" not in caplog.text
