"""Fused decompress-and-attend against the float32 reference.

``DecompressAttentionTestBase`` holds the cases; ``DecompressAttentionInterpretTest`` runs them on CPU
through the Pallas interpreter (CI), ``DecompressAttentionGpuTest`` compiles them with Triton and skips
without a GPU. Shapes are small on purpose: the interpreter is slow.
"""

from __future__ import annotations

import dataclasses
import unittest
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.decompress_attention import api, reference
from pallas_kernels.decompress_attention.config import (Config, MosaicConfig, choose_absorption, default_config,
                                                         default_mosaic_config)

# Tolerance on max|got - want| relative to max|want| (and elementwise, see _assert_close), per dtype
# of the values fed to the dots.
TOL = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}


@dataclasses.dataclass(frozen=True)
class Case:
    b: int = 2
    s: int = 37
    k: int = 1  # kv heads
    g: int = 1  # query heads per kv head
    d: int = 64
    latent: int = 48
    latent_v: int | None = None  # value latent width; None = latent
    hidden: int = 0  # 0: linear decoder
    dtype: str = "float32"  # latent dtype, or "int8"
    q_dtype: str = "float32"
    pre_rope: bool = False
    lengths: tuple | None = None  # None: random in [1, S], first = S, last = 1
    config: Config | None = None
    gpu_only: bool = False


CASES = {
    # S = 1: a single slot, every sequence of length 1.
    "s1_d64_k1_g1_linear_f32": Case(b=2, s=1, latent=32),
    # Linear decoders, keys stored after RoPE: both absorbed, scores in latent space; latent 48 padded to 64.
    "d64_k3_g3_linear_latent_f32_splits": Case(k=3, g=3, config=Config(block_s=16, num_splits=3)),
    "d64_k3_g3_linear_latent_bf16": Case(b=3, s=45, k=3, g=3, dtype="bfloat16", q_dtype="bfloat16"),
    # Latent in 5 chunks (a loop) for the scores, several value blocks per (batch, split).
    "d64_k1_g4_linear_latent_chunks_f32": Case(k=1, g=4, latent=80, config=Config(block_s=16, num_splits=2,
                                                                                   block_l=16, block_v=32)),
    # Linear decoder with pre-RoPE keys: keys decoded and rotated on chip, values absorbed.
    "d128_k1_g4_linear_prerope_bf16": Case(s=50, g=4, d=128, latent=64, dtype="bfloat16", q_dtype="bfloat16",
                                          pre_rope=True),
    # Linear decoder, values decoded on chip too (absorb_values=False), 2 kv heads per program, latent in
    # 5 chunks (loaded inside a loop).
    "d64_k2_g3_linear_decoded_f32": Case(k=2, g=3, latent=80, pre_rope=True, config=Config(
        block_s=16, num_splits=2, block_l=16, absorb_values=False, kv_heads_per_program=2)),
    # Nonlinear decoders (Linear-LeakyReLU-Linear). pre_rope: keys decoded and rotated on chip, values
    # attended in the hidden space (last layer absorbed); hidden 40 padded to 64, hidden/latent chunks.
    "d64_k3_g3_mlp_prerope_f32_chunks": Case(k=3, g=3, hidden=40, pre_rope=True, config=Config(
        block_s=16, num_splits=3, block_l=16, block_hidden=16, kv_heads_per_program=3)),
    # ... values decoded on chip too (absorb_values=False), hidden in 2 blocks, latent in 5 chunks (a loop
    # inside the hidden loop).
    "d64_k3_g3_mlp_prerope_decoded_bf16": Case(k=3, g=3, latent=80, hidden=48, dtype="bfloat16",
                                               q_dtype="bfloat16", pre_rope=True, config=Config(
                                                   block_s=16, block_l=16, block_hidden=32, absorb_values=False,
                                                   kv_heads_per_program=3)),
    # No RoPE after decoding: keys and values both in the hidden space, every query head in one program.
    "d64_k1_g4_mlp_fp16": Case(s=33, g=4, hidden=64, dtype="float16", q_dtype="float16"),
    # ... 6 hidden blocks (a loop) for the scores, 4 value blocks (programs) over the hidden space.
    "d64_k2_g2_mlp_absorbed_f32_blocks": Case(k=2, g=2, hidden=96, config=Config(
        block_s=16, num_splits=2, block_hidden=16, block_v=32)),
    "d128_k3_g1_mlp_prerope_bf16": Case(b=3, s=29, k=3, d=128, latent=96, hidden=96, dtype="bfloat16",
                                        q_dtype="bfloat16", pre_rope=True),
    # int8 latents with per-token float16 scale and minimum.
    "d64_k3_g3_linear_latent_int8": Case(k=3, g=3, dtype="int8", lengths=(37, 17)),
    "d128_k3_g1_mlp_prerope_int8": Case(s=29, k=3, d=128, latent=96, hidden=64, dtype="int8", pre_rope=True),
    "d64_k1_g3_mlp_int8_bf16q": Case(g=3, hidden=32, dtype="int8", q_dtype="bfloat16"),
    # Larger caches: many tiles per split, default config; compiled runs only.
    "gpu_long_mlp_prerope_bf16": Case(b=3, s=3001, k=3, g=3, latent=96, hidden=192, dtype="bfloat16",
                                      q_dtype="bfloat16", pre_rope=True, gpu_only=True),
    "gpu_long_linear_latent_bf16": Case(b=4, s=5000, k=3, g=3, latent=96, dtype="bfloat16",
                                        q_dtype="bfloat16", gpu_only=True),
    "gpu_llama_linear_latent_bf16": Case(b=2, s=1500, k=8, g=4, d=128, latent=512, dtype="bfloat16",
                                         q_dtype="bfloat16", gpu_only=True),
}


def _decoder(rng, latent, hidden, width):
    def lin(n_in, n_out, gain=1.0):
        return {"w": jnp.asarray(rng.standard_normal((n_in, n_out)) * (gain / np.sqrt(n_in)), jnp.float32),
                "b": jnp.asarray(0.1 * rng.standard_normal(n_out), jnp.float32)}
    if not hidden:
        return [lin(latent, width)]
    return [lin(latent, hidden), lin(hidden, width, 1.5)]


def _quantize_int8(z):
    """Per-token asymmetric int8 with float16 scale/min (the cache's format), in numpy."""
    zmin = z.min(-1).astype(np.float16)
    scale = ((z.max(-1) - zmin.astype(np.float32)) / 255.0).astype(np.float16)
    s = np.maximum(scale.astype(np.float32), 1e-8)[..., None]
    qz = np.clip(np.round((z - zmin.astype(np.float32)[..., None]) / s), 0, 255) - 128
    return jnp.asarray(qz.astype(np.int8)), jnp.asarray(scale), jnp.asarray(zmin)


def case_lengths(rng, b: int, s: int, given=None):
    """[B] int32 lengths: ``given``, or random in [1, S] with the first S and the last 1 (ragged edges)."""
    if given is not None:
        return np.asarray(given, np.int32)
    lengths = rng.integers(1, s + 1, b).astype(np.int32)
    lengths[0] = s
    if b > 1:
        lengths[-1] = 1
    return lengths


def make_inputs(case: Case, seed: int):
    """Fresh random inputs for ``case``: (q, k_lat, v_lat, lengths, k_dec, v_dec, quant kwargs)."""
    rng = np.random.default_rng(seed)
    h = case.k * case.g
    q = jnp.asarray(rng.standard_normal((case.b, h, case.d)), jnp.float32).astype(case.q_dtype)
    k_dec = _decoder(rng, case.latent, case.hidden, case.k * case.d)
    lv = case.latent_v or case.latent
    v_dec = _decoder(rng, lv, case.hidden, case.k * case.d)
    zk = rng.standard_normal((case.b, case.s, case.latent)).astype(np.float32)
    zv = rng.standard_normal((case.b, case.s, lv)).astype(np.float32)
    lengths = case_lengths(rng, case.b, case.s, case.lengths)
    quant = {}
    if case.dtype == "int8":
        zk, quant["k_scale"], quant["k_min"] = _quantize_int8(zk)
        zv, quant["v_scale"], quant["v_min"] = _quantize_int8(zv)
    else:
        zk, zv = jnp.asarray(zk).astype(case.dtype), jnp.asarray(zv).astype(case.dtype)
    return q, zk, zv, jnp.asarray(lengths), k_dec, v_dec, quant


def _tolerance(case: Case) -> float:
    cdt = case.q_dtype if case.dtype == "int8" else case.dtype
    return TOL[cdt]


def _assert_close(got, want, tol, what=""):
    got = np.asarray(jnp.asarray(got, jnp.float32))
    want = np.asarray(want, np.float32)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.all(np.isfinite(got)), f"{what}: non-finite output"
    scale = max(float(np.abs(want).max()), 1e-6)
    err = float(np.abs(got - want).max())
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol:g} * max|ref| {scale:.3g}"
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale, err_msg=what)


_reference = jax.jit(reference.decompress_attention_reference, static_argnames=("pre_rope", "rope_theta"))


def _seed(name: str) -> int:
    return zlib.crc32(name.encode())


class DecompressAttentionTestBase:
    """Shared cases; subclasses set INTERPRET (True: CPU interpreter, False: compiled on a GPU)."""

    INTERPRET: bool = True

    def _run_case(self, name: str, case: Case):
        if case.gpu_only and self.INTERPRET:
            self.skipTest("long case: compiled runs only")
        q, zk, zv, lengths, k_dec, v_dec, quant = make_inputs(case, _seed(name))
        want = _reference(q, zk, zv, lengths, k_dec, v_dec, pre_rope=case.pre_rope,
                                                        **quant)
        got = api.decompress_attend(q, zk, zv, lengths, k_dec, v_dec, pre_rope=case.pre_rope, **quant,
                                    implementation="pallas", config=case.config, interpret=self.INTERPRET)
        self.assertEqual(got.dtype, q.dtype)
        _assert_close(got, want, _tolerance(case), name)

    def test_xla_decode_then_attend(self):
        for name in ("d64_k3_g3_mlp_prerope_f32_chunks", "d64_k3_g3_linear_latent_bf16",
                     "d128_k3_g1_mlp_prerope_int8"):
            case = CASES[name]
            q, zk, zv, lengths, k_dec, v_dec, quant = make_inputs(case, _seed(name))
            want = _reference(q, zk, zv, lengths, k_dec, v_dec,
                                                            pre_rope=case.pre_rope, **quant)
            got = api.decompress_attend(q, zk, zv, lengths, k_dec, v_dec, pre_rope=case.pre_rope, **quant,
                                        implementation="xla")
            _assert_close(got, want, _tolerance(case), name)

    def test_xla_absorbed(self):
        name = "d64_k3_g3_linear_latent_int8"
        case = CASES[name]
        q, zk, zv, lengths, k_dec, v_dec, quant = make_inputs(case, _seed(name))
        want = _reference(q, zk, zv, lengths, k_dec, v_dec, **quant)
        got = api.decompress_attend(q, zk, zv, lengths, k_dec, v_dec, implementation="xla_absorbed", **quant)
        _assert_close(got, want, _tolerance(case), name)
        prerope = CASES["d128_k1_g4_linear_prerope_bf16"]
        q, zk, zv, lengths, k_dec, v_dec, quant = make_inputs(prerope, 0)
        with self.assertRaisesRegex(ValueError, "pre_rope=True"):
            api.decompress_attend(q, zk, zv, lengths, k_dec, v_dec, pre_rope=True, implementation="xla_absorbed")

    def test_default_implementation_follows_the_measured_crossover(self):
        lin, mlp = [{"w": 0}], [{"w": 0}, {"w": 0}]
        choose = api.choose_implementation
        self.assertEqual(choose(lin, lin, False, 4096, gpu=True), "xla_absorbed")  # Llama-7B-like latents
        self.assertEqual(choose(lin, lin, False, 192, gpu=True), "pallas")  # SmolLM2-like latents, int8
        self.assertEqual(choose(lin, lin, False, 192, gpu=True, mosaic_covers=True), "mosaic")  # ... bf16
        self.assertEqual(choose(lin, lin, False, 4096, gpu=True, mosaic_covers=True), "xla_absorbed")
        self.assertEqual(choose(lin, lin, True, 4096, gpu=True), "pallas")  # keys stored before RoPE
        self.assertEqual(choose(mlp, mlp, False, 4096, gpu=True), "pallas")  # nonlinear decoders
        self.assertEqual(choose(lin, lin, False, 4096, gpu=False), "xla")

    def test_dense_attend(self):
        b, s, kvh, g, d = 2, 50, 2, 3, 64
        rng = np.random.default_rng(_seed("dense"))
        q = jnp.asarray(rng.standard_normal((b, kvh * g, d)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((b, s, kvh, d)), jnp.float32)
        v = jnp.asarray(rng.standard_normal((b, s, kvh, d)), jnp.float32)
        lengths = jnp.asarray([50, 1], jnp.int32)
        want = reference.attention_reference(q, k, v, lengths)
        for impl in ("xla", "pallas"):
            got = api.dense_attend(q, k, v, lengths, implementation=impl, interpret=self.INTERPRET)
            # jax's Triton kernel computes float32 dots in TF32 when compiled, and so does its interpretation
            # on a GPU backend (XLA's default float32 matmul there); only the CPU interpreter is exact.
            tol = 3e-3 if impl == "pallas" and api.on_gpu() else TOL["float32"]
            _assert_close(got, want, tol, f"dense {impl}")

    def test_lengths_mask_garbage(self):
        """Slots past the length must not matter, even when they hold huge values."""
        name = "d64_k3_g3_mlp_prerope_f32_chunks"
        case = CASES[name]
        q, zk, zv, lengths, k_dec, v_dec, quant = make_inputs(case, _seed(name))
        lengths = jnp.asarray([20, 3], jnp.int32)
        garbage = jnp.arange(case.s)[None, :, None] >= lengths[:, None, None]
        zk_bad = jnp.where(garbage, 1e4, zk)
        zv_bad = jnp.where(garbage, -1e4, zv)
        want = _reference(q, zk, zv, lengths, k_dec, v_dec, pre_rope=True)
        got = api.decompress_attend(q, zk_bad, zv_bad, lengths, k_dec, v_dec, pre_rope=True,
                                    implementation="pallas", config=case.config, interpret=self.INTERPRET)
        _assert_close(got, want, TOL["float32"], "masked garbage")


def _add_case_tests(cls, cases=None):
    """One ``test_<name>`` method per case, each calling ``cls._run_case(name, case)``."""
    for name, case in (CASES if cases is None else cases).items():
        def test(self, name=name, case=case):
            self._run_case(name, case)
        test.__name__ = f"test_{name}"
        setattr(cls, test.__name__, test)
    return cls


_add_case_tests(DecompressAttentionTestBase)


class DecompressAttentionInterpretTest(DecompressAttentionTestBase, unittest.TestCase):
    INTERPRET = True


class DecompressAttentionGpuTest(DecompressAttentionTestBase, unittest.TestCase):
    INTERPRET = False

    @classmethod
    def setUpClass(cls):
        if not api.on_gpu():
            raise unittest.SkipTest("needs a GPU")


def lower_for_cuda(case: Case, config: Config | None = None) -> str:
    """Lowers the compiled (non-interpreted) kernel for CUDA on any host and returns the StableHLO text;
    this runs the Pallas -> Triton IR lowering (power-of-two shapes, supported primitives) without a GPU."""
    from jax import export

    from pallas_kernels.decompress_attention import pallas_triton
    sds = jax.ShapeDtypeStruct
    lat_dtype = case.dtype
    q = sds((case.b, case.k * case.g, case.d), case.q_dtype)
    zk = zv = sds((case.b, case.s, case.latent), lat_dtype)
    lengths = sds((case.b,), jnp.int32)

    def dec():
        if not case.hidden:
            return [{"w": sds((case.latent, case.k * case.d), jnp.float32), "b": sds((case.k * case.d,), jnp.float32)}]
        return [{"w": sds((case.latent, case.hidden), jnp.float32), "b": sds((case.hidden,), jnp.float32)},
                {"w": sds((case.hidden, case.k * case.d), jnp.float32), "b": sds((case.k * case.d,), jnp.float32)}]

    k_dec, v_dec = dec(), dec()
    quant = {}
    if case.dtype == "int8":
        quant = {n: sds((case.b, case.s), jnp.float16) for n in ("k_scale", "k_min", "v_scale", "v_min")}
    config = config if config is not None else case.config

    def f(q, zk, zv, lengths, k_dec, v_dec, quant):
        return pallas_triton.decompress_attend(q, zk, zv, lengths, k_dec, v_dec, pre_rope=case.pre_rope,
                                               config=config, interpret=False, **quant)

    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    exported = export.export(jax.jit(f), platforms=["cuda"], disabled_checks=checks)(
        q, zk, zv, lengths, k_dec, v_dec, quant)
    return exported.mlir_module()


class TritonLoweringTest(unittest.TestCase):
    """CPU-only guard for the GPU path: every case, and the benchmark's layers, lower to Triton IR."""

    def test_cases_lower(self):
        for name, case in CASES.items():
            with self.subTest(name):
                self.assertIn("triton", lower_for_cuda(case))

    def test_bench_layers_lower(self):
        shapes = {"smollm2": dict(k=3, g=3, d=64, latent=96), "llama7b": dict(k=32, g=1, d=128, latent=2048)}
        for layer, kw in shapes.items():
            hidden = {"smollm2": 192, "llama7b": 4096}[layer]
            for variant, extra in (("mlp", dict(hidden=hidden, pre_rope=True)), ("linear", {}),
                                   ("linear_rope", dict(pre_rope=True))):
                case = Case(b=2, s=4096, dtype="bfloat16", q_dtype="bfloat16", **kw, **extra)
                with self.subTest(f"{layer}/{variant}"):
                    self.assertIn("triton", lower_for_cuda(case))


# ------------------------------------------------------------------------------------- Mosaic GPU kernel
MOSAIC_CASES = {
    # SmolLM2-like K96/V192 latents, default tiling, ragged lengths (S, random, 1); S not a tile multiple.
    "mosaic_d64_k3_g3_k96_v192_bf16": Case(b=3, s=200, k=3, g=3, latent=96, latent_v=192, dtype="bfloat16",
                                           q_dtype="bfloat16"),
    # Three splits, two value blocks, a two-deep pipeline.
    "mosaic_d64_k1_g4_splits_vblocks_fp16": Case(
        s=300, k=1, g=4, latent=64, latent_v=128, dtype="float16", q_dtype="float16",
        config=MosaicConfig(num_splits=3, block_v=64, max_concurrent_steps=2)),
    # p through shared memory (the interpreter's path) when compiled too.
    "mosaic_d64_k3_g3_p_smem_bf16": Case(s=96, k=3, g=3, latent=96, dtype="bfloat16", q_dtype="bfloat16",
                                         config=MosaicConfig(num_splits=2, p_in_registers=False)),
    # One slot.
    "mosaic_s1_bf16": Case(b=2, s=1, latent=32, dtype="bfloat16", q_dtype="bfloat16"),
    # head_dim 128, 64 query heads (a full wgmma tile of rows), 128-slot tiles, float32 queries.
    "mosaic_d128_k8_g8_bf16": Case(s=130, k=8, g=8, d=128, latent=128, dtype="bfloat16",
                                   config=MosaicConfig(block_s=128, num_splits=2)),
    # Larger caches: many tiles per split, default config; compiled runs only.
    "gpu_mosaic_long_k96_v96_bf16": Case(b=4, s=5000, k=3, g=3, latent=96, dtype="bfloat16", q_dtype="bfloat16",
                                         gpu_only=True),
    "gpu_mosaic_d128_k8_g4_k224_bf16": Case(b=2, s=3001, k=8, g=4, d=128, latent=224, dtype="bfloat16",
                                            q_dtype="bfloat16", gpu_only=True),
}


def _mosaic_interpreter():
    from pallas_kernels.decompress_attention import pallas_mosaic
    return pallas_mosaic.interpret_params()


class MosaicTestBase:
    """The Mosaic GPU kernel against the reference; subclasses set INTERPRET."""

    INTERPRET: bool = True

    def _run_case(self, name: str, case: Case, garbage: bool = False):
        if case.gpu_only and self.INTERPRET:
            self.skipTest("long case: compiled runs only")
        q, zk, zv, lengths, k_dec, v_dec, _ = make_inputs(case, _seed(name))
        want = _reference(q, zk, zv, lengths, k_dec, v_dec)
        if garbage:  # slots past the length hold huge values: they must not matter
            past = jnp.arange(case.s)[None, :, None] >= lengths[:, None, None]
            zk, zv = jnp.where(past, 3e4, zk).astype(zk.dtype), jnp.where(past, -3e4, zv).astype(zv.dtype)
        got = api.decompress_attend(q, zk, zv, lengths, k_dec, v_dec, implementation="mosaic", config=case.config,
                                    interpret=self.INTERPRET)
        self.assertEqual(got.dtype, q.dtype)
        _assert_close(got, want, _tolerance(case), name)

    def test_lengths_mask_garbage(self):
        name = "mosaic_d64_k1_g4_splits_vblocks_fp16"
        self._run_case(name, dataclasses.replace(MOSAIC_CASES[name], lengths=(300, 70)), garbage=True)

    def test_refuses_what_it_does_not_cover(self):
        q, zk, zv, lengths, k_dec, v_dec, quant = make_inputs(CASES["d64_k3_g3_linear_latent_int8"], 0)
        with self.assertRaisesRegex(ValueError, "bf16/fp16 latents, k_lat is int8"):
            api.decompress_attend(q, zk, zv, lengths, k_dec, v_dec, **quant, implementation="mosaic")
        q, zk, zv, lengths, k_dec, v_dec, _ = make_inputs(CASES["d64_k1_g4_mlp_fp16"], 0)
        with self.assertRaisesRegex(ValueError, "linear decoders"):
            api.decompress_attend(q, zk, zv, lengths, k_dec, v_dec, implementation="mosaic")
        q, zk, zv, lengths, k_dec, v_dec, _ = make_inputs(CASES["d128_k1_g4_linear_prerope_bf16"], 0)
        with self.assertRaisesRegex(ValueError, "pre_rope"):
            api.decompress_attend(q, zk, zv, lengths, k_dec, v_dec, pre_rope=True, implementation="mosaic")
        q, zk, zv, lengths, k_dec, v_dec, _ = make_inputs(MOSAIC_CASES["mosaic_s1_bf16"], 0)
        with self.assertRaisesRegex(ValueError, "takes a MosaicConfig"):
            api.decompress_attend(q, zk, zv, lengths, k_dec, v_dec, implementation="mosaic", config=Config())
        wide = Case(b=1, s=8, k=1, g=1, latent=1024, dtype="bfloat16", q_dtype="bfloat16")
        q, zk, zv, lengths, k_dec, v_dec, _ = make_inputs(wide, 0)
        with self.assertRaisesRegex(ValueError, "shared memory"):
            api.decompress_attend(q, zk, zv, lengths, k_dec, v_dec, implementation="mosaic",
                                  config=MosaicConfig(block_v=256), interpret=self.INTERPRET)


_add_case_tests(MosaicTestBase, MOSAIC_CASES)


class MosaicInterpretTest(MosaicTestBase, unittest.TestCase):
    INTERPRET = True

    @classmethod
    def setUpClass(cls):
        if _mosaic_interpreter() is None:
            raise unittest.SkipTest("this jax has no Mosaic GPU interpreter (jax._src.pallas.mosaic_gpu.interpret)")


class MosaicGpuTest(MosaicTestBase, unittest.TestCase):
    INTERPRET = False

    @classmethod
    def setUpClass(cls):
        if not api.on_gpu():
            raise unittest.SkipTest("needs a GPU")


class MosaicLoweringTest(unittest.TestCase):
    """CPU-only guard for the compiled Mosaic path: each case, and the benchmark's SmolLM2 layer, lower through
    Pallas's Mosaic GPU lowering (layouts, wgmma and TMA shapes) to a Mosaic GPU custom call."""

    def _lower(self, case: Case) -> str:
        from jax import export

        sds = jax.ShapeDtypeStruct
        lv = case.latent_v or case.latent
        args = (sds((case.b, case.k * case.g, case.d), case.q_dtype), sds((case.b, case.s, case.latent), case.dtype),
                sds((case.b, case.s, lv), case.dtype), sds((case.b,), jnp.int32),
                [{"w": sds((case.latent, case.k * case.d), jnp.float32), "b": sds((case.k * case.d,), jnp.float32)}],
                [{"w": sds((lv, case.k * case.d), jnp.float32), "b": sds((case.k * case.d,), jnp.float32)}])

        def f(q, zk, zv, lengths, k_dec, v_dec):
            return api.decompress_attend(q, zk, zv, lengths, k_dec, v_dec, implementation="mosaic",
                                         config=case.config, interpret=False)

        return export.export(jax.jit(f), platforms=["cuda"])(*args).mlir_module()

    def test_cases_lower(self):
        cases = dict(MOSAIC_CASES, bench_smollm2=Case(b=8, s=4096, k=3, g=3, latent=96, dtype="bfloat16",
                                                      q_dtype="bfloat16"))
        for name, case in cases.items():
            with self.subTest(name):
                self.assertIn("mosaic_gpu", self._lower(case))


class ConfigTest(unittest.TestCase):
    def test_mosaic_config(self):
        for bad in (dict(block_s=32), dict(num_splits=0), dict(max_concurrent_steps=0), dict(block_v=48),
                    dict(block_v=512)):
            with self.assertRaises(ValueError, msg=str(bad)):
                MosaicConfig(**bad)
        with self.assertRaisesRegex(ValueError, "must divide the value latent width 96"):
            MosaicConfig(block_v=64).check(latent_k=96, latent_v=96)
        small, big = default_mosaic_config(1, 4096, latent_k=96, latent_v=96), default_mosaic_config(
            128, 4096, latent_k=96, latent_v=96)
        self.assertGreater(small.num_splits, big.num_splits)  # few sequences: split S to fill the GPU
        self.assertEqual(small.block_v, 96)
        wide = default_mosaic_config(8, 4096, latent_k=224, latent_v=224)
        self.assertLessEqual(wide.smem_bytes(latent_k=224, latent_v=224), 227 * 1024)  # shallower, but fits
        self.assertEqual(default_mosaic_config(8, 4096, latent_k=96, latent_v=384).block_v, 192)


    def test_validates(self):
        for bad in (dict(block_s=24), dict(block_s=8), dict(num_splits=0), dict(num_warps=3),
                    dict(block_l=48), dict(kv_heads_per_program=0)):
            with self.assertRaises(ValueError, msg=str(bad)):
                Config(**bad)
        self.assertEqual(Config(block_s=32).replace(num_splits=4).num_splits, 4)
        with self.assertRaises(dataclasses.FrozenInstanceError):
            Config().block_s = 32  # type: ignore[misc]

    def test_default_config(self):
        smol = dict(num_kv_heads=3, latent_k=96, latent_v=96, hidden_k=192, hidden_v=192, pre_rope=True)
        small, big = default_config(1, 4096, **smol), default_config(128, 4096, **smol)
        self.assertGreater(small.num_splits, big.num_splits)  # few sequences: split S to fill the GPU
        self.assertEqual(small.kv_heads_per_program, 3)  # keys decoded: shared hidden layer computed once
        self.assertTrue(small.absorb_values)
        lin = default_config(8, 1024, num_kv_heads=32, latent_k=2048, latent_v=2048)
        self.assertTrue(lin.absorb_values)
        self.assertLessEqual(lin.block_v, 512)  # the accumulator [H, block_v] stays in registers
        self.assertEqual(default_config(4, 1).num_splits, 1)

    def test_choose_absorption(self):
        kw = dict(k_layers=2, v_layers=2, hidden_k=192, hidden_v=192)
        self.assertEqual(choose_absorption(**kw, pre_rope=False), (True, True))
        self.assertEqual(choose_absorption(**kw, pre_rope=True), (False, True))  # RoPE blocks key absorption
        self.assertEqual(choose_absorption(**kw, pre_rope=False, absorb_values=False), (False, False))
        wide = dict(k_layers=2, v_layers=2, hidden_k=4096, hidden_v=4096)
        self.assertEqual(choose_absorption(**wide, pre_rope=False), (False, False))
        self.assertEqual(choose_absorption(k_layers=1, v_layers=1, hidden_k=0, hidden_v=0, pre_rope=False),
                         (True, True))


if __name__ == "__main__":
    unittest.main()
