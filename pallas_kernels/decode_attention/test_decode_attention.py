"""Dense decode attention (head-major cache) against the float32 reference: interpreted on CPU (CI),
compiled on a GPU (skipped without one), and lowered to Triton IR on any host."""

from __future__ import annotations

import dataclasses
import unittest

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.decode_attention import api, reference
from pallas_kernels.decode_attention.config import DecodeConfig, default_config
from pallas_kernels.decompress_attention.api import on_gpu
from pallas_kernels.decompress_attention.test_decompress_attention import (TOL, _add_case_tests, _assert_close,
                                                                          _seed, case_lengths)


@dataclasses.dataclass(frozen=True)
class Case:
    b: int = 2
    s: int = 37
    k: int = 1
    g: int = 1
    d: int = 64
    dtype: str = "float32"
    lengths: tuple | None = None  # None: random in [1, S], first = S, last = 1
    config: DecodeConfig | None = None
    gpu_only: bool = False


CASES = {
    "s1_d64_k1_g1": Case(s=1),
    "d64_k3_g3_splits_ragged": Case(b=3, k=3, g=3, config=DecodeConfig(block_s=16, num_splits=3)),
    "d64_k3_g3_bf16_default": Case(b=3, s=45, k=3, g=3, dtype="bfloat16"),
    "d128_k1_g4_fp16": Case(s=50, g=4, d=128, dtype="float16", config=DecodeConfig(block_s=32, num_splits=2)),
    "d128_k2_g1_f32_one_split": Case(s=33, k=2, d=128, lengths=(33, 17), config=DecodeConfig(block_s=16)),
    "d64_k2_g8_more_splits_than_tiles": Case(s=20, k=2, g=8, config=DecodeConfig(block_s=16, num_splits=4)),
    "gpu_long_bf16": Case(b=4, s=3001, k=3, g=3, dtype="bfloat16", gpu_only=True),
    "gpu_llama_bf16": Case(b=2, s=1500, k=8, g=4, d=128, dtype="bfloat16", gpu_only=True),
}


def make_inputs(case: Case, seed: int):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((case.b, case.k * case.g, case.d)), jnp.float32).astype(case.dtype)
    k = jnp.asarray(rng.standard_normal((case.b, case.k, case.s, case.d)), jnp.float32).astype(case.dtype)
    v = jnp.asarray(rng.standard_normal((case.b, case.k, case.s, case.d)), jnp.float32).astype(case.dtype)
    return q, k, v, jnp.asarray(case_lengths(rng, case.b, case.s, case.lengths))


_reference = jax.jit(reference.decode_attention_reference)


class DecodeAttentionTestBase:
    INTERPRET: bool = True

    def _run_case(self, name, case):
        if case.gpu_only and self.INTERPRET:
            self.skipTest("long case: compiled runs only")
        q, k, v, lengths = make_inputs(case, _seed(name))
        want = _reference(q, k, v, lengths)
        got = api.decode_attend(q, k, v, lengths, implementation="pallas", config=case.config,
                                interpret=self.INTERPRET)
        self.assertEqual(got.dtype, q.dtype)
        # compiled Triton float32 dots run in TF32
        tol = 3e-3 if case.dtype == "float32" and not self.INTERPRET else TOL[case.dtype]
        _assert_close(got, want, tol, name)

    def test_xla(self):
        for name in ("d64_k3_g3_splits_ragged", "d64_k3_g3_bf16_default"):
            case = CASES[name]
            q, k, v, lengths = make_inputs(case, _seed(name))
            got = api.decode_attend(q, k, v, lengths, implementation="xla")
            _assert_close(got, _reference(q, k, v, lengths), TOL[case.dtype], name)

    def test_slots_past_length_are_never_read(self):
        name = "d64_k3_g3_splits_ragged"
        case = CASES[name]
        q, k, v, _ = make_inputs(case, _seed(name))
        lengths = jnp.asarray([20, 3, 37], jnp.int32)
        garbage = (jnp.arange(case.s)[None, :] >= lengths[:, None])[:, None, :, None]
        want = _reference(q, k, v, lengths)
        got = api.decode_attend(q, jnp.where(garbage, 1e4, k), jnp.where(garbage, jnp.nan, v), lengths,
                                implementation="pallas", config=case.config, interpret=self.INTERPRET)
        _assert_close(got, want, 3e-3 if not self.INTERPRET else TOL["float32"], "masked garbage")


_add_case_tests(DecodeAttentionTestBase, CASES)


class DecodeAttentionInterpretTest(DecodeAttentionTestBase, unittest.TestCase):
    INTERPRET = True


class DecodeAttentionGpuTest(DecodeAttentionTestBase, unittest.TestCase):
    INTERPRET = False

    @classmethod
    def setUpClass(cls):
        if not on_gpu():
            raise unittest.SkipTest("needs a GPU")


class DecodeAttentionLoweringTest(unittest.TestCase):
    """CPU guard for the GPU path: the compiled kernel lowers to Triton IR at the model's shapes."""

    def test_lowers(self):
        from jax import export

        from pallas_kernels.decode_attention import pallas_triton
        sds = jax.ShapeDtypeStruct
        for b, kvh, g, s, d in ((64, 3, 3, 2048, 64), (1, 8, 4, 4099, 128)):
            args = (sds((b, kvh * g, d), jnp.bfloat16), sds((b, kvh, s, d), jnp.bfloat16),
                    sds((b, kvh, s, d), jnp.bfloat16), sds((b,), jnp.int32))
            exported = export.export(jax.jit(lambda *a: pallas_triton.decode_attend(*a, interpret=False)),
                                     platforms=["cuda"],
                                     disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
            self.assertIn("triton", exported.mlir_module())


class DecodeConfigTest(unittest.TestCase):
    def test_validates(self):
        for bad in (dict(block_s=24), dict(block_s=8), dict(num_splits=0), dict(num_warps=3), dict(num_stages=0)):
            with self.assertRaises(ValueError, msg=str(bad)):
                DecodeConfig(**bad)

    def test_default_splits_fill_the_machine(self):
        few, many = default_config(1, 3, 4096), default_config(256, 3, 4096)
        self.assertGreater(few.num_splits, many.num_splits)
        self.assertEqual(default_config(4, 3, 1).num_splits, 1)

    def test_bad_shapes(self):
        q = jnp.zeros((2, 6, 64))
        with self.assertRaisesRegex(ValueError, r"\[B, K, S, D\]"):
            api.decode_attend(q, jnp.zeros((2, 10, 3, 64)), jnp.zeros((2, 10, 3, 32)), jnp.ones(2, jnp.int32))


if __name__ == "__main__":
    unittest.main()
