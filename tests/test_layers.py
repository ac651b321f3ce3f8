"""`QuantDense`: the packed weight in the forward pass, int8 activations and their checks."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import afpq_jax as aq


def test_quant_dense_uses_the_packed_weight():
    layer = aq.QuantDense(96, 24, use_bias=True)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 96)), jnp.float32)
    w = layer.kernel.get_value()
    qt = layer.quantize(aq.QuantScheme.create("fp3", group_size=32))
    assert layer.is_quantized and not hasattr(layer, "kernel")
    np.testing.assert_allclose(layer(x), x @ aq.dequantize(qt) + layer.bias.get_value(), rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(layer(x) - x @ w).max()) > 0  # really quantized
    with pytest.raises(ValueError, match="does not match layer"):
        aq.QuantDense(8, 8).set_quantized(aq.quantize(np.ones((8, 4), np.float32), "nf4"))
    with pytest.raises(aq.InputError, match="in_features"):
        aq.QuantDense(96, 24)(x[:, :50])
    # a scheme's dynamic int8 activations come along (they were dropped: the layer ran float activations)
    a8 = aq.QuantDense(96, 24)
    a8.quantize(aq.QuantScheme.create("int4", group_size=32, act_bits=8, act_mode="dynamic"))
    assert str(a8.scheme) == "int4-asym-g32-a8dynamic"
    from afpq_jax.kernels import quantized_matmul_a8
    np.testing.assert_array_equal(a8(x), quantized_matmul_a8(x, a8.quantized_tensor(), None))
    static = aq.QuantDense(96, 24)
    static.quantize(aq.QuantScheme.create("int4", act_bits=8, act_mode="static"))  # no scale yet: weights only
    assert str(static.scheme) == "int4-asym-g128"
    with pytest.raises(TypeError, match="takes a QuantScheme"):
        aq.QuantDense(96, 24).quantize("nf4")


def test_set_activation_quant_validates_before_changing_the_layer():
    layer = aq.QuantDense(64, 32, scheme=aq.QuantScheme.create("int4", group_size=32))
    before = layer.scheme
    with pytest.raises(aq.InputError, match="positive input_scale"):
        layer.set_activation_quant(8, "static", 0.0)
    assert layer.scheme == before and layer.input_scale is None
    layer.set_activation_quant(8, "static", 0.5)
    assert layer.scheme.act_mode == "static" and float(layer.input_scale.get_value()) == 0.5
    layer.set_activation_quant(None, None)
    assert not layer.scheme.quantizes_activations and layer.input_scale is None
    with pytest.raises(aq.InputError, match="quantize first"):
        aq.QuantDense(8, 8).set_activation_quant(8, "dynamic")
