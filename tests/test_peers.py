"""eval.peers: byte accounting, jobs, the JSON schema and the report join (no torch needed), and the kvpress
path itself on a tiny random Llama when the 'peers' extra is installed (skipped otherwise)."""

import importlib.util
import json
import math
import pathlib

import numpy as np
import pytest

from eval import peers
from eval.perplexity import perplexity, plan_windows
from kvjax.config import ModelConfig
from test_eval import tiny_model

SMOL = ModelConfig(arch="llama", vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                               head_dim=64, d_ff=1536, max_seq_len=8192, norm_eps=1e-5, name="smollm2-shape")


# ---------------------------------------------------------------------------------------------- bytes, jobs
def test_press_bytes_at_the_reference_prefix():
    dense = peers.dense_bytes_per_token(30, 3, 64, 4)
    assert dense == 46080 == peers.expected_bytes_per_token(peers.Job("dense"), SMOL, 384)
    for r, kept in ((0.5, 192), (0.75, 96), (0.875, 48)):
        assert peers.kept_tokens(384, r) == kept
        assert peers.press_bytes_per_token(dense, 384, r) == (1 - r) * dense
        assert peers.expected_bytes_per_token(peers.Job("snapkv", r), SMOL, 384) == (1 - r) * dense
    assert peers.kept_tokens(5, 0.9) == 1  # kvpress never empties a layer below ratio 1
    assert peers.kept_tokens(10, 0.75) == 2  # int() floors: 2.5 -> 2


def test_quanto_bytes_count_codes_scales_and_zero_points():
    # SmolLM2: per layer and K-or-V, 192 values = 3 groups of 64: codes + 3 x (scale + zero point) in float32
    assert peers.quanto_bytes_per_token(30, 3, 64, 4) == 2 * 30 * (96 + 3 * 8) == 7200
    assert peers.quanto_bytes_per_token(30, 3, 64, 2) == 2 * 30 * (48 + 3 * 8) == 4320
    assert peers.quanto_bytes_per_token(30, 3, 64, 4, scale_itemsize=2) == 2 * 30 * (96 + 3 * 4)
    with pytest.raises(ValueError, match="group"):
        peers.quanto_bytes_per_token(2, 1, 48, 4, group=64)


def test_parse_jobs_order_aliases_and_errors():
    jobs = peers.parse_jobs("dense,h2o@0.75,snapkv,quanto-int4", "0.5,0.875")
    assert [j.name for j in jobs] == ["dense", "observed_attention-r0.75", "snapkv-r0.5", "snapkv-r0.875",
                                      "quanto-int4"]
    assert [j.library for j in jobs] == ["kvpress"] * 4 + ["transformers"]
    assert jobs[1].spec == "observed_attention:ratio=0.75" and "H2O" in jobs[1].label
    for bad, match in (("nope", "unknown method"), ("snapkv@1.5", "ratio"), ("dense@0.5", "no ratio"),
                       ("snapkv,snapkv@0.5", "twice")):
        with pytest.raises(ValueError, match=match):
            peers.parse_jobs(bad, "0.5")
    with pytest.raises(ValueError, match="ratio"):
        peers.parse_jobs("snapkv", "0")
    assert len(peers.parse_jobs(",".join(peers.DEFAULT_METHODS))) == 1 + 3 * len(peers.PRESSES) + len(peers.QUANTO)


def test_window_plan_is_eval_perplexity_plan():
    """The peer scores exactly the predictions eval.perplexity scores under the protocol: windows at
    multiples of C, predictions of tokens P..C-1 (weights[:, P-1:])."""
    n, c, p = 5000, 512, 384
    starts, weights = plan_windows(n, c, None, "continue", p)
    assert starts.tolist() == list(range(0, (n // c) * c, c))
    assert (weights[:, p - 1:] == 1).all() and not weights[:, :p - 1].any()
    assert weights.sum() == len(starts) * (c - p)


# ---------------------------------------------------------------------------------------------- schema, report
def _record(job, windows=6, used_tokens=200, nll_sum=100.0, dataset="text:t.txt"):
    dense = 46080
    kv = peers.expected_bytes_per_token(job, SMOL, 20)
    return peers.make_record(job, nll_sum=nll_sum, tokens=windows * 12, windows=windows, input_tokens=used_tokens,
                             used_tokens=used_tokens,
                             context=32, prefix=20, batch=8, kv_bytes_per_token=kv, dense_kv_bytes_per_token=dense,
                             dense_dtype="float32", model={"model": "m", "model_sha256": "0" * 64,
                                                           "model_source": "m.gguf", "dtype": "float32"},
                             wall_s=1.0, extra={"dataset": dataset, "versions": {"kvpress": "x"}})


def test_record_has_eval_perplexity_schema():
    m = tiny_model()
    ours = perplexity(m, np.random.RandomState(0).randint(0, 97, 200), context=32, protocol="continue", prefix=20)
    assert set(ours) - {"jax_version"} == set(peers.RECORD_KEYS)
    rec = _record(peers.Job("snapkv", 0.75))
    assert set(peers.RECORD_KEYS) <= set(rec)
    for k in ("protocol", "prefix", "context", "stride", "kv_bytes_at_context", "dense_dtype", "dropped_tail_tokens",
              "windows", "tokens"):
        assert rec[k] == ours[k], k
    assert rec["library"] == "kvpress" and rec["ratio"] == 0.75 and rec["versions"] == {"kvpress": "x"}
    assert rec["ppl"] == pytest.approx(math.exp(100.0 / 72)) and rec["tokens"] == 72
    kept = peers.kept_tokens(20, 0.75)  # 5 of 20: exactly a quarter
    assert rec["kv_saved"] == pytest.approx(1 - kept / 20)
    assert rec["kv_cache_bytes_per_window"] == 46080 * (kept + 12)  # the continuation is held in full
    json.dumps(rec)  # plain JSON types only
    with pytest.raises(ValueError, match="scored"):
        _record(peers.Job("dense"), windows=0)


def test_report_puts_peer_rows_on_kvjax_table_and_plot(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("Pack my box with five dozen liquor jugs. " * 20)
    folder = tmp_path / "peers"
    folder.mkdir()
    from eval.common import write_json
    from eval.report import load_external, run_grid
    write_json(folder / "snapkv-r0.5.json", _record(peers.Job("snapkv", 0.5), windows=8, used_tokens=256))
    write_json(folder / "quanto-int4.json", _record(peers.Job("quanto-int4"), windows=8, used_tokens=256))
    write_json(folder / "dense-2win.json", {**_record(peers.Job("dense"), windows=2), "label": "other tokens"})
    (folder / ".partial-knorm-r0.5.json").write_text("{}")  # a job in progress is not a result
    assert len(load_external(folder)) == 3
    grid = {"model": "tiny-llama", "methods": ["dense", "quantized:bits=4,group=8"],
            "tasks": [{"task": "perplexity", "text_file": str(text), "context": 32, "max_tokens": 256,
                       "protocol": "continue", "prefix": 20}],
            "external": [str(folder)]}
    res = run_grid(grid, tmp_path / "out", model=tiny_model(), log=lambda *a: None)
    assert res["failed"] == 0 and [c["tokens"] for c in res["cells"]] == [96, 96]
    md = (tmp_path / "out" / "results.md").read_text()
    assert "SnapKV r=0.5 | kvpress" in md and "QuantizedCache int4 (quanto) | transformers" in md
    assert "other tokens" not in md  # 24 scored tokens: not the same tokens as the kvjax cells
    assert len(res["plots"]) == 1 and pathlib.Path(res["plots"][0]).stat().st_size > 1000
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no .json"):
        load_external(empty)


# ---------------------------------------------------------------------------------------------- the peer itself
def _peer_installed() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("kvpress", "torch", "optimum"))


needs_peer = pytest.mark.skipif(not _peer_installed(), reason="the 'peers' extra (kvpress, optimum-quanto) is not "
                                "installed: python3 -m venv --system-site-packages .venv-peers && "
                                ".venv-peers/bin/pip install -e '.[peers]'")


@pytest.fixture(scope="module")
def hf_tiny():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


@needs_peer
def test_peer_dense_protocol_equals_one_full_pass(hf_tiny):
    import torch
    tok = torch.as_tensor(np.random.RandomState(0).randint(0, 97, (3, 40)))
    nll, held = peers.batch_nll(hf_tiny, tok, 24)
    with torch.inference_mode():
        logp = torch.log_softmax(hf_tiny(input_ids=tok).logits.double(), -1)
    direct = -logp[:, 23:-1].gather(-1, tok[:, 24:, None])[..., 0]
    assert nll.shape == (3, 16)
    assert torch.allclose(nll, direct, rtol=1e-4, atol=1e-5)
    assert held == 3 * 24 * peers.dense_bytes_per_token(2, 2, 32, 4)


@needs_peer
@pytest.mark.parametrize("job", [peers.Job("knorm", 0.5), peers.Job("streaming_llm", 0.75),
                                 peers.Job("observed_attention", 0.5), peers.Job("quanto-int4"),
                                 peers.Job("quanto-int2")], ids=lambda j: j.name)
def test_peer_methods_store_what_the_arithmetic_says(hf_tiny, job):
    import torch
    if job.method in peers.PRESSES and peers.PRESSES[job.method].needs_attentions:
        hf_tiny.set_attn_implementation("eager")
    tok = torch.as_tensor(np.random.RandomState(1).randint(0, 97, (2, 40)))
    nll, held = peers.batch_nll(hf_tiny, tok, 24, peers.make_press(job), peers.make_cache(job, hf_tiny.config))
    dense_nll, _ = peers.batch_nll(hf_tiny, tok, 24)
    cfg = ModelConfig(arch="llama", vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                  head_dim=32, d_ff=128, max_seq_len=128, norm_eps=1e-5)
    assert held == 2 * 24 * peers.expected_bytes_per_token(job, cfg, 24)
    assert torch.isfinite(nll).all() and not torch.allclose(nll, dense_nll)  # lossy, and it is used


@needs_peer
def test_peer_run_job_resumes_from_partial(hf_tiny, tmp_path):
    ids = np.random.RandomState(2).randint(0, 97, 40 * 3 + 5)
    job = peers.Job("knorm", 0.5)
    whole = peers.run_job(job, hf_tiny, ids, context=40, prefix=24, batch=1, partial_dir=tmp_path)
    part = tmp_path / ".partial-knorm-r0.5.json"
    state = json.loads(part.read_text())
    assert state["done"] == 3 and state["tokens"] == 3 * 16 and state["nll_sum"] == whole["nll_sum"]
    # a run stopped after one window resumes from the partial file and ends with the same sums
    first = peers.run_job(job, hf_tiny, ids[: 40 + 5], context=40, prefix=24, batch=1)
    part.write_text(json.dumps({**first, "windows_total": 3}))
    resumed = peers.run_job(job, hf_tiny, ids, context=40, prefix=24, batch=1, partial_dir=tmp_path)
    assert resumed["done"] == 3 and resumed["tokens"] == whole["tokens"]
    assert resumed["nll_sum"] == pytest.approx(whole["nll_sum"], rel=1e-9)


@needs_peer
def test_shared_prefill_equals_one_run_per_job(hf_tiny):
    hf_tiny.set_attn_implementation("eager")
    ids = np.random.RandomState(3).randint(0, 97, 40 * 3)
    jobs = peers.parse_jobs("dense,knorm@0.5,observed_attention@0.75,tova@0.5,streaming_llm@0.5,quanto-int4")
    shared = peers.run_jobs(jobs, hf_tiny, ids, context=40, prefix=24, batch=2, shared=True)
    for job in jobs:
        alone = peers.run_job(job, hf_tiny, ids, context=40, prefix=24, batch=2)
        assert shared[job]["tokens"] == alone["tokens"] == 3 * 16 and shared[job]["kv_held"] == alone["kv_held"]
        assert shared[job]["nll_sum"] == pytest.approx(alone["nll_sum"], rel=1e-9), job.name
