"""Any Hugging Face transformer: GPT-2 (transformers' Conv1D) and Llama-style causal LMs,
block-wise calibration, save/load offline, perplexity. Tiny random models, no downloads."""

import copy
import dataclasses

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402

import svdcompress as sc  # noqa: E402
from svdcompress.cli import main  # noqa: E402
from svdcompress.core import compress as compress_module  # noqa: E402
from svdcompress.core.kinds import dense_kind  # noqa: E402
from svdcompress.core.swap import replace_module  # noqa: E402
from svdcompress.integrations.causal_lm import CausalLM, perplexity  # noqa: E402
from svdcompress.integrations.hf import synthetic_sentences  # noqa: E402

VOCAB = 120


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return CausalLM(transformers.GPT2LMHeadModel(cfg), 64).eval()


def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                   max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                                   pad_token_id=0)
    return CausalLM(transformers.LlamaForCausalLM(cfg), 64).eval()


MODELS = {"gpt2": gpt2, "llama": llama}


def tiny(cls, cfg):
    torch.manual_seed(0)
    return CausalLM(cls(cfg), 64).eval()


_COMMON = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0, max_position_embeddings=64)
_SHAPE = dict(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=4,
              num_key_value_heads=2)
# The decoder families transformers ships most, beyond GPT-2 and Llama: Gemma-3 alternates
# sliding-window and global attention, so each block gets its own mask and positions.
FAMILIES = {
    "mistral": lambda: tiny(transformers.MistralForCausalLM, transformers.MistralConfig(
        sliding_window=8, **_SHAPE, **_COMMON)),
    "qwen2": lambda: tiny(transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**_SHAPE, **_COMMON)),
    "gemma3": lambda: tiny(transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig(
        **{**_SHAPE, "num_hidden_layers": 4}, head_dim=8, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"] * 2, **_COMMON)),
    "phi3": lambda: tiny(transformers.Phi3ForCausalLM, transformers.Phi3Config(**_SHAPE, **_COMMON)),
    "opt": lambda: tiny(transformers.OPTForCausalLM, transformers.OPTConfig(
        num_hidden_layers=3, hidden_size=32, ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=32,
        vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=1, max_position_embeddings=64)),
}


def batches(n=4, tokens=12, pad=False):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (3, tokens), generator=g)
        mask = torch.ones_like(ids)
        if pad:
            mask[1, tokens // 2:] = 0  # a shorter sequence, right-padded
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def logits(model, batch):
    model.eval()  # no dropout
    with torch.no_grad():
        return model(**batch)


@pytest.mark.parametrize("name", MODELS)
def test_full_rank_factors_reproduce_the_logits(name):
    model = MODELS[name]()
    b = batches(1)[0]
    ref = logits(model, b)
    layers = [(n, m, dense_kind(m)) for n, m in model.named_modules() if dense_kind(m) is not None]
    assert {k.name for _, _, k in layers} == ({"hf-conv1d", "linear"} if name == "gpt2" else {"linear"})
    for n, m, kind in layers:  # every layer as exact factors u @ v of full rank
        dec = sc.svd(kind.matrix(m))
        u, v = dec.U * dec.S, dec.Vh
        replace_module(model, n, kind.replace(m, u, v))
    torch.testing.assert_close(logits(model, b), ref, atol=1e-4, rtol=1e-4)


def test_gpt2_conv1d_layers_compress_and_embeddings_norms_stay_dense_with_reasons():
    model = gpt2()
    before = sum(p.numel() for p in model.parameters())
    report = sc.compress_(model, sc.SVDConfig(rank=4))
    rows = {r.name: r for r in report.layers}
    assert len(report.compressed) == 12  # c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj x 3 blocks
    assert rows["model.transformer.wte"].reason is sc.KeepDense.EMBEDDING
    assert rows["model.transformer.h.0.ln_1"].reason is sc.KeepDense.VECTOR
    assert rows["model.lm_head"].reason is sc.KeepDense.OUTPUT_LAYER
    after = sum(p.numel() for p in model.parameters())
    assert before - after == report.params_before - report.params_after > 0  # tied wte counted once


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("sequential", [True, False])
def test_blockwise_and_per_layer_calibration_give_the_same_factors(name, sequential, monkeypatch):
    base = MODELS[name]()
    data = batches(pad=True)  # padded: the attention masks must reach every block
    models = {}
    for blockwise in (True, False):
        model = copy.deepcopy(base)
        cfg = sc.SVDConfig(ratio=0.4, method="whiten", sequential=sequential, blockwise=blockwise)
        models[blockwise] = model, sc.compress_(model, cfg, data)
    (a, ra), (b, rb) = models[True], models[False]
    assert [r.rank for r in ra.layers] == [r.rank for r in rb.layers] and ra.compressed
    for name, layer in a.named_modules():  # each factorised weight u v (the factors themselves
        if isinstance(layer, sc.LowRankLinear):  # are unique only up to near-tied singular values)
            with torch.no_grad():
                other = b.get_submodule(name).dense_weight()
                err = float((layer.dense_weight() - other).norm() / other.norm())
            assert err < 1e-4, (name, err)
    torch.testing.assert_close(logits(a, data[0]), logits(b, data[0]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_common_decoder_takes_the_blockwise_path_and_matches_the_per_layer_factors(name, monkeypatch):
    base = FAMILIES[name]()
    data = batches(pad=True)
    cfg = sc.SVDConfig(ratio=0.4, method="whiten")
    per_layer = copy.deepcopy(base)
    sc.compress_(per_layer, dataclasses.replace(cfg, blockwise=False), data)

    def forbidden(*a, **k):
        raise AssertionError("the per-layer path ran")
    monkeypatch.setattr(compress_module, "record_inputs", forbidden)
    monkeypatch.setattr(compress_module, "collect", forbidden)
    block = copy.deepcopy(base)
    report = sc.compress_(block, cfg, data)
    assert len(report.compressed) >= 3 * 4  # (Phi-3 fuses qkv and gate-up: 4 a block)
    for layer_name, layer in block.named_modules():
        if isinstance(layer, sc.LowRankLinear):
            with torch.no_grad():
                other = per_layer.get_submodule(layer_name).dense_weight()
                err = float((layer.dense_weight() - other).norm() / other.norm())
            assert err < 1e-4, (layer_name, err)
    torch.testing.assert_close(logits(block, data[0]), logits(per_layer, data[0]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama", "gpt2", *FAMILIES])
def test_an_unwrapped_causal_lm_with_its_cache_on_compresses_block_wise_as_the_wrapped_one(name, monkeypatch):
    # A Hugging Face causal LM as transformers gives it runs with use_cache on: every block
    # gets the pass's key-value cache, which replayed on every block pass grew (a crash)
    wrapped = (MODELS.get(name) or FAMILIES[name])()
    raw = copy.deepcopy(wrapped.model)
    assert raw.config.use_cache
    data = batches(pad=True)
    cfg = sc.SVDConfig(ratio=0.4, method="whiten")
    sc.compress_(wrapped, cfg, data)

    def forbidden(*a, **k):
        raise AssertionError("the per-layer path ran")
    monkeypatch.setattr(compress_module, "record_inputs", forbidden)
    monkeypatch.setattr(compress_module, "collect", forbidden)
    sc.compress_(raw, cfg, data)
    for layer_name, layer in raw.named_modules():
        if isinstance(layer, sc.LowRankLinear):
            ref = wrapped.model.get_submodule(layer_name)
            assert torch.equal(layer.dense_weight(), ref.dense_weight()), layer_name
    with torch.no_grad():
        torch.testing.assert_close(raw(**data[0], use_cache=False).logits, wrapped(**data[0]))


@pytest.mark.parametrize("blockwise", [True, False])
@pytest.mark.parametrize("sequential", [True, False])
def test_padded_positions_are_left_out_of_the_statistics(blockwise, sequential):
    # every sequence right-padded after 6 tokens: the fit is what the 6 real tokens give,
    # whatever the padding holds (a probe found 31% apart between pad tokens 0 and 7)
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(1, VOCAB, (3, 12), generator=g) for _ in range(4)]
    cfg = sc.SVDConfig(ratio=0.4, method="whiten", sequential=sequential, blockwise=blockwise)

    def fitted(data):
        model = llama()
        sc.compress_(model, cfg, data)
        return {n: m.dense_weight() for n, m in model.named_modules() if isinstance(m, sc.LowRankLinear)}

    def padded(fill):
        out = []
        for t in ids:
            t = t.clone()
            t[:, 6:] = fill
            mask = torch.ones_like(t)
            mask[:, 6:] = 0
            out.append({"input_ids": t, "attention_mask": mask})
        return out
    cut = fitted([{"input_ids": t[:, :6], "attention_mask": torch.ones_like(t[:, :6])} for t in ids])
    for fill in (0, 7):
        got = fitted(padded(fill))
        assert got.keys() == cut.keys() and got
        for name in got:
            torch.testing.assert_close(got[name], cut[name], atol=1e-4, rtol=1e-4)


def test_blockwise_path_records_no_per_layer_inputs(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("the per-layer path ran")
    monkeypatch.setattr(compress_module, "record_inputs", forbidden)
    monkeypatch.setattr(compress_module, "collect", forbidden)
    sc.compress_(llama(), sc.SVDConfig(rank=4, method="whiten"), batches())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_keeps_its_dtype(tmp_path, dtype):
    model = llama().to(dtype)
    sc.compress_(model, sc.SVDConfig(rank=4, method="whiten"), batches())
    assert {p.dtype for p in model.parameters()} == {dtype}
    model.model.config.dtype = dtype
    sc.save(model, tmp_path / "run")
    loaded = sc.load(tmp_path / "run")
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    b = batches(1)[0]  # (rotary buffers, not saved, are rebuilt in float32: bf16-level agreement)
    torch.testing.assert_close(logits(loaded, b), logits(model, b), atol=1e-2, rtol=1e-2)


def make_tokenizer(directory, texts):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, tokenizers.trainers.WordLevelTrainer(
        vocab_size=VOCAB, special_tokens=["[UNK]"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.save_pretrained(str(directory))
    return fast


@pytest.mark.parametrize("name", MODELS)
def test_cli_compresses_a_causal_lm_dir_saves_it_offline_and_scores_perplexity(name, tmp_path, capsys):
    texts = synthetic_sentences(400)
    src = tmp_path / "src"
    MODELS[name]().model.save_pretrained(str(src))
    make_tokenizer(src, texts)
    text = tmp_path / "text.txt"
    text.write_text("\n".join(texts[:200]))
    out = tmp_path / "run"
    assert main(["compress", "--hf", str(src), "--ratio", "0.5", "--method", "whiten", "--calib", str(text),
                 "--seq-len", "16", "--calib-seqs", "8", "--out", str(out)]) == 0
    model = sc.load(out)
    assert isinstance(model, CausalLM) and model.tokenizer is not None
    source = transformers.AutoModelForCausalLM.from_pretrained(str(src))
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in source.parameters())
    capsys.readouterr()
    assert main(["eval-lm", str(out), "--reference", str(src), "--text", str(text), "--window", "32",
                 "--stride", "16"]) == 0
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "reference" in printed
    assert main(["compress", "--hf", str(src), "--ratio", "0.5", "--method", "whiten",
                 "--out", str(tmp_path / "x")]) == 2  # a causal LM needs calibration text


def test_sliding_window_perplexity_scores_every_token_once():
    model = gpt2()
    ids = torch.randint(1, VOCAB, (50,), generator=torch.Generator().manual_seed(0))
    whole = perplexity(model, ids, window=64, stride=64)
    assert whole["tokens"] == 49
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(model(ids[None])[0, :-1], ids[1:])
    assert whole["perplexity"] == pytest.approx(float(ref.exp()), rel=1e-5)
    slid = perplexity(model, ids, window=16, stride=8)
    assert slid["tokens"] == 49


def test_non_overlapping_windows_equal_a_direct_computation():
    model = gpt2()
    ids = torch.randint(1, VOCAB, (50,), generator=torch.Generator().manual_seed(2))
    got = perplexity(model, ids, window=16, stride=16)
    nll, count = 0.0, 0
    with torch.no_grad():
        for begin in range(0, 50, 16):  # each window alone, scoring its tokens after the first
            chunk = ids[begin:begin + 16]
            if len(chunk) < 2:
                continue
            losses = torch.nn.functional.cross_entropy(model(chunk[None])[0, :-1], chunk[1:], reduction="none")
            nll, count = nll + float(losses.sum()), count + losses.numel()
    assert got["tokens"] == count == 50 - 4
    assert got["nll"] == pytest.approx(nll / count, rel=1e-6)
    assert got["perplexity"] == pytest.approx(float(torch.tensor(nll / count).exp()), rel=1e-6)
    assert got["seconds"] > 0


@pytest.mark.parametrize("sequential", ["sequential", "parallel"])
def test_profile_names_where_the_time_of_a_compression_goes(tmp_path, capsys, sequential):
    from svdcompress.core.profile import Profile
    profile = Profile()
    sc.compress_(llama(), sc.SVDConfig(ratio=0.5, method="whiten", sequential=sequential == "sequential"),
                 batches(), profile=profile)
    phases = profile.to_dict()
    streams = ["block passes (original stream)"] + \
        (["block passes (compressed stream)"] if sequential == "sequential" else [])
    for name in ("block inputs captured", *streams, "statistics", "fits (SVDs, candidates)"):
        assert phases[name]["seconds"] > 0 and phases[name]["calls"] >= 1, name
    assert phases["fits (SVDs, candidates)"]["calls"] == 3 * 7  # one fit per layer, 7 a block
    if sequential == "sequential":  # the command line prints it and records it in the run
        src = tmp_path / "src"
        llama().model.save_pretrained(str(src))
        make_tokenizer(src, synthetic_sentences(200))
        text = tmp_path / "text.txt"
        text.write_text("\n".join(synthetic_sentences(200)))
        assert main(["compress", "--hf", str(src), "--ratio", "0.5", "--method", "whiten", "--calib",
                     str(text), "--seq-len", "16", "--calib-seqs", "8", "--profile",
                     "--out", str(tmp_path / "run")]) == 0
        assert "where the time went" in capsys.readouterr().out
        assert "statistics" in sc.read_info(tmp_path / "run").compression["profile"]


def test_cli_fisher_allocation_of_a_causal_lm_says_which_ranks_it_kept(tmp_path, capsys):
    texts = synthetic_sentences(400)
    src = tmp_path / "src"
    llama().model.save_pretrained(str(src))
    make_tokenizer(src, texts)
    text = tmp_path / "text.txt"
    text.write_text("\n".join(texts[:200]))
    out = tmp_path / "run"
    assert main(["compress", "--hf", str(src), "--ratio", "0.5", "--method", "whiten", "--allocation", "fisher",
                 "--calib", str(text), "--seq-len", "16", "--calib-seqs", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ranks: fisher allocation, kept the " in printed and "uniform " in printed
    saved = sc.read_info(out).compression
    assert saved["allocation"]["objective"] == "fisher" and saved["allocation"]["chosen"] in \
        saved["allocation"]["output_distance"]
    assert isinstance(sc.load(out), CausalLM)
