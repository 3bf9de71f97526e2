"""KV-CAR cross-layer reuse: the Reuse cache, similarity, plans and their files, the analyze CLI."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax.cache.reuse  # noqa: F401  (registers "reuse")
from conftest import TINY, decode_tokens, prefill_then_decode
from kvjax.cache import Dense
from kvjax.cache.registry import get_method, parse_method
from kvjax.cache.reuse import Reuse
from kvjax.checkpoints import LoadedModel
from kvjax.generate import prefill
from kvjax.models import init_params
from kvjax.reuse import PlanError, head_similarity, load_plan, make_plan, save_plan

ZERO_OUT = {"llama": ("wo", "w_down"), "gpt2": ("wo", "bo", "w_proj", "b_proj")}


def identical_layers(cfg, params):
    """Every layer gets layer 0's weights, and every layer but the last adds nothing to the residual
    stream, so every layer sees the same input and computes the same K/V; the last layer's attention
    output still reaches the logits."""
    layers = []
    for l in range(cfg.n_layers):
        p = dict(params["layers"][0])
        if l < cfg.n_layers - 1:
            p.update({n: p[n] * 0 for n in ZERO_OUT[cfg.arch]})
        layers.append(p)
    return {**params, "layers": layers}


def logits(params, cfg, method, tokens, max_len=None):
    cache = method.init(cfg, tokens.shape[0], max_len or tokens.shape[1])
    out, _ = prefill(params, cfg, tokens, cache, method=method, all_logits=True)
    return np.asarray(out)


def tokens_for(cfg, b=2, t=10, seed=1):
    return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, cfg.vocab_size)


# ------------------------------------------------------------------------------------------ the cache
def test_empty_plan_equals_dense_exactly(tiny):
    cfg, params = tiny
    tokens = tokens_for(cfg)
    np.testing.assert_array_equal(logits(params, cfg, Reuse(), tokens), logits(params, cfg, Dense(), tokens))
    assert Reuse().init(cfg, 2, 10).nbytes == Dense().init(cfg, 2, 10).nbytes


def test_reuse_of_identical_layers_equals_dense(tiny):
    cfg, params = tiny
    same = identical_layers(cfg, params)
    tokens = tokens_for(cfg)
    last = cfg.n_layers - 1
    plan = tuple((l, h) for l in range(1, cfg.n_layers) for h in range(cfg.n_kv_heads) if (l + h) % 2 == 0)
    plan += ((last, 1),) if (last, 1) not in plan else ()
    dense = logits(same, cfg, Dense(), tokens)
    np.testing.assert_allclose(logits(same, cfg, Reuse(plan=plan), tokens), dense, atol=1e-5, rtol=1e-5)
    # the whole last layer reused from a layer with different weights changes the output: the reuse is in the path
    whole = tuple((last, h) for h in range(cfg.n_kv_heads))
    assert np.abs(logits(params, cfg, Reuse(plan=whole), tokens) - logits(params, cfg, Dense(), tokens)).max() > 1e-3


def test_chains_resolve_to_the_lowest_stored_layer():
    cfg = TINY["llama"]
    m = Reuse(plan=((2, 1), (1, 1), (2, 0)), inner=Dense(layout="bskd"))  # storage inspected below as [B, S, K, D]
    assert m.plan == ((1, 1), (2, 0), (2, 1))  # normalized
    assert m.source(cfg, 2, 1) == 0 and m.source(cfg, 1, 1) == 0 and m.source(cfg, 2, 0) == 1
    assert m.source(cfg, 1, 0) == 1 and m.source(cfg, 0, 1) == 0
    assert m.stored_heads(cfg, 2) == () and m.stored_heads(cfg, 1) == (0,)
    # read_layer: layer 2's head 1 is layer 0's stored head 1, its head 0 is layer 1's stored head 0
    params = init_params(cfg, jax.random.PRNGKey(0), scale=0.3)
    tokens = tokens_for(cfg, t=6)
    cache = m.init(cfg, 2, 6)
    _, cache = prefill(params, cfg, tokens, cache, method=m)
    k2, v2 = m.read_layer(None, cfg, cache, 2)
    np.testing.assert_array_equal(k2[:, :, 1], cache.layers[0]["k"][:, :, 1])
    np.testing.assert_array_equal(v2[:, :, 1], cache.layers[0]["v"][:, :, 1])
    np.testing.assert_array_equal(k2[:, :, 0], cache.layers[1]["k"][:, :, 0])
    assert cache.layers[2] == {}
    # against the dense cache: the stored heads hold exactly what Dense stores for them
    _, dense = prefill(params, cfg, tokens, Dense(layout="bskd").init(cfg, 2, 6), method=Dense(layout="bskd"))
    np.testing.assert_allclose(cache.layers[0]["k"], dense.layers[0]["k"], atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_nbytes_exact_and_shrinks_by_the_reused_share(dtype):
    cfg = TINY["llama"]  # 3 layers x 2 kv heads = 6 heads
    dense = Dense(dtype=dtype).init(cfg, 2, 24).nbytes
    for plan, reused in [((), 0), (((1, 0),), 1), (((1, 0), (2, 1)), 2), (((2, 0), (2, 1)), 2),
                         (((1, 0), (1, 1), (2, 0), (2, 1)), 4)]:
        m = Reuse(plan=plan, dtype=dtype)
        cache = m.init(cfg, 2, 24)
        assert cache.nbytes == m.bytes_per_token(cfg) * 2 * 24
        assert cache.nbytes * 6 == dense * (6 - reused), plan


def test_prefill_equals_decode_through_reuse_cache(tiny):
    cfg, params = tiny
    m = Reuse(plan=((1, 0), (2, 0), (2, 1)))
    tokens = tokens_for(cfg, t=8, seed=2)
    full = logits(params, cfg, m, tokens)
    steps, _ = decode_tokens(params, cfg, tokens, m.init(cfg, 2, 8), m)
    np.testing.assert_allclose(steps, full, atol=1e-4, rtol=1e-4)
    assert np.abs(full - logits(params, cfg, Dense(), tokens)).max() > 1e-3


def test_bad_plans_are_refused_with_the_pair_named():
    cfg = TINY["llama"]
    with pytest.raises(ValueError, match=r"\(layer 0, head 1\): layer 0"):
        Reuse(plan=((0, 1),))
    with pytest.raises(ValueError, match=r"\(layer 1, head 0\) is listed twice"):
        Reuse(plan=((1, 0), (2, 1), (1, 0)))
    with pytest.raises(ValueError, match="negative"):
        Reuse(plan=((1, -1),))
    with pytest.raises(ValueError, match="not a \\(layer, head\\) pair"):
        Reuse(plan=((1, 0, 2),))
    with pytest.raises(ValueError, match=r"\(layer 3, head 0\): layer out of range .* 3 layers"):
        Reuse(plan=((3, 0),)).init(cfg, 1, 8)
    with pytest.raises(ValueError, match=r"\(layer 1, head 2\): head out of range .* 2 kv heads"):
        Reuse(plan=((1, 2),)).init(cfg, 1, 8)


def test_registry_and_method_parser():
    assert get_method("reuse", plan=((1, 0),)) == Reuse(plan=((1, 0),))
    assert parse_method("reuse:plan=2+1+1+0,dtype=bfloat16") == Reuse(plan=((1, 0), (2, 1)), dtype="bfloat16")
    hash(Reuse(plan=[[1, 0]]))  # lists from JSON become hashable tuples: a static jit argument


# ------------------------------------------------------------------------------------------ plans
def tiny_model(**kw):
    cfg = TINY["llama"]
    return LoadedModel(cfg=cfg, params=init_params(cfg, jax.random.PRNGKey(0), scale=0.3), tokenizer=None,
                       source="tiny", sha256="f" * 64, **kw)


def test_plan_file_round_trip_and_other_model_refused(tmp_path):
    model = tiny_model()
    plan = ((2, 1), (1, 0))
    path = save_plan(str(tmp_path / "p" / "plan.json"), plan, model, info={"metric": "l1"})
    assert load_plan(path, model) == ((1, 0), (2, 1))
    assert not [f for f in (tmp_path / "p").iterdir() if f.name != "plan.json"]  # no temporary left behind
    other = LoadedModel(cfg=dataclasses.replace(model.cfg, n_layers=2), params=None, tokenizer=None, source="x")
    with pytest.raises(PlanError, match="n_layers=3"):
        load_plan(path, other)
    with pytest.raises(PlanError, match="n_kv_heads=2"):
        load_plan(path, dataclasses.replace(model, cfg=dataclasses.replace(model.cfg, n_kv_heads=1, n_heads=2)))
    with pytest.raises(PlanError, match="sha256"):
        load_plan(path, dataclasses.replace(model, sha256="0" * 64))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PlanError, match="corrupt"):
        load_plan(str(tmp_path / "bad.json"), model)
    with pytest.raises(ValueError, match="head out of range"):
        save_plan(str(tmp_path / "x.json"), ((1, 5),), model)


def test_head_similarity_of_identical_and_different_layers():
    rng = np.random.default_rng(0)
    k = rng.normal(size=(50, 3, 8))
    v = rng.normal(size=(50, 3, 8))
    k2 = k.copy()
    k2[:, 2] = -k[:, 2]  # head 2 of layer 2 points the other way
    sim = head_similarity([k, k, k2], [v, v, v])
    assert sim["layers"] == [1, 2] and sim["tokens"] == 50 and sim["n_kv_heads"] == 3
    np.testing.assert_allclose(sim["k_l1"][0], 0, atol=0)
    np.testing.assert_allclose(sim["k_cos"][0], 1, atol=1e-12)
    np.testing.assert_allclose(sim["v_l1"], 0, atol=0)
    np.testing.assert_allclose(sim["k_cos"][1], [1, 1, -1], atol=1e-12)
    np.testing.assert_allclose(sim["k_l1"][1][2], 2 * np.abs(k[:, 2]).mean(), rtol=1e-12)
    np.testing.assert_allclose(sim["k_l1_rel"][1][2], 2.0, rtol=1e-12)
    json.dumps(sim)  # JSON-able


def constructed_table():
    """3 layers x 2 heads; worse of K and V per head: (1,0) 0.1, (1,1) 0.5, (2,0) 0.3, (2,1) 0.05."""
    return {"layers": [1, 2], "n_layers": 3, "n_kv_heads": 2, "head_dim": 8, "tokens": 10,
            "k_l1": [[0.1, 0.2], [0.3, 0.05]], "v_l1": [[0.05, 0.5], [0.1, 0.01]],
            "k_cos": [[0.99, 0.5], [0.9, 0.97]], "v_cos": [[0.95, 0.99], [0.8, 0.99]]}


def test_make_plan_picks_the_right_heads():
    sim = constructed_table()
    assert make_plan(sim, threshold=0.1) == ((1, 0), (2, 1))
    assert make_plan(sim, threshold=0.3) == ((1, 0), (2, 0), (2, 1))
    assert make_plan(sim, n_heads=1) == ((2, 1),)
    assert make_plan(sim, n_heads=3) == ((1, 0), (2, 0), (2, 1))
    assert make_plan(sim, share=2 / 6) == ((1, 0), (2, 1))
    assert make_plan(sim, share=0.3) == ((2, 1),)  # rounded down: 1.8 heads -> 1
    # cosine: worse of K and V is (1,0) 0.95, (1,1) 0.5, (2,0) 0.8, (2,1) 0.97
    assert make_plan(sim, threshold=0.9, metric="cosine") == ((1, 0), (2, 1))
    assert make_plan(sim, n_heads=1, metric="cosine") == ((2, 1),)
    assert make_plan(sim, n_heads=0) == ()
    with pytest.raises(ValueError, match="exactly one"):
        make_plan(sim, threshold=0.1, n_heads=2)
    with pytest.raises(ValueError, match="cannot reuse 5"):
        make_plan(sim, n_heads=5)
    with pytest.raises(ValueError, match="metric"):
        make_plan(sim, n_heads=1, metric="l2")


# ------------------------------------------------------------------------------------------ the CLI
class CharTokenizer:
    def encode(self, text):
        return [ord(c) % 97 for c in text]


def test_analyze_and_plan_cli_end_to_end(tmp_path, monkeypatch):
    import train.reuse as cli

    cfg = TINY["llama"]
    model = LoadedModel(cfg=cfg, params=identical_layers(cfg, init_params(cfg, jax.random.PRNGKey(0), scale=0.3)),
                        tokenizer=CharTokenizer(), source="tiny", sha256="f" * 64)
    monkeypatch.setattr(cli, "_load_model", lambda name: model)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "analysis"
    cli.main(["analyze", "--model", "tiny", "--data", str(text), "--windows", "3", "--context", "32",
              "--batch", "2", "--out", str(out)])
    sim = json.loads((out / "similarity.json").read_text())
    assert sim["tokens"] == 3 * 32 and sim["model"]["sha256"] == "f" * 64 and sim["data"]["files"]
    for key, _ in cli.HEATMAPS:
        assert (out / f"similarity_{key}.png").stat().st_size > 1000
    # every layer computes the same K and V
    np.testing.assert_allclose(sim["k_l1"], 0, atol=1e-6)
    np.testing.assert_allclose(sim["v_cos"], 1, atol=1e-5)
    plan_path = tmp_path / "plan.json"
    cli.main(["plan", "--similarity", str(out / "similarity.json"), "--model", "tiny", "--threshold", "1e-5",
              "--out", str(plan_path)])
    plan = load_plan(str(plan_path), model)
    assert plan == ((1, 0), (1, 1), (2, 0), (2, 1))
    cli.main(["plan", "--similarity", str(out / "similarity.json"), "--model", "tiny", "--share", "0.5",
              "--metric", "cosine", "--out", str(plan_path)])
    assert len(load_plan(str(plan_path), model)) == 3
    monkeypatch.setattr(cli, "_load_model", lambda name: dataclasses.replace(model, sha256="0" * 64))
    with pytest.raises(PlanError, match="sha256"):
        cli.main(["plan", "--similarity", str(out / "similarity.json"), "--model", "tiny", "--heads", "1",
                  "--out", str(plan_path)])


# ------------------------------------------------------------------------------------------ composition
def ae_mparams(cfg, latent, seed=0, same=False):
    """Random linear autoencoders for every layer (the same ones for every layer when ``same``)."""
    from kvjax.compressors.autoencoder import fold_variables, init_layer_variables

    keys = jax.random.split(jax.random.PRNGKey(seed), cfg.n_layers)
    return fold_variables({str(l): init_layer_variables(keys[0 if same else l], cfg.kv_width, latent)
                           for l in range(cfg.n_layers)})


def inner_methods(cfg):
    """(inner method, its mparams): an autoencoder with int8 latents, packed int4, bfloat16 dense."""
    from kvjax.cache.autoencoder import Autoencoder
    from kvjax.cache.quantized import Quantized

    return [(Autoencoder(latent=6, latent_dtype="int8"), ae_mparams(cfg, 6)), (Quantized(bits=4, group=4), None),
            (Dense(dtype="bfloat16"), None)]


def run_logits(params, cfg, method, mp, tokens):
    cache = method.init(cfg, tokens.shape[0], tokens.shape[1], mp)
    out, cache = prefill(params, cfg, tokens, cache, method=method, mparams=mp, all_logits=True)
    return np.asarray(out), cache


def whole_layers(cfg, layers):
    return tuple((l, h) for l in layers for h in range(cfg.n_kv_heads))


def test_composition_reusing_nothing_equals_the_inner_method_exactly(tiny):
    cfg, params = tiny
    tokens = tokens_for(cfg)
    for inner, mp in inner_methods(cfg):
        want, wcache = run_logits(params, cfg, inner, mp, tokens)
        modes = ("decoded", "latent") if inner.name == "autoencoder" else ("decoded",)
        for mode in modes:
            got, gcache = run_logits(params, cfg, Reuse(inner=inner, mode=mode), mp, tokens)
            np.testing.assert_array_equal(got, want)
            assert gcache.nbytes == wcache.nbytes == Reuse(inner=inner).cache_nbytes(cfg, 2, 10)


def test_composition_on_identical_layers_gives_the_inner_result(tiny):
    """Every layer computes the same K/V and (for the autoencoder) has the same coders: reading layer l-1's
    decoded heads, or decoding its latent with layer l's own decoder, is what layer l would have stored."""
    from kvjax.cache.autoencoder import Autoencoder
    from kvjax.cache.quantized import Quantized

    cfg, params = tiny
    same = identical_layers(cfg, params)
    tokens = tokens_for(cfg)
    ae, mp = Autoencoder(latent=6, latent_dtype="int8"), ae_mparams(cfg, 6, same=True)
    want, _ = run_logits(same, cfg, ae, mp, tokens)
    for mode in ("decoded", "latent"):
        for layers in ((1,), (2,), (1, 2)):  # (1, 2): layer 2 reads layer 0 along the chain
            got, _ = run_logits(same, cfg, Reuse(plan=whole_layers(cfg, layers), inner=ae, mode=mode), mp, tokens)
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    q = Quantized(bits=4, group=4)
    plan = ((1, 0), (2, 1), (2, 0))
    np.testing.assert_allclose(run_logits(same, cfg, Reuse(plan=plan, inner=q), None, tokens)[0],
                               run_logits(same, cfg, q, None, tokens)[0], atol=1e-5, rtol=1e-5)
    # with each layer's own weights the reuse changes the output: it is really in the path
    mp_diff = ae_mparams(cfg, 6)
    diff = run_logits(params, cfg, Reuse(plan=whole_layers(cfg, (2,)), inner=ae), mp_diff, tokens)[0]
    assert np.abs(diff - run_logits(params, cfg, ae, mp_diff, tokens)[0]).max() > 1e-3


def test_composition_bytes_shrink_exactly_by_the_reused_share(tiny):
    from kvjax.cache.autoencoder import Autoencoder

    cfg, _ = tiny
    n_heads = cfg.n_layers * cfg.n_kv_heads
    for inner, mp in inner_methods(cfg):
        full = inner.init(cfg, 2, 24, mp).nbytes
        plans = [whole_layers(cfg, (1,)), whole_layers(cfg, (1, 2))]
        if inner.name != "autoencoder":
            plans += [((1, 0),), ((1, 0), (2, 1)), ((2, 0), (2, 1), (1, 1))]
        for plan in plans:
            m = Reuse(plan=plan, inner=inner)
            cache = m.init(cfg, 2, 24, mp)
            assert cache.nbytes == m.cache_nbytes(cfg, 2, 24) == m.bytes_per_token(cfg) * 2 * 24
            assert cache.nbytes * n_heads == full * (n_heads - len(plan)), (inner, plan)
    # an autoencoder that leaves layer 2 dense: layer 2's heads are reused one at a time, physically
    ae = Autoencoder(latent=6, layers=(0, 1))
    mp = ae_mparams(cfg, 6)
    m = Reuse(plan=((2, 1),), inner=ae)
    cache = m.init(cfg, 2, 24, mp)
    dense_head = 2 * cfg.head_dim * 4 * 2 * 24  # K and V of one head, float32, B=2, S=24
    assert cache.nbytes == m.cache_nbytes(cfg, 2, 24) == ae.init(cfg, 2, 24, mp).nbytes - dense_head
    assert cache.layers[2]["k"].shape == (2, 24, cfg.n_kv_heads - 1, cfg.head_dim)


def test_composition_reads_the_source_decoded_or_its_latent():
    from kvjax.cache.autoencoder import Autoencoder

    cfg = TINY["llama"]
    params = init_params(cfg, jax.random.PRNGKey(0), scale=0.3)
    ae, mp = Autoencoder(latent=6), ae_mparams(cfg, 6)
    tokens = tokens_for(cfg, t=6)
    for mode in ("decoded", "latent"):
        m = Reuse(plan=whole_layers(cfg, (1, 2)), inner=ae, mode=mode)
        _, cache = run_logits(params, cfg, m, mp, tokens)
        assert cache.layers[1] == {} and cache.layers[2] == {}
        k2, v2 = m.read_layer(mp, cfg, cache, 2)
        coders = mp["2"] if mode == "latent" else mp["0"]
        wk, wv = ae.decode(cfg, coders, *ae.latents(cache.layers[0]))
        np.testing.assert_array_equal(k2, wk)
        np.testing.assert_array_equal(v2, wv)
    # prefill equals decoding token by token through the composed cache
    m = Reuse(plan=whole_layers(cfg, (2,)), inner=Autoencoder(latent=6, latent_dtype="int8"), mode="latent")
    full, _ = run_logits(params, cfg, m, mp, tokens)
    steps, _ = decode_tokens(params, cfg, tokens, m.init(cfg, 2, 6, mp), m, mp)
    np.testing.assert_allclose(steps, full, atol=1e-4, rtol=1e-4)


def test_composition_refuses_what_cannot_save_or_has_no_latent():
    from kvjax.cache.autoencoder import Autoencoder
    from kvjax.cache.quantized import Quantized

    cfg = TINY["llama"]
    mp = ae_mparams(cfg, 6)
    with pytest.raises(ValueError, match=r"heads \[0\] of layer 1 but not all 2: .* mixes its heads"):
        Reuse(plan=((1, 0),), inner=Autoencoder(latent=6)).init(cfg, 1, 8, mp)
    with pytest.raises(ValueError, match="mode='latent' needs inner=Autoencoder"):
        Reuse(plan=((1, 0),), inner=Quantized(bits=8), mode="latent")
    with pytest.raises(ValueError, match="source layer 1 compressed"):
        Reuse(plan=whole_layers(cfg, (2,)), inner=Autoencoder(latent=6, layers=(0, 2)), mode="latent").init(cfg, 1, 8, mp)
    with pytest.raises(ValueError, match="mode="):
        Reuse(mode="latents")
    with pytest.raises(ValueError, match="reuse method"):
        Reuse(inner=Reuse())


def test_composed_method_saves_and_loads_as_a_compressor(tmp_path):
    from kvjax.cache.autoencoder import Autoencoder
    from kvjax.compressors import load_compressor, save_compressor

    model = tiny_model()
    m = Reuse(plan=whole_layers(model.cfg, (2,)), inner=Autoencoder(latent=6, latent_dtype="int8"), mode="latent")
    mp = ae_mparams(model.cfg, 6)
    path = save_compressor(str(tmp_path / "c"), m, mp, model)
    m2, mp2 = load_compressor(path, model)
    assert m2 == m
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), mp, mp2)


def test_plain_reuse_saves_without_parameters(tmp_path):
    """A method with no learned parameters (plain reuse) saves as a compressor and loads back equal; an
    autoencoder's settings can be overridden at load time (eval's ``settings``)."""
    from kvjax.cache.autoencoder import Autoencoder
    from kvjax.compressors import save_compressor
    from eval.common import load_method

    model = tiny_model()
    m = Reuse(plan=((1, 0), (2, 1)))
    path = save_compressor(str(tmp_path / "plain"), m, {}, model)
    assert not (tmp_path / "plain" / "params").exists()
    m2, mp2, spec = load_method("dense", path, model)
    assert m2 == m and mp2 == {}
    ae = save_compressor(str(tmp_path / "ae"), Autoencoder(latent=6, latent_dtype="int8"), ae_mparams(model.cfg, 6),
                         model)
    m4, _, spec4 = load_method("dense", ae, model, {"latent_dtype": "int4", "latent_group": 2})
    assert m4.latent_dtype == "int4" and "int4" in spec4
    with pytest.raises(ValueError, match="do not apply"):
        load_method("dense", ae, model, {"no_such_setting": 1})


def test_refinement_by_measured_cost_overrides_the_similarity_ranking():
    """Identical layers except head 0 of layer 2 (its K/V projection perturbed): the similarity table ranks
    (2, 0) first, but reusing it costs perplexity while (2, 1) is free; refinement keeps (2, 1)."""
    from train.reuse import refine_plan

    model = tiny_model()
    cfg = model.cfg
    params = identical_layers(cfg, model.params)
    d = cfg.head_dim
    layers = list(params["layers"])
    bump = jax.random.normal(jax.random.PRNGKey(3), layers[2]["wk"][:, :d].shape)
    layers[2] = {**layers[2], "wk": layers[2]["wk"].at[:, :d].add(bump), "wv": layers[2]["wv"].at[:, :d].add(bump)}
    model = dataclasses.replace(model, params={**params, "layers": layers})
    sim = {"layers": [1, 2], "n_layers": 3, "n_kv_heads": 2, "head_dim": d, "tokens": 10,
           "k_cos": [[0.5, 0.5], [0.99, 0.9]], "v_cos": [[0.5, 0.5], [0.99, 0.9]]}
    assert make_plan(sim, n_heads=1, metric="cosine") == ((2, 0),)
    from kvjax.generate import generate

    # the model's own greedy text: changing its computation makes that text less likely (in practice)
    ids = [5, 6, 7] + list(np.asarray(generate(model.params, cfg, [[5, 6, 7]], max_new_tokens=61, stop_tokens=()).tokens[0]))
    costs, plan = refine_plan(model, sim, 1, ids, candidates=2, context=32, batch=2, log=lambda *_: None)
    assert plan == ((2, 1),)
    by_head = {(c["layer"], c["head"]): c["cost"] for c in costs}
    assert abs(by_head[(2, 1)]) < 1e-5 and by_head[(2, 0)] > 1e-3


def test_fitted_latent_decoders_recover_an_invertible_map():
    """Identical layers, full-width random (invertible) encoders, layer 0 decoded exactly: the least-squares
    decoders of the reused layers map layer 0's latent back to their K/V, so the result is the dense one."""
    from kvjax.cache.autoencoder import Autoencoder
    from kvjax.reuse import fit_latent_decoders

    cfg = TINY["llama"]
    model = tiny_model()
    model = dataclasses.replace(model, params=identical_layers(cfg, model.params))
    w = cfg.kv_width
    mp = {}
    for l in range(cfg.n_layers):
        a = np.asarray(jax.random.normal(jax.random.PRNGKey(10 + l), (w, w))) / np.sqrt(w) + np.eye(w)
        b = np.asarray(jax.random.normal(jax.random.PRNGKey(20 + l), (w,)))
        enc = [{"w": jnp.asarray(a, jnp.float32), "b": jnp.asarray(b, jnp.float32)}]
        dec = [{"w": jnp.asarray(np.linalg.inv(a), jnp.float32), "b": jnp.asarray(-b @ np.linalg.inv(a), jnp.float32)}]
        mp[str(l)] = {"k_enc": enc, "k_dec": dec, "v_enc": enc, "v_dec": dec}
    mp["2"] = {**mp["2"], "k_dec": [{"w": jnp.zeros((w, w)), "b": jnp.zeros(w)}]}  # a useless decoder, to be fit
    m = Reuse(plan=whole_layers(cfg, (1, 2)), inner=Autoencoder(latent=w), mode="latent")
    windows = np.asarray(jax.random.randint(jax.random.PRNGKey(3), (4, 16), 0, cfg.vocab_size))
    fitted = fit_latent_decoders(model, m, mp, windows, batch=2, ridge=1e-9)
    np.testing.assert_array_equal(fitted["0"]["k_dec"][0]["w"], mp["0"]["k_dec"][0]["w"])  # others unchanged
    tokens = tokens_for(cfg)
    dense = logits(model.params, cfg, Dense(), tokens)
    np.testing.assert_allclose(run_logits(model.params, cfg, m, fitted, tokens)[0], dense, atol=2e-3, rtol=2e-3)
    assert np.abs(run_logits(model.params, cfg, m, mp, tokens)[0] - dense).max() > 1e-2


# ------------------------------------------------------------------------------------------ fine-tuning after reuse
def reuse_trainer(out, plan, mode="decoded", **kw):
    from train.autoencoder import TrainConfig, Trainer, split_windows, windows_from_ids

    rng = np.random.default_rng(0)
    ids = (np.arange(4000) * 7 % 97 + rng.integers(0, 3, 4000)) % 97
    tr, ev = split_windows(windows_from_ids(ids, 32), 4)
    tc = TrainConfig(**{"latent": 6, "steps2": 8, "batch": 4, "context": 32, "eval_every": 8, "save_every": 4,
                        "init": "pca", "lr2": 3e-3, "reuse_plan": plan, "reuse_mode": mode, "reuse_l1": 0.5, **kw})
    return Trainer(tiny_model(), tr, ev, tc, str(out), progress=False)


def training_forward(trainer, variables, tokens, plan, active):
    from kvjax.models.transformer import forward

    method = dataclasses.replace(trainer.train_method, plan=plan)
    cache = method.init(trainer.cfg, tokens.shape[0], tokens.shape[1])
    return forward(trainer.params, trainer.cfg, tokens, cache, method, {"vars": variables, "active": active})[1]


@pytest.mark.parametrize("mode", ["decoded", "latent"])
def test_reuse_loss_terms_on_a_tiny_model(tmp_path, mode):
    from kvjax.compressors.autoencoder import LayerAutoencoders

    cfg = TINY["llama"]
    plan = whole_layers(cfg, (2,))
    trainer = reuse_trainer(tmp_path / mode, plan, mode)
    variables = trainer.init_variables()
    tokens = jnp.asarray(trainer.train_windows[:2])
    # reference: layer 2 not compressed (active 0) keeps its actual K/V; the layers below are the same
    ref = training_forward(trainer, variables, tokens, (), jnp.asarray([1.0, 1.0, 0.0]))
    got = training_forward(trainer, variables, tokens, plan, jnp.ones(3))
    act_k, act_v = ref.layers[2]["new_k"], ref.layers[2]["new_v"]
    if mode == "decoded":  # layer 2 reads layer 1's reconstruction
        want_k, want_v = ref.layers[1]["new_k"], ref.layers[1]["new_v"]
    else:  # layer 1's latents through layer 2's decoder, keys rotated after decoding
        module = LayerAutoencoders(cfg.kv_width, 6, 0, 6)
        rk, rv = module.apply(variables["2"], ref.layers[1]["zk"], ref.layers[1]["zv"], method=LayerAutoencoders.decode)
        pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        want_k = Dense.rotate_keys(cfg, rk.reshape(act_k.shape), pos)
        want_v = rv.reshape(act_v.shape)
    np.testing.assert_allclose(got.layers[2]["new_k"], want_k, atol=1e-5)
    np.testing.assert_allclose(got.layers[2]["new_v"], want_v, atol=1e-5)
    rel = lambda a, b: np.mean(np.abs(a - b)) / (np.mean(np.abs(b)) + 1e-6)  # noqa: E731
    want_l1 = rel(np.asarray(want_k), np.asarray(act_k)) + rel(np.asarray(want_v), np.asarray(act_v))
    np.testing.assert_allclose(float(got.layers[2]["reuse_l1"]), want_l1, rtol=1e-4)
    assert want_l1 > 0.05 and float(got.layers[2]["l1"]) == 0.0  # the reused layer has no reconstruction term
    # the step's loss is CE + l1_weight * sum of reconstruction L1 + reuse_l1 * sum of reuse L1
    tx, step = trainer.setup_stage(2, variables)
    opt_state = tx.init({l: v["params"] for l, v in variables.items()})
    _, _, m = step(jax.tree_util.tree_map(jnp.copy, variables), opt_state, trainer.params, tokens, jnp.ones(3))
    np.testing.assert_allclose(float(m["reuse_l1"]), want_l1, rtol=1e-4)
    l1_below = float(ref.layers[0]["l1"] + ref.layers[1]["l1"])
    np.testing.assert_allclose(float(m["l1"]), l1_below, rtol=1e-4)
    np.testing.assert_allclose(float(m["loss"]), float(m["ce"]) + 0.01 * l1_below + 0.5 * want_l1, rtol=1e-5)


@pytest.mark.parametrize("mode,init", [("decoded", "pca"), ("latent", "random")])
def test_reuse_fine_tuning_steps_lower_the_loss(tmp_path, mode, init):
    """(Latent mode from PCA starts at the least-squares decoders, already the best linear fit: from a
    random start the reuse term has room to fall.)"""
    trainer = reuse_trainer(tmp_path / mode, whole_layers(TINY["llama"], (1, 2)), mode, init=init)
    variables = trainer.init_variables()
    tokens = jnp.asarray(trainer.train_windows[:4])
    tx = __import__("optax").adam(1e-2)  # a constant rate: the schedule's warm-up would hide the first steps
    step = trainer.make_step(tx, trainer.train_method)
    opt_state = tx.init({l: v["params"] for l, v in variables.items()})
    hist = []
    for _ in range(6):
        variables, opt_state, m = step(variables, opt_state, trainer.params, tokens, jnp.ones(3))
        hist.append((float(m["loss"]), float(m["reuse_l1"])))
    assert hist[-1][0] < 0.95 * hist[0][0] and hist[-1][1] < hist[0][1], hist


@pytest.mark.slow
def test_reuse_fine_tuning_resumes_and_writes_the_composed_method(tmp_path):
    from kvjax.compressors import load_compressor

    plan = whole_layers(TINY["llama"], (2,))
    method, mp_full, hist = reuse_trainer(tmp_path / "full", plan, "latent").run()
    assert isinstance(method, Reuse) and method.mode == "latent" and method.plan == plan
    assert "eval_ppl" in hist[-1] and all("reuse_l1" in h for h in hist[1:])
    reuse_trainer(tmp_path / "part", plan, "latent").run(stop_after=4)
    _, mp_res, hist2 = reuse_trainer(tmp_path / "part", plan, "latent").run(resume=True)
    assert hist2[0]["step"] == 5
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6),
                           mp_full, mp_res)
    m2, mp2 = load_compressor(str(tmp_path / "full" / "compressor"), tiny_model())
    assert m2 == method
    with pytest.raises(ValueError, match="different settings"):  # another plan is another run
        reuse_trainer(tmp_path / "part", whole_layers(TINY["llama"], (1,)), "latent").run(resume=True)


def test_reuse_training_refuses_a_partial_compressed_layer_and_stage1(tmp_path):
    with pytest.raises(ValueError, match="only whole compressed layers"):
        reuse_trainer(tmp_path / "a", ((2, 0),))
    with pytest.raises(ValueError, match="--steps1"):
        reuse_trainer(tmp_path / "b", whole_layers(TINY["llama"], (2,)), steps1=2)


# ------------------------------------------------------------------------------------------ whole-layer plans, the curve
def test_whole_layer_plans_rank_layers_by_their_mean_head_score():
    from kvjax.reuse import layer_scores, make_layer_plan

    sim = constructed_table()  # cosine scores: layer 1 (0.05, 0.5) -> 0.275; layer 2 (0.2, 0.03) -> 0.115
    np.testing.assert_allclose(list(layer_scores(sim, "cosine").values()), [0.275, 0.115], atol=1e-12)
    assert make_layer_plan(sim, 1) == ((2, 0), (2, 1))
    assert make_layer_plan(sim, 1, allowed=[1]) == ((1, 0), (1, 1))
    assert make_layer_plan(sim, 2) == ((1, 0), (1, 1), (2, 0), (2, 1)) and make_layer_plan(sim, 0) == ()
    with pytest.raises(ValueError, match="cannot reuse 3 whole layers"):
        make_layer_plan(sim, 3)


def test_thresholds_pick_the_largest_saving_within_the_rise():
    from train.reuse import thresholds

    rows = [{"series": "s", "dataset": "d", "reused_heads": n, "ppl": p, "dense_ppl": 10.0, "kv_saved_vs_bf16": f}
            for n, p, f in [(0, 8.0, 0.5), (3, 10.2, 0.6), (6, 10.7, 0.7), (9, 12.0, 0.8)]]
    got = {(t["reference"], t["max_rise"]): t["kv_saved_vs_bf16"] for t in thresholds(rows)}
    assert got == {("dense", 0.03): 0.6, ("dense", 0.08): 0.7, ("no reuse", 0.03): 0.5, ("no reuse", 0.08): 0.5}


@pytest.mark.slow
def test_curve_cli_end_to_end(tmp_path, monkeypatch):
    import train.reuse as cli
    from kvjax.cache.autoencoder import Autoencoder
    from kvjax.compressors import save_compressor

    model = dataclasses.replace(tiny_model(), tokenizer=CharTokenizer())
    monkeypatch.setattr(cli, "_load_model", lambda name: model)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    cli.main(["analyze", "--model", "tiny", "--data", str(text), "--windows", "2", "--context", "32",
              "--out", str(tmp_path / "sim")])
    comp = save_compressor(str(tmp_path / "ae"), Autoencoder(latent=6, latent_dtype="int8"), ae_mparams(model.cfg, 6), model)
    out = tmp_path / "curve"
    cli.main(["curve", "--similarity", str(tmp_path / "sim" / "similarity.json"), "--model", "tiny", "--heads", "0,2",
              "--compressor", comp, "--layers", "0,1", "--calib-windows", "2", "--context", "32", "--rank", "cosine,fit",
              "--max-tokens", "128", "--batch", "4", "--out", str(out)])
    res = json.loads((out / "curve.json").read_text())
    rows = {(r["series"], r["reused_heads"]): r for r in res["rows"]}
    assert len(rows) == 8 and (out / "curve.png").stat().st_size > 1000 and (out / "curve.md").exists()
    assert ("ae + reuse (latent, layers by fit)", 2) in rows
    assert rows[("reuse", 0)]["ppl"] == pytest.approx(rows[("reuse", 0)]["dense_ppl"], rel=1e-6)
    assert rows[("reuse", 2)]["kv_saved_vs_bf16"] == pytest.approx(2 / 6)
    dec, lat = "ae + reuse (decoded)", "ae + reuse (latent)"
    assert rows[(dec, 0)]["ppl"] == rows[(lat, 0)]["ppl"]  # the same method: the autoencoder alone
    ae_saved = rows[(dec, 0)]["kv_saved_vs_bf16"]
    assert rows[(lat, 2)]["kv_saved_vs_bf16"] == pytest.approx(1 - (1 - ae_saved) * 2 / 3)  # one of 3 layers
    assert rows[(lat, 2)]["ppl"] != rows[(dec, 2)]["ppl"]
    assert {t["reference"] for t in res["thresholds"]} == {"dense", "no reuse"}


def test_fine_tuning_starts_from_a_trained_compressor(tmp_path):
    from kvjax.cache.autoencoder import Autoencoder
    from kvjax.compressors import save_compressor
    from kvjax.compressors.autoencoder import fold_variables

    cfg = TINY["llama"]
    mp = ae_mparams(cfg, 6)
    path = save_compressor(str(tmp_path / "c"), Autoencoder(latent=6), mp, tiny_model())
    trainer = reuse_trainer(tmp_path / "run", whole_layers(cfg, (2,)), "decoded", init_from=path)
    folded = fold_variables(trainer.init_variables())
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), folded, mp)
    latent = reuse_trainer(tmp_path / "run2", whole_layers(cfg, (2,)), "latent", init_from=path).init_variables()
    fitted = np.asarray(fold_variables(latent)["2"]["k_dec"][0]["w"])
    assert np.abs(fitted - np.asarray(mp["2"]["k_dec"][0]["w"])).max() > 1e-3  # latent mode refits the decoder
    with pytest.raises(ValueError, match="latent=8, this run's is 6"):
        save_compressor(str(tmp_path / "c8"), Autoencoder(latent=8), ae_mparams(cfg, 8), tiny_model())
        reuse_trainer(tmp_path / "run3", whole_layers(cfg, (2,)), init_from=str(tmp_path / "c8")).init_variables()


@pytest.mark.parametrize("mode", [pytest.param("decoded", marks=pytest.mark.slow), "latent"])
def test_composed_decode_through_the_fused_kernel_equals_the_xla_path(mode):
    """A whole reused layer's decode step reads the source latents through the Pallas kernel (interpreted
    on CPU) with the source's decoder (decoded) or its own (latent): equal to decode-then-attend."""
    from kvjax.cache.autoencoder import Autoencoder

    cfg = dataclasses.replace(TINY["llama"], d_model=64, n_heads=4, n_kv_heads=2, head_dim=32, n_layers=3)
    params = init_params(cfg, jax.random.PRNGKey(0), scale=0.2)
    mp = ae_mparams(cfg, 24)
    tokens = tokens_for(cfg, t=5)
    outs = {}
    for kernel in ("xla", "pallas"):
        outs[kernel] = prefill_then_decode(params, cfg, tokens, Reuse(plan=whole_layers(cfg, (2,)), inner=Autoencoder(latent=24, latent_dtype="int8", kernel=kernel), mode=mode), mp)
    np.testing.assert_allclose(outs["pallas"], outs["xla"], atol=2e-4, rtol=2e-4)


def test_latent_fit_scores_find_the_predictable_layer():
    """Layer 2's K/V are an invertible map of layer 1's, layer 1's are unrelated to layer 0's: layer 2 scores
    near 0, layer 1 near 1 (the least-squares residual over the variance)."""
    from kvjax.cache.autoencoder import Autoencoder
    from kvjax.reuse import latent_fit_scores, plan_from_layer_scores

    rng = np.random.default_rng(0)
    k0, k1 = rng.normal(size=(400, 2, 4)), rng.normal(size=(400, 2, 4))
    a = rng.normal(size=(8, 8)) + 3 * np.eye(8)
    k2 = (k1.reshape(400, 8) @ a).reshape(400, 2, 4)
    eye = [{"w": jnp.eye(8), "b": jnp.zeros(8)}]
    mp = {str(l): {"k_enc": eye, "k_dec": eye, "v_enc": eye, "v_dec": eye} for l in range(3)}
    scores = latent_fit_scores(Autoencoder(latent=8), mp, ([k0, k1, k2], [k0, k1, k2]), ridge=1e-9)
    assert scores[2] < 1e-6 and 1.8 < scores[1] <= 2.0  # K plus V
    assert plan_from_layer_scores(scores, 1, 2) == ((2, 0), (2, 1))
