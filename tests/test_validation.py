"""The option configs (methods, calibration, activations, training) check their values' types."""

from __future__ import annotations

import numpy as np
import pytest

import afpq_jax as aq
from tests.support import FIXTURES, NF3


def test_configs_check_types_and_clip_accepts_a_bool(caplog):
    from afpq_jax._src.algorithms.clip import DEFAULT_SKIP
    assert aq.RTN(clip=True).clip == aq.ClipSearch() and aq.RTN(clip=False).clip is None  # True: AttributeError
    assert aq.AWQ(clip=False).clip is None
    assert aq.ClipSearch(skip=["attn.q_proj"]).skip == ("attn.q_proj",) and DEFAULT_SKIP == aq.ClipSearch().skip
    for make, exc, msg in [(lambda: aq.RTN(clip="yes"), TypeError, "ClipSearch"),
                           (lambda: aq.GPTQ(damp="0.1").validate(), aq.InputError, "damp"),
                           (lambda: aq.GPTQ(block_size=1.5).validate(), aq.InputError, "block_size"),
                           (lambda: aq.AWQ(grid=2.5).validate(), aq.InputError, "grid"),
                           (lambda: aq.Calibration(random=True, seed="a").validate(), aq.InputError, "seed"),
                           (lambda: aq.Calibration(token_ids=np.ones(64)).validate(), TypeError, "integer token"),
                           (lambda: aq.ActivationQuant(thresholds=(150,)).validate(), aq.InputError, "pair"),
                           (lambda: aq.QATConfig(steps=2.5).validate(), aq.InputError, "steps"),
                           (lambda: aq.SelfGeneratedData(samples=1.5).validate(), aq.InputError, "samples"),
                           (lambda: aq.ClipSearch(skip="attn.q_proj"), aq.InputError, "skip"),
                           (lambda: aq.quantize_pretrained(None, NF3), TypeError, "takes a path"),
                           (lambda: aq.load(FIXTURES / "llama_gqa", dtype="int8"), aq.InputError, "dtype")]:
        with pytest.raises(exc, match=msg):
            make()
    # a skip entry that names no layer is a warning (it silently clipped q_proj)
    with caplog.at_level("WARNING", logger="afpq_jax"):
        aq.quantize_pretrained(FIXTURES / "llama_gqa", NF3, method=aq.RTN(clip=aq.ClipSearch(skip=("q_proj",))),
                               calibration=aq.Calibration(random=True, samples=2, seqlen=16), progress=False)
    assert "['q_proj'] name no layer" in caplog.text
