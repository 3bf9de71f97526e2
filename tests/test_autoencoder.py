"""KV-CAR autoencoders: the compressed cache, folding, int8 latents, training, checkpoints."""

import dataclasses
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY, decode_tokens, prefill_then_decode
from kvjax.cache import Dense
from kvjax.cache.autoencoder import Autoencoder
from kvjax.checkpoints import LoadedModel
from kvjax.compressors import CompressorError, load_compressor, save_compressor
from kvjax.compressors.autoencoder import (Coder, apply_coder, dequantize_int8, fold_variables,
                                           init_layer_variables, quantize_int8)
from kvjax.generate import prefill
from kvjax.models import init_params
from train.autoencoder import TrainConfig, Trainer, split_windows, windows_from_ids


def random_mparams(cfg, latent, hidden=0, layers=None, seed=0):
    layers = range(cfg.n_layers) if layers is None else layers
    keys = jax.random.split(jax.random.PRNGKey(seed), cfg.n_layers)
    variables = {str(l): init_layer_variables(keys[l], cfg.kv_width, latent, hidden) for l in layers}
    return fold_variables(variables)


@pytest.mark.parametrize("latent_dtype,hidden", [("", 0), ("bfloat16", 12), ("int8", 0), ("int4", 0), ("int2", 0)])
def test_nbytes_shrinks_by_the_configured_ratio(tiny, latent_dtype, hidden):
    cfg, _ = tiny
    latent = cfg.kv_width // 2
    m = Autoencoder(latent=latent, hidden=hidden, latent_dtype=latent_dtype)
    mp = random_mparams(cfg, latent, hidden)
    cache = m.init(cfg, 2, 24, mp)
    dense = Dense().init(cfg, 2, 24)
    assert cache.nbytes == m.bytes_per_token(cfg) * 2 * 24
    per_layer = {"": 4 * latent, "bfloat16": 2 * latent, "int8": latent + 4, "int4": latent // 2 + 4,
                 "int2": latent // 4 + 4}[latent_dtype] * 2
    assert cache.nbytes == per_layer * cfg.n_layers * 2 * 24
    if latent_dtype == "":
        assert cache.nbytes * 2 == dense.nbytes  # exactly half at latent = K*D/2
    # only chosen layers shrink
    m2 = Autoencoder(latent=latent, layers=(1,), latent_dtype=latent_dtype)
    c2 = m2.init(cfg, 2, 24, random_mparams(cfg, latent, layers=[1]))
    assert c2.nbytes == dense.nbytes // cfg.n_layers * (cfg.n_layers - 1) + per_layer * 2 * 24


@dataclasses.dataclass(frozen=True)
class ExplicitReconstruction(Dense):
    """Dense storage of explicitly reconstructed K/V (the specification the compressed cache must meet)."""
    name = "explicit"

    def write_layer(self, params, cfg, state, layer, k, v, positions, starts):
        b, t = k.shape[:2]
        p = params[str(layer)]
        k = apply_coder(p["k_dec"], apply_coder(p["k_enc"], k.reshape(b, t, -1))).reshape(k.shape)
        v = apply_coder(p["v_dec"], apply_coder(p["v_enc"], v.reshape(b, t, -1))).reshape(v.shape)
        return super().write_layer(params, cfg, state, layer, k, v, positions, starts)


@pytest.mark.parametrize("hidden", [0, 12])
def test_compressed_cache_equals_attention_over_reconstructed_kv(tiny, hidden):
    cfg, params = tiny
    mp = random_mparams(cfg, 6, hidden)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 10), 0, cfg.vocab_size)
    m = Autoencoder(latent=6, hidden=hidden)
    got, _ = prefill(params, cfg, tokens, m.init(cfg, 2, 16, mp), method=m, mparams=mp, all_logits=True)
    ref_m = ExplicitReconstruction()
    want, _ = prefill(params, cfg, tokens, ref_m.init(cfg, 2, 16), method=ref_m, mparams=mp, all_logits=True)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    dense, _ = prefill(params, cfg, tokens, Dense().init(cfg, 2, 16), all_logits=True)
    assert float(jnp.abs(got - dense).max()) > 1e-3  # the compression is really in the path


@pytest.mark.parametrize("latent_dtype", ["", "int8", "int4", "int2"])
def test_prefill_equals_decode_through_compressed_cache(tiny, latent_dtype):
    cfg, params = tiny
    latent = 8 if latent_dtype == "int2" else 6
    mp = random_mparams(cfg, latent)
    m = Autoencoder(latent=latent, latent_dtype=latent_dtype, layers=(0, 2),
                    latent_group={"int4": 2, "int2": 4}.get(latent_dtype, 0))
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 8), 0, cfg.vocab_size)
    full, _ = prefill(params, cfg, tokens, m.init(cfg, 2, 8, mp), method=m, mparams=mp, all_logits=True)
    steps, _ = decode_tokens(params, cfg, tokens, m.init(cfg, 2, 8, mp), m, mp)
    np.testing.assert_allclose(steps, full, atol=1e-4, rtol=1e-4)


def test_pre_rope_keys_are_rotated_after_decoding():
    """With an identity autoencoder, pre- and post-RoPE compression both equal the dense model."""
    cfg = TINY["llama"]
    params = init_params(cfg, jax.random.PRNGKey(0), scale=0.3)
    eye = [{"w": jnp.eye(cfg.kv_width), "b": jnp.zeros(cfg.kv_width)}]
    mp = {str(l): {"k_enc": eye, "k_dec": eye, "v_enc": eye, "v_dec": eye} for l in range(cfg.n_layers)}
    tokens = jax.random.randint(jax.random.PRNGKey(3), (1, 9), 0, cfg.vocab_size)
    dense, _ = prefill(params, cfg, tokens, Dense().init(cfg, 1, 9), all_logits=True)
    for pre in (True, False):
        m = Autoencoder(latent=cfg.kv_width, pre_rope=pre)
        got, _ = prefill(params, cfg, tokens, m.init(cfg, 1, 9, mp), method=m, mparams=mp, all_logits=True)
        np.testing.assert_allclose(got, dense, atol=1e-5)


def test_batchnorm_folds_exactly():
    var = init_layer_variables(jax.random.PRNGKey(0), 16, 8, 12)
    # give BatchNorm non-trivial statistics and affine parameters
    var = jax.tree_util.tree_map(lambda x: x, var)
    for part in ("k_enc", "k_dec"):
        var["batch_stats"][part]["bn_0"] = {"mean": jnp.linspace(-1, 1, 12), "var": jnp.linspace(0.5, 2, 12)}
        var["params"][part]["bn_0"] = {"scale": jnp.linspace(0.5, 1.5, 12), "bias": jnp.linspace(-0.3, 0.3, 12)}
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 16))
    enc = {"params": var["params"]["k_enc"], "batch_stats": var["batch_stats"]["k_enc"]}
    want = Coder((12, 8)).apply(enc, x, train=False)
    folded = fold_variables({"0": var})["0"]
    np.testing.assert_allclose(apply_coder(folded["k_enc"], x), want, atol=1e-5)


@pytest.mark.parametrize("latent_dtype,bits", [("int4", 4), ("int2", 2)])
def test_packed_latents_are_within_half_a_step_and_refuse_bad_groups(latent_dtype, bits):
    cfg = TINY["llama"]
    mp = random_mparams(cfg, 8)
    m = Autoencoder(latent=8, latent_dtype=latent_dtype, latent_group=4)
    k = jax.random.normal(jax.random.PRNGKey(0), (2, 5, cfg.n_kv_heads, cfg.head_dim))
    pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
    st = m.write_layer(mp, cfg, m.init(cfg, 2, 5, mp).layers[0], 0, k, k, pos, pos[:, 0])
    assert st["k"].dtype == jnp.uint8 and st["k"].shape == (2, 5, 8 * bits // 8) and st["k_scale"].shape == (2, 5, 2)
    zk, _ = m.latents(st)
    z = apply_coder(mp["0"]["k_enc"], k.reshape(2, 5, -1))
    np.testing.assert_array_equal(zk, m.round_trip(z))  # what training and the reuse fits see is what is stored
    z = z.reshape(2, 5, 2, 4)
    step = (z.max(-1) - z.min(-1)) / (2 ** bits - 1)
    err = jnp.abs(zk.reshape(z.shape) - z) / step[..., None]
    assert float(jnp.max(err)) <= 0.55 and float(jnp.mean(err)) > 0.05  # really quantized, to the right step
    with pytest.raises(ValueError, match="latent_group=3"):
        Autoencoder(latent=8, latent_dtype=latent_dtype, latent_group=3).init(cfg, 1, 4, mp)
    with pytest.raises(ValueError, match="int4 or int2 only"):
        Autoencoder(latent=8, latent_dtype="int8", latent_group=4)


def test_int8_latents_round_trip():
    z = jax.random.normal(jax.random.PRNGKey(0), (3, 7, 48)) * 5
    q, scale, zmin = quantize_int8(z)
    assert q.dtype == jnp.int8 and scale.dtype == jnp.float16 and scale.shape == (3, 7)
    err = jnp.abs(dequantize_int8(q, scale, zmin) - z)
    step = (z.max(-1) - z.min(-1)) / 255
    assert float(jnp.max(err / step[..., None])) <= 0.55  # half a step, plus fp16 rounding of scale/min


# ------------------------------------------------------------------------------------------- training
def tiny_model():
    cfg = TINY["llama"]
    return LoadedModel(cfg=cfg, params=init_params(cfg, jax.random.PRNGKey(0), scale=0.3), tokenizer=None,
                       source="tiny", sha256="f" * 64)


def tiny_windows():
    rng = np.random.default_rng(0)
    ids = (np.arange(8000) * 7 % 97 + rng.integers(0, 3, 8000)) % 97
    return split_windows(windows_from_ids(ids, 32), 8)


def run(out, **kw):
    tc = TrainConfig(**{"latent": 6, "steps1": 4, "steps2": 12, "batch": 4, "context": 32, "eval_every": 8,
                        "save_every": 4, "init": "random", "lr": 3e-3, "lr2": 3e-3, **kw})
    tr, ev = tiny_windows()
    return Trainer(tiny_model(), tr, ev, tc, str(out), progress=False)


def test_training_lowers_reconstruction_loss_and_ce(tmp_path):
    trainer = run(tmp_path / "a", steps1=15, steps2=30, lr=1e-2, l1_weight=10.0)
    method, mp, hist = trainer.run()
    for layer in range(3):  # stage 1: each layer's own reconstruction error falls while it is trained
        l1 = [h["l1"] for h in hist if h["stage"] == 1 and (h["step"] - 1) // 15 == layer]
        assert np.mean(l1[-4:]) < 0.9 * np.mean(l1[:4]), (layer, l1)
    evals = [h for h in hist if "eval_ppl" in h]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 75
    # held-back cross-entropy through the real compressed cache falls from the initialisation
    assert evals[-1]["eval_ppl"] < 0.97 * evals[0]["eval_ppl"]
    # the written compressor loads and reproduces the trained parameters exactly
    m2, mp2 = load_compressor(str(tmp_path / "a" / "compressor"), tiny_model())
    assert m2 == method
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), mp, mp2)


def test_resume_equals_uninterrupted_run(tmp_path):
    full = run(tmp_path / "full")
    _, mp_full, _ = full.run()
    part = run(tmp_path / "part")
    part.run(stop_after=16)  # as if interrupted after step 16
    resumed = run(tmp_path / "part")
    _, mp_res, hist = resumed.run(resume=True)
    assert hist[0]["step"] == 17
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6),
                           mp_full, mp_res)
    with pytest.raises(FileExistsError, match="--resume"):
        run(tmp_path / "part").run(resume=False)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    trainer = run(tmp_path / "nan", lr=1e30, save_every=1)
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        trainer.run()
    from train.checkpoint import CheckpointStore
    store = CheckpointStore(str(tmp_path / "nan" / "ckpt"), trainer.record())
    step = store.latest_step()
    assert step is not None
    restored = run(tmp_path / "nan", lr=1e30, save_every=1)
    template = restored.init_variables_abstract()
    tx = restored.optimizer(1, {l: v["params"] for l, v in template.items()})
    variables, _ = store.restore(step, template, tx.init({l: v["params"] for l, v in template.items()}))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(variables))


def test_compressor_for_another_model_is_refused(tmp_path):
    model = tiny_model()
    cfg = model.cfg
    mp = random_mparams(cfg, 6)
    path = save_compressor(str(tmp_path / "c"), Autoencoder(latent=6), mp, model)
    other = LoadedModel(cfg=dataclasses.replace(cfg, n_layers=2), params=None, tokenizer=None, source="x", sha256="")
    with pytest.raises(CompressorError, match="n_layers=3"):
        load_compressor(path, other)
    with pytest.raises(CompressorError, match="sha256"):
        load_compressor(path, dataclasses.replace(model, sha256="0" * 64))
    # a damaged checkpoint: truncate every array file
    for root, _, files in os.walk(os.path.join(path, "params")):
        for f in files:
            if not f.endswith(".json") and "METADATA" not in f:
                open(os.path.join(root, f), "wb").close()
    with pytest.raises(CompressorError, match="cannot restore"):
        load_compressor(path, model)
    shutil.rmtree(path)
    with pytest.raises(CompressorError, match="no such compressor"):
        load_compressor(path, model)


def test_method_refuses_missing_or_mismatched_params(tiny):
    cfg, _ = tiny
    with pytest.raises(ValueError, match="needs trained compressor parameters"):
        Autoencoder().init(cfg, 1, 8)
    with pytest.raises(ValueError, match="no autoencoder for layer 2"):
        Autoencoder(latent=6).init(cfg, 1, 8, random_mparams(cfg, 6, layers=[0, 1]))
    with pytest.raises(ValueError, match="latent 8"):
        Autoencoder(latent=8).init(cfg, 1, 8, random_mparams(cfg, 6))
    with pytest.raises(ValueError, match="out of range"):
        Autoencoder(latent=6, layers=(7,)).init(cfg, 1, 8, random_mparams(cfg, 6))


@pytest.mark.parametrize("latent_dtype", ["", "int8"])
def test_decode_through_fused_kernel_equals_xla_path(latent_dtype):
    """The model's decode step with the Pallas kernel (interpreted on CPU) equals decode-then-attend."""
    cfg = dataclasses.replace(TINY["llama"], d_model=64, n_heads=4, n_kv_heads=2, head_dim=32, n_layers=2)
    params = init_params(cfg, jax.random.PRNGKey(0), scale=0.2)
    mp = random_mparams(cfg, 24)
    tokens = jax.random.randint(jax.random.PRNGKey(5), (2, 5), 0, cfg.vocab_size)
    outs = {}
    for kernel in ("xla", "pallas"):
        outs[kernel] = prefill_then_decode(params, cfg, tokens, Autoencoder(latent=24, latent_dtype=latent_dtype, kernel=kernel), mp)
    # Compiled on a GPU, the Triton kernel's float32 dots (and XLA's) run in TF32: logits then differ by ~1e-3
    # of their scale (measured on the H100: 6.5e-3 at a scale of ~4); on CPU both paths are exact float32.
    tol = 5e-3 if jax.default_backend() == "gpu" else 2e-4
    np.testing.assert_allclose(outs["pallas"], outs["xla"], atol=tol * np.abs(outs["xla"]).max(), rtol=tol)
    if jax.default_backend() == "cpu":
        assert not Autoencoder(kernel="auto").use_kernel()  # CPU: the XLA path by default


def test_decode_through_mosaic_kernel_equals_xla_path():
    """kernel="mosaic" (the Mosaic GPU kernel, run by jax's Mosaic GPU interpreter on CPU): linear coders,
    keys stored after RoPE, bf16 latents; the decode logits match decode-then-attend within bf16 rounding."""
    from pallas_kernels.decompress_attention import pallas_mosaic
    if pallas_mosaic.interpret_params() is None:
        pytest.skip("this jax has no Mosaic GPU interpreter")
    cfg = dataclasses.replace(TINY["llama"], d_model=64, n_heads=4, n_kv_heads=2, head_dim=32, n_layers=2)
    params = init_params(cfg, jax.random.PRNGKey(0), scale=0.2)
    mp = random_mparams(cfg, 32)
    tokens = jax.random.randint(jax.random.PRNGKey(5), (2, 5), 0, cfg.vocab_size)
    outs = {k: prefill_then_decode(params, cfg, tokens, Autoencoder(latent=32, latent_dtype="bfloat16", pre_rope=False,
                                                                    kernel=k), mp) for k in ("xla", "mosaic")}
    scale = np.abs(outs["xla"]).max()
    assert np.abs(outs["mosaic"] - outs["xla"]).max() < 2e-2 * scale
    with pytest.raises(ValueError, match="keys stored after RoPE"):  # what it does not cover is refused
        prefill_then_decode(params, cfg, tokens, Autoencoder(latent=32, latent_dtype="bfloat16", kernel="mosaic"), mp)


def test_sensitivity_sweep_and_plan():
    from eval.sensitivity import sweep

    model = tiny_model()
    cfg = model.cfg
    eye = [{"w": jnp.eye(cfg.kv_width), "b": jnp.zeros(cfg.kv_width)}]
    mp = random_mparams(cfg, cfg.kv_width)
    mp["1"] = {"k_enc": eye, "k_dec": eye, "v_enc": eye, "v_dec": eye}  # layer 1 is lossless
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, 32 * 4)
    res = sweep(model, Autoencoder(latent=cfg.kv_width), mp, ids, context=32, batch=4, progress=False)
    inc = {r["layer"]: r["increase"] for r in res["layers"]}
    assert abs(inc[1]) < 1e-5 and abs(inc[0]) > 1e-3 and abs(inc[2]) > 1e-3
    assert res["plan"][0]["layers"] == [min(inc, key=inc.get)]  # cheapest first
    assert [len(p["layers"]) for p in res["plan"]] == [1, 2, 3]
    assert res["plan"][-1]["kv_saved"] == 0.0  # full-width latents in float32 save nothing


def test_pca_init_at_full_width_is_lossless(tmp_path):
    """PCA over calibration K (pre-RoPE) and V with every component kept reconstructs exactly."""
    trainer = run(tmp_path / "pca", init="pca", latent=TINY["llama"].kv_width)
    res = trainer.evaluate(trainer.init_variables())
    assert abs(res["eval_ppl"] / res["eval_ppl_dense"] - 1) < 1e-4
    half = run(tmp_path / "pca2", init="pca", latent=TINY["llama"].kv_width // 4)
    res2 = half.evaluate(half.init_variables())
    assert abs(res2["eval_ppl"] / res2["eval_ppl_dense"] - 1) > 1e-3  # truncation is really in the path


def test_quantization_aware_training_sees_the_stored_int2_latents(tmp_path):
    """Stage 2 with latent_dtype int2 trains through exactly what the int2 cache stores (the logits of the
    training forward equal those of the folded compressor through the real cache), and the run writes an
    int2 compressor."""
    from kvjax.models.transformer import forward

    trainer = run(tmp_path / "q", latent=8, latent_dtype="int2", latent_group=4, steps1=0, steps2=6)
    cfg, variables = trainer.cfg, trainer.init_variables()
    tokens = jnp.asarray(trainer.train_windows[:2])
    mp = {"vars": variables, "active": jnp.ones((cfg.n_layers,), jnp.float32)}
    logits = {}
    for name, m in (("qat", trainer.quant_method), ("float", trainer.train_method)):
        logits[name], _ = forward(trainer.params, cfg, tokens, m.init(cfg, 2, tokens.shape[1]), m, mp)
    m, folded = trainer.tc.method(), fold_variables(variables)
    cache_logits, _ = forward(trainer.params, cfg, tokens, m.init(cfg, 2, tokens.shape[1], folded), m, folded)
    np.testing.assert_allclose(logits["qat"], cache_logits, atol=1e-4, rtol=1e-4)
    assert float(jnp.abs(logits["float"] - cache_logits).max()) > 1e-2  # 2-bit rounding is really in the path
    method, mp2, hist = trainer.run()
    assert (method.latent_dtype, method.latent_group) == ("int2", 4)
    assert all(np.isfinite(h["loss"]) for h in hist[1:]) and hist[-1]["step"] == 6
    # the straight-through gradient reaches the encoders: they moved
    assert float(jnp.abs(mp2["0"]["k_enc"][0]["w"] - folded["0"]["k_enc"][0]["w"]).max()) > 1e-5


def test_kl_distillation_lowers_the_distance_to_the_dense_model(tmp_path):
    from train.autoencoder import token_kl

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 11))
    assert abs(float(token_kl(x, x))) < 1e-6 and float(token_kl(x, 2 * x)) > 1e-3
    p, q = jax.nn.softmax(x[:, :-1]), jax.nn.softmax(2 * x[:, :-1])
    np.testing.assert_allclose(token_kl(x, 2 * x), jnp.mean(jnp.sum(p * jnp.log(p / q), -1)), rtol=1e-5)
    # a full-width autoencoder from a random start: the KL to the dense model falls (from about 2.7 to 1.8)
    trainer = run(tmp_path / "kl", loss="kl", latent=TINY["llama"].kv_width, steps1=0, steps2=30, lr2=3e-2,
                  l1_weight=0.0)
    _, _, hist = trainer.run()
    kls = [h["loss"] for h in hist if "loss" in h]
    assert np.mean(kls[-4:]) < 0.85 * np.mean(kls[:4]), kls
    with pytest.raises(ValueError, match="loss='mse'"):
        TrainConfig(loss="mse")
