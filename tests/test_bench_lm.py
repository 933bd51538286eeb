"""`svdcompress bench` on a causal-LM run: prefill and decode through the key-value cache,
the compressed run against its dense original. Tiny random Llama, no downloads."""

import json

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402

import svdcompress as sc  # noqa: E402
from svdcompress.cli import main  # noqa: E402
from svdcompress.integrations.bench_lm import decode_seconds, lm_benchmark, weight_bytes  # noqa: E402

from .test_generate import runs  # noqa: E402,F401  (fixture: a rank-4 Llama and its run)


def test_the_lm_bench_times_prefill_and_decode_of_both_models(runs, tmp_path, capsys):  # noqa: F811
    src, run = runs
    out = tmp_path / "bench.json"
    assert main(["bench", str(run), "--batch", "1,2", "--prompt-tokens", "16", "--new-tokens", "5",
                 "--repeats", "2", "--threads", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "prefill 16 tokens" in printed and "ms/token" in printed
    result = json.loads(out.read_text())
    assert result["kind"] == "causal-lm" and result["threads"] == 1 and result["repeats"] == 2
    assert [r["batch"] for r in result["rows"]] == [1, 2]
    for r in result["rows"]:
        for name in ("dense", "compressed"):
            m = r[name]
            assert m["prefill_ms"] > 0 and m["decode_ms_per_token"] > 0 and m["peak_added_bytes"] >= 0
            assert m["decode_tokens_per_second"] == pytest.approx(r["batch"] * 1000 / m["decode_ms_per_token"])
            assert m["prefill_tokens_per_second"] == pytest.approx(r["batch"] * 16 * 1000 / m["prefill_ms"])
        assert r["prefill_speedup"] == pytest.approx(r["dense"]["prefill_ms"] / r["compressed"]["prefill_ms"])
        assert r["same_tokens"]  # rank-4 weights factorised at rank 4: the dense model's tokens
    # the factorised block weights are smaller than the dense ones
    assert result["weight_bytes"]["compressed"] < result["weight_bytes"]["dense"]


def test_decode_goes_through_the_cache_and_gives_the_recomputed_tokens(runs):  # noqa: F811
    _, run = runs
    model = sc.load(run)
    ids = torch.randint(0, model.hf_config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    _, tokens = decode_seconds(model.model, ids, 6)
    assert tokens.shape == (2, 7)  # the prefill's token and one per step
    seq = ids
    with torch.no_grad():
        for i in range(7):
            nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
            assert torch.equal(nxt, tokens[:, i:i + 1])
            seq = torch.cat([seq, nxt], 1)


def test_lm_bench_refuses_what_does_not_fit(runs):  # noqa: F811
    _, run = runs
    model = sc.load(run)
    limit = model.hf_config.max_position_embeddings
    with pytest.raises(sc.ConfigError, match="positions"):
        lm_benchmark(model, prompt_tokens=limit, new_tokens=4)
    with pytest.raises(sc.ConfigError, match="at least 1"):
        lm_benchmark(model, prompt_tokens=8, new_tokens=0)
    with pytest.raises(sc.ConfigError, match="not a causal language model"):
        lm_benchmark(torch.nn.Linear(2, 2))
    assert weight_bytes(model) == sum(p.numel() * 4 for p in {p.data_ptr(): p for p in model.parameters()}.values()) \
        + sum(b.numel() * b.element_size() for b in model.buffers())
