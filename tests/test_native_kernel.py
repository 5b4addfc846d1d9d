"""dozero's own kernels (model/gemv.c, built and loaded by model/native.py): one input row times an int8 or
int4 matrix, checked against float64 arithmetic, inside the quantized layers, and their build's fallbacks."""

from __future__ import annotations

import warnings

import pytest
import torch

from dozero.compress.quantize import quantize_weight
from dozero.model import native
from dozero.model.native import Int4RowProduct, Int8RowProduct, native_available
from dozero.model.quantized import QuantizedLinear, dequantize

needs_kernel = pytest.mark.skipif(not native_available(), reason="needs AVX-512 VNNI and a C compiler")


def exact(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.double() @ q.double().t()) * scale.double()


def rounding_bound(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The kernel rounds x to multiples of sx = max|x| / 32767 (at most sx / 2 off each) and sums the int8
    products exactly: |error of y[n]| <= scale[n] * sum_k |q[n, k]| * sx / 2, plus float32's last bits."""
    sx = x.abs().max().double() / 32767
    return scale.double() * q.double().abs().sum(1) * sx / 2 * 1.001 + 1e-6 * exact(x, q, scale).abs()


@needs_kernel
@pytest.mark.parametrize(
    "n, k",
    [(2304, 768), (50257, 768), (7, 100), (5, 65), (3, 1), (9, 3000), (576, 1536)],
    ids=lambda v: str(v),
)
def test_one_row_matches_float64_within_the_input_rounding(n, k):
    """Rows in groups of 4 and the last ones alone (N not a multiple of 4), rows whose end is a partial
    64-byte load (K not a multiple of 64), the whole int8 range (-128 included). Far more exact than
    bfloat16 inputs (what PyTorch's `_weight_int8pack_mm` takes), and still more exact with an outlier
    in x (SmolLM2's down-projection inputs reach ~100x their mean), which coarsens the 16-bit steps."""
    g = torch.Generator().manual_seed(n * 7 + k)
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    scale = torch.rand(n, generator=g) * 0.02
    product = Int8RowProduct(q, scale)
    for outlier, margin in ((None, 20), (40.0, 2)):
        x = torch.randn(1, k, generator=g)
        if outlier is not None:
            x[0, k // 2] = outlier
        y = product(x)
        err = (y[0].double() - exact(x, q, scale)[0]).abs()
        assert y.shape == (1, n) and y.dtype == torch.float32
        assert (err <= rounding_bound(x, q, scale)[0]).all(), err.max()
        bf16_err = (exact(x.bfloat16().float(), q, scale) - exact(x, q, scale)).abs().max()
        assert err.max() < bf16_err / margin or k == 1  # one input: bfloat16 may happen to be exact


@needs_kernel
@pytest.mark.parametrize(
    "n, k, group, mins",
    [
        (2304, 768, 32, False),
        (7, 128, 32, True),
        (5, 576, 64, False),
        (9, 3072, 128, True),
        (3, 64, 32, False),
        (6, 512, 256, False),
    ],
    ids=lambda v: str(v),
)
def test_int4_one_row_matches_float64_within_the_input_rounding(n, k, group, mins):
    """int4 in groups (32: two groups per 64 columns; 64 and more), GGUF Q4_1's mins or none, rows ending in
    half a 128-column chunk (K = 576, SmolLM2's width), N not a multiple of 4. The kernel rounds x to 15-bit
    integers (rows ending in a quarter chunk too: K = 96, 160); the sums it multiplies the zero points by
    are of the rounded x, so the error is bounded by
    |W| (not by the unsigned nibbles' larger scale * u)."""
    from dozero.compress.quantize import quantize_weight

    g = torch.Generator().manual_seed(n + k + group)
    q, scales = quantize_weight(torch.randn(n, k, generator=g) * 0.05, 4, group)
    m = (torch.randn(n, k // group, generator=g) * 0.01).half() if mins else None
    w = dequantize(q, scales, 4, m).double()
    assert Int4RowProduct.fits(k, group, scales, m)
    product = Int4RowProduct(q, scales, m, group)
    for outlier in (None, 20.0):
        x = torch.randn(1, k, generator=g)
        if outlier is not None:
            x[0, 3] = outlier
        y = product(x)
        exact_y = x.double() @ w.t()
        err = (y.double() - exact_y).abs()[0]
        bound = w.abs().sum(1) * (x.abs().max().double() / 16383) / 2 + 1e-5 * exact_y.abs()[0]
        assert (err <= bound).all(), (err / bound).max()
        if outlier is None:
            bf16_err = (x.bfloat16().double() @ w.t() - exact_y).abs().max()
            assert err.max() < bf16_err / 5


def test_int4_takes_only_what_the_kernel_reads():
    fp16, fp32 = torch.ones(2, 2, dtype=torch.float16), torch.ones(2, 2)
    takes = native_available()
    assert Int4RowProduct.fits(576, 32, fp16, None) == takes and Int4RowProduct.fits(512, 128, fp16, fp16) == takes
    assert not Int4RowProduct.fits(80, 16, fp16, None)  # not whole 32-column blocks
    assert not Int4RowProduct.fits(576, 48, fp16, None)  # a group neither 32 nor 64k
    assert not Int4RowProduct.fits(576, 32, fp32, None) and not Int4RowProduct.fits(576, 32, fp16, fp32)


@needs_kernel
def test_zero_rows_inputs_in_other_layouts_and_a_given_output():
    q = torch.randint(-128, 128, (6, 70), dtype=torch.int8)
    product = Int8RowProduct(q, torch.ones(6))
    assert product(torch.zeros(1, 70)).abs().max() == 0  # max|x| = 0: no division by zero
    x = torch.randn(70, 2)[:, 0]  # strided and a bfloat16 row are copied to float32 first
    torch.testing.assert_close(product(x[None]), product(x.contiguous()[None]))
    torch.testing.assert_close(product(x.bfloat16()[None]), product(x.bfloat16().float()[None]))
    out = torch.full((1, 6), float("nan"))
    assert product(x[None], out) is out and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="6 contiguous float32"):
        product(x[None], torch.empty(1, 5))
    with pytest.raises(ValueError, match="1 to 8 rows of 70"):  # another width, or too many rows: never read past
        product(torch.randn(1, 71))
    with pytest.raises(ValueError, match="1 to 8 rows of 70"):
        product(torch.randn(9, 70))
    rows = torch.randn(8, 70)  # each row as if it were alone, bit for bit
    assert torch.equal(product(rows), torch.cat([product(r[None]) for r in rows]))


@needs_kernel
@pytest.mark.parametrize("bits, mins", [(8, False), (4, False), (4, True)])
def test_quantized_layer_one_row_takes_it_and_equals_the_reference_path(bits, mins):
    """A "packed" layer's call with up to 8 rows (int8 per row; int4 in groups of 32, with GGUF Q4_1's mins or
    none) goes through dozero's kernel, each row as if alone; 9 rows through PyTorch's bfloat16 kernel.
    Against the reference path (dequantize, then F.linear in fp32), dozero's is the closer."""
    torch.manual_seed(0)
    q, scales = quantize_weight(torch.randn(96, 256) * 0.05, bits=bits, group=256 if bits == 8 else 32)
    m = (torch.randn(96, 8) * 0.01).half() if mins else None
    layer = QuantizedLinear(q, scales, torch.randn(96), bits=bits, mins=m)
    layer.kernel = "packed"
    x = torch.randn(9, 256)
    with torch.no_grad():
        reference = torch.nn.functional.linear(x, layer.dequantized(), layer.bias)
        one, several = layer(x[:1]), layer(x)
        assert torch.equal(layer(x[:8]), torch.cat([layer(r[None]) for r in x[:8]]))
    assert isinstance(layer.few_rows(), Int8RowProduct if bits == 8 else Int4RowProduct)
    bound = layer.dequantized().abs().sum(1) * x[:1].abs().max() / (16383 if bits == 4 else 32767)
    assert ((one - reference[:1]).abs()[0] <= bound + 1e-5).all()
    torch.testing.assert_close(several, reference, atol=0.05, rtol=0.02)
    assert (several[:1] - reference[:1]).abs().max() > 5 * (one - reference[:1]).abs().max()


def test_unavailable_without_the_cpu_a_compiler_or_when_asked(monkeypatch, tmp_path):
    """DOZERO_NATIVE=0, a CPU without VNNI, no compiler, or a compiler that fails: None (PyTorch's kernel is
    used), the last with one warning; nothing half-written in the cache folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    try:
        native.library.cache_clear()
        monkeypatch.setenv("DOZERO_NATIVE", "0")
        assert native.library() is None
        monkeypatch.delenv("DOZERO_NATIVE")
        native.library.cache_clear()
        monkeypatch.setattr(native, "cpu_flags", lambda: {"avx2", "fma"})
        assert native.library() is None
        monkeypatch.setattr(native, "cpu_flags", lambda: {"avx512_vnni", "avx512bw", "f16c"})
        native.library.cache_clear()
        monkeypatch.setenv("CC", "no-such-compiler-here")
        assert native.library() is None
        native.library.cache_clear()
        monkeypatch.setenv("CC", "false")  # runs, fails
        with pytest.warns(UserWarning, match="did not build"):
            assert native.library() is None
        assert not any(p.is_file() for p in tmp_path.rglob("*"))
    finally:
        native.library.cache_clear()


@needs_kernel
def test_built_once_into_the_cache_and_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    try:
        native.library.cache_clear()
        assert native.library() is not None
        built = list((tmp_path / "dozero").iterdir())
        assert len(built) == 1 and built[0].name.startswith("gemv-") and built[0].suffix == ".so"
        stamp = built[0].stat().st_mtime_ns
        native.library.cache_clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert native.library() is not None
        assert built[0].stat().st_mtime_ns == stamp  # not rebuilt
    finally:
        native.library.cache_clear()
