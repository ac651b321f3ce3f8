"""Number formats (`afpq_jax.formats`): code books against the papers, the ExMy builder, validation and the registry."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import afpq_jax
from afpq_jax import formats
from tests import reference as ref


def _distinct(levels):
    return sorted(set(float(v) for v in levels))


@pytest.mark.parametrize("name,expected,divisor", [
    ("fp4_e2m1", ref.FP4, 6.0), ("fp3_e2m0", ref.FP3, 4.0), ("nf4", ref.NF4, 1.0), ("nf3", ref.NF3, 1.0)])
def test_codebooks_match_papers(name, expected, divisor):
    fmt = formats.get_format(name)
    np.testing.assert_allclose(_distinct(fmt.levels), expected, rtol=0, atol=1e-7)
    assert fmt.divisor == divisor
    assert fmt.num_codes == 2**fmt.bits


def test_fp_tables_have_signed_zero_and_exact_code_count():
    fp4 = formats.get_format("fp4")
    assert len(fp4.levels) == 16 and fp4.levels[7] == 0 and np.signbit(fp4.levels[7])
    assert fp4.zero_code() == 8 and not np.signbit(fp4.levels[8])
    assert formats.get_format("fp3").num_codes == 8


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int_formats(bits):
    fmt = formats.get_format(f"int{bits}")
    assert fmt.is_int and fmt.levels == tuple(float(i) for i in range(2**bits))


@given(e=st.integers(1, 4), m=st.integers(0, 3), bias=st.integers(0, 7), sub=st.booleans())
def test_exmy_builder_properties(e, m, bias, sub):
    lv = np.asarray(formats.exmy_levels(e, m, bias, subnormals=sub))
    assert lv.size == 2 ** (1 + e + m)
    assert np.all(np.diff(lv) >= 0)
    np.testing.assert_array_equal(lv, -lv[::-1])
    assert lv[-1] == 2.0 ** (2**e - 1 - bias) * (2 - 2.0**-m)
    smallest = lv[lv > 0].min()
    assert smallest == (2.0 ** (1 - bias - m) if sub and m > 0 else 2.0 ** (1 - bias) if sub else 2.0**-bias)


def test_e4m3_like_format_is_one_line():
    f = formats.fp_format("e3m2_test", 3, 2)  # not registered; just built
    assert f.bits == 6 and f.divisor == 28.0 and f.num_codes == 64


def test_unknown_format_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown format 'fp5'.*fp4_e2m1.*int4.*nf3"):
        afpq_jax.formats.get_format("fp5")
    with pytest.raises(TypeError):
        afpq_jax.formats.get_format(4)


def test_aliases_and_case():
    assert formats.get_format("FP4") is formats.get_format("fp4_e2m1")
    assert formats.get_format("e2m0") is formats.get_format("fp3_e2m0")


@pytest.mark.parametrize("kwargs,msg", [
    (dict(levels=(-1.0, 1.0)), "contain 0"),
    (dict(levels=(1.0, 0.0, -1.0)), "sorted"),
    (dict(levels=(-1.0, 0.0, 0.5)), "span"),
    (dict(levels=tuple(np.linspace(-1, 1, 9)), bits=3), "levels"),
])
def test_format_validation(kwargs, msg):
    base = dict(name="bad", family="codebook", bits=2, levels=(-1.0, 0.0, 1.0), divisor=1.0)
    with pytest.raises(ValueError, match=msg):
        formats.Format(**{**base, **kwargs})


def test_register_rejects_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        formats.register_format(formats.get_format("nf4"))
    # a width the packed layout cannot store is refused at registration (it failed at the first quantize)
    with pytest.raises(ValueError, match="cannot pack 5-bit codes"):
        formats.register_format(formats.fp_format("fp5_e2m2", 2, 2))
    assert "fp5_e2m2" not in formats.available_formats()
