"""The public quantization API: argument handling, validation errors, threads, dequantize input forms."""
from __future__ import annotations

import numba
import numpy as np
import pytest

import gguftool
from gguftool.errors import QuantError
from gguftool.gguf.constants import GGMLType
from gguftool.quants import SUPPORTED_TYPES, can_dequantize, dequantize, quantize, registry

ALL_PRODUCED = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4"]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1234)
    x = rng.standard_normal((12, 512)).astype(np.float32)
    x[3, 17] = 9.0
    imatrix = (rng.random(512) ** 3).astype(np.float32)
    return x, imatrix


# --- types
def test_supported_types():
    names = {t.name for t in SUPPORTED_TYPES}
    assert set(ALL_PRODUCED) <= names
    assert names == {"F32"} | {t.name for t in registry.KERNEL_TYPES}  # the IQ/TQ types as they are added
    for t in SUPPORTED_TYPES:
        assert can_dequantize(t)


def test_can_dequantize_other_types():
    assert can_dequantize("f32") and can_dequantize("I8") and can_dequantize(GGMLType.F64)
    assert not can_dequantize("Q8_K")
    assert not can_dequantize(GGMLType.NVFP4)
    assert not can_dequantize("no_such_type")


@pytest.mark.slow
def test_type_spellings_agree(data):
    x, _ = data
    ref = quantize(x, GGMLType.Q4_K)
    assert np.array_equal(quantize(x, "q4_k"), ref)
    assert np.array_equal(quantize(x, "Q4_K"), ref)
    assert np.array_equal(quantize(x, int(GGMLType.Q4_K)), ref)


def test_package_level_api_is_the_same():
    assert gguftool.quantize is quantize
    assert gguftool.dequantize is dequantize


def test_unknown_type():
    with pytest.raises(QuantError, match=r"^unknown ggml type 'q9_9'$"):
        quantize(np.zeros((1, 32), np.float32), "q9_9")
    with pytest.raises(QuantError, match="unknown ggml type"):
        quantize(np.zeros((1, 32), np.float32), 3.5)


def test_unsupported_type():
    with pytest.raises(QuantError, match=r"^cannot quantize to Q8_K: supported types are F32, F16, "):
        quantize(np.zeros((1, 256), np.float32), "q8_k")
    with pytest.raises(QuantError, match=r"^cannot dequantize Q8_1 tensors"):
        dequantize(np.zeros(36, np.uint8), "Q8_1", 32)
    with pytest.raises(QuantError, match=r"^cannot dequantize NVFP4 tensors"):
        dequantize(np.zeros(36, np.uint8), "NVFP4", 64)


@pytest.mark.parametrize("qtype", registry.KERNEL_TYPES, ids=lambda t: t.name)
def test_type_module_interface(qtype):
    """Every type module has registry.py's interface (the block functions are exercised in test_quants_golden)."""
    mod = registry.kernels(qtype)
    assert mod.GGML_TYPE == qtype
    # llama.cpp ignores the imatrix for these (quantize_q8_0, quantize_tq1_0/tq2_0, quantize_mxfp4)
    ignores = (GGMLType.F16, GGMLType.BF16, GGMLType.Q8_0, GGMLType.TQ1_0, GGMLType.TQ2_0, GGMLType.MXFP4)
    assert mod.USES_IMATRIX is (qtype not in ignores)
    assert mod.BLOCK_BYTES == qtype.type_size
    for name in ("make_scratch", "prepare_row", "quantize_block", "dequantize_block", "quantize_rows",
                 "dequantize_rows"):
        assert callable(getattr(mod, name)), name
    assert mod.quantize_rows_screened is None or callable(mod.quantize_rows_screened)


# --- shapes and dtypes
@pytest.mark.slow
def test_output_shape_and_dtype(data):
    x, _ = data
    for name in ALL_PRODUCED:
        t = GGMLType[name]
        q = quantize(x, name)
        assert q.dtype == np.uint8
        assert q.shape == (12, t.row_bytes(512))
        y = dequantize(q, name, 512)
        assert y.dtype == np.float32 and y.shape == (12, 512)


def test_one_dimensional_input_is_one_row(data):
    x, _ = data
    q = quantize(x[5], "Q5_0")
    assert q.shape == (1, GGMLType.Q5_0.row_bytes(512))
    assert np.array_equal(q[0], quantize(x, "Q5_0")[5])


def test_non_contiguous_and_other_dtypes(data):
    x, imatrix = data
    ref = quantize(x, "Q4_1", imatrix)
    fortran = np.asfortranarray(x)
    assert not fortran.flags.c_contiguous
    assert np.array_equal(quantize(fortran, "Q4_1", imatrix), ref)
    wide = np.zeros((12, 1024), np.float32)
    wide[:, ::2] = x
    assert np.array_equal(quantize(wide[:, ::2], "Q4_1", imatrix), ref)
    # float64 values that are exactly float32 give the same bytes
    assert np.array_equal(quantize(x.astype(np.float64), "Q4_1", imatrix.astype(np.float64)), ref)
    # a read-only array (e.g. a memory map) is accepted
    ro = x.copy()
    ro.flags.writeable = False
    assert np.array_equal(quantize(ro, "Q4_1", imatrix), ref)


def test_bad_shapes_and_dtypes():
    with pytest.raises(QuantError, match="expected \\(rows, n_per_row\\)"):
        quantize(np.zeros((2, 2, 32), np.float32), "Q8_0")
    with pytest.raises(QuantError, match="dtype"):
        quantize(np.array([["a"] * 32]), "Q8_0")


def test_zero_rows():
    q = quantize(np.zeros((0, 64), np.float32), "Q8_0")
    assert q.shape == (0, 68)
    assert dequantize(q, "Q8_0", 64).shape == (0, 64)


def test_f32_is_a_copy(data):
    x, _ = data
    q = quantize(x, "F32")
    assert q.tobytes() == x.tobytes()
    q[0, 0] ^= 0xFF
    assert q.tobytes() != x.tobytes()  # did not alias the input
    assert np.array_equal(dequantize(quantize(x, "F32"), "F32", 512), x)


# --- validation errors
SCREENED_TYPES = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]  # NaN/Inf screen fused into the kernel


@pytest.mark.parametrize("qtype", SCREENED_TYPES + ["Q6_K", "F32"])
def test_nan_row_named(qtype):
    x = np.ones((20, 256), np.float32)
    x[17, 200] = np.nan
    x[19, 0] = np.inf
    with pytest.raises(QuantError, match=r"^row 17 contains NaN$"):
        quantize(x, qtype)


def test_inf_row_named():
    x = np.ones((40, 256), np.float32)
    x[33, 5] = -np.inf
    with pytest.raises(QuantError, match=r"^row 33 contains Inf$"):
        quantize(x, "Q4_K")
    with pytest.raises(QuantError, match=r"^row 0 contains Inf$"):
        quantize(np.full(32, np.inf, np.float32), "Q4_0")


@pytest.mark.parametrize("qtype", SCREENED_TYPES)
def test_nonfinite_found_in_any_kind_of_row(qtype):
    # the fused screens rely on each fast path rejecting rows with a NaN/Inf: try rows that take the fast path
    # (ordinary values) and rows that take the scalar one (subnormal or huge blocks), the bad value anywhere
    rng = np.random.default_rng(5)
    for scale in (1.0, 1e-39, 1e30):
        for kind, value in (("NaN", np.nan), ("Inf", np.inf), ("Inf", -np.inf)):
            x = (rng.standard_normal((12, 96)) * scale).astype(np.float32)
            r, c = int(rng.integers(12)), int(rng.integers(96))
            x[r, c] = value
            with pytest.raises(QuantError, match=rf"^row {r} contains {kind}$"):
                quantize(x, qtype)


@pytest.mark.parametrize("qtype", SCREENED_TYPES)
def test_nonfinite_in_last_row_of_large_matrix(qtype):
    # larger than one check-then-quantize chunk: the row number must count from the start of the tensor
    x = np.zeros((2048, 2048), np.float32)
    x[-1, -1] = np.nan
    with pytest.raises(QuantError, match=r"^row 2047 contains NaN$"):
        quantize(x, qtype)
    x[-1, -1] = 0
    x[1500, 3] = -np.inf
    x[1700, 3] = np.nan
    with pytest.raises(QuantError, match=r"^row 1500 contains Inf$"):
        quantize(x, qtype)


def test_bad_row_length():
    with pytest.raises(QuantError, match=r"^Q4_K needs a row length that is a multiple of 256, got 576$"):
        quantize(np.zeros((2, 576), np.float32), "q4_k")
    with pytest.raises(QuantError, match=r"^Q4_0 needs a row length that is a multiple of 32, got 40$"):
        quantize(np.zeros(40, np.float32), "Q4_0")
    with pytest.raises(QuantError, match=r"^Q8_0 needs a row length that is a multiple of 32, got 100$"):
        dequantize(np.zeros(34 * 4, np.uint8), "Q8_0", 100)


def test_imatrix_validation():
    x = np.ones((2, 64), np.float32)
    with pytest.raises(QuantError, match=r"^imatrix must have one weight per column \(64\), got shape \(32,\)$"):
        quantize(x, "Q4_0", imatrix=np.ones(32, np.float32))
    bad = np.ones(64, np.float32)
    bad[9] = -1
    with pytest.raises(QuantError, match=r"^imatrix weight 9 is -1.0: weights must be finite and non-negative$"):
        quantize(x, "Q4_0", imatrix=bad)
    bad[9] = np.nan
    with pytest.raises(QuantError, match="imatrix weight 9 is nan"):
        quantize(x, "Q5_1", imatrix=bad)


def test_imatrix_ignored_where_llama_cpp_ignores_it(data):
    x, imatrix = data
    for name in ("F16", "BF16", "Q8_0"):
        assert np.array_equal(quantize(x, name, imatrix), quantize(x, name))
    for name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K"):
        assert not np.array_equal(quantize(x, name, imatrix), quantize(x, name)), name


# --- threads
@pytest.mark.parametrize("name", ALL_PRODUCED)
def test_threads_give_identical_bytes(data, name):
    x, imatrix = data
    before = numba.get_num_threads()
    for w in (None, imatrix):
        one = quantize(x, name, w, threads=1)
        assert numba.get_num_threads() == before
        every = quantize(x, name, w, threads=None)
        assert np.array_equal(one, every)
    assert np.array_equal(dequantize(one, name, 512, threads=1), dequantize(one, name, 512))


def test_bad_thread_count(data):
    x, _ = data
    with pytest.raises(QuantError, match="threads must be at least 1, got 0"):
        quantize(x, "Q8_0", threads=0)


# --- dequantize input forms
def test_dequantize_input_forms(data):
    x, _ = data
    q = quantize(x, "Q5_1")
    ref = dequantize(q, "Q5_1", 512)
    assert np.array_equal(dequantize(q.tobytes(), "Q5_1", 512), ref)
    assert np.array_equal(dequantize(bytearray(q.tobytes()), "q5_1", 512), ref)
    assert np.array_equal(dequantize(memoryview(q.tobytes()), GGMLType.Q5_1, 512), ref)
    assert np.array_equal(dequantize(q.reshape(-1), "Q5_1", 512), ref)
    with pytest.raises(QuantError, match=r"^100 bytes of Q5_1 data are not a whole number of rows of 512"):
        dequantize(q.reshape(-1)[:100], "Q5_1", 512)


def test_dequantize_plain_types():
    ints = np.array([[-128, 0, 5, 127]], np.int8)
    assert np.array_equal(dequantize(ints.view(np.uint8), "I8", 4), ints.astype(np.float32))
    i32 = np.array([[-7, 1 << 20]], np.int32)
    assert np.array_equal(dequantize(i32.tobytes(), "I32", 2), i32.astype(np.float32))
    f64 = np.array([[0.5, -2.25, 1e300]])
    assert np.array_equal(dequantize(f64.tobytes(), "F64", 3), np.array([[0.5, -2.25, np.inf]], np.float32))
