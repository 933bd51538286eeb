"""Real-model paths held to the guarantees: each case was found by a hostile probe of
`compress --hf`, `load`, `info`, `eval-lm`, `eval-embeddings` and `finetune --distill`
with tiny models built offline. Every one ends in one line on stderr and exit 2, or works;
none runs a model directory's code or scores a model with random weights."""

import io
import json
import shutil
import sys

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import svdcompress as sc  # noqa: E402
from svdcompress.cli import main  # noqa: E402
from svdcompress.integrations.causal_lm import load_causal_lm  # noqa: E402
from svdcompress.integrations.hf import synthetic_sentences  # noqa: E402
from tests.test_guarantees import one_line_exit_2  # noqa: E402
from tests.test_hf import WORDS  # noqa: E402
from tests.test_io import rehash  # noqa: E402
from tests.test_study import cli  # noqa: E402
from tests.test_transformers import MODELS, make_tokenizer  # noqa: E402

TEXTS = synthetic_sentences(300)
MARKER = "remote-code-ran"


def bert_dir(path, tokenizer=True, seed=0):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "?"] + WORDS
    path.mkdir(parents=True)
    if tokenizer:
        (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
        transformers.BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(str(path))
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(cfg).save_pretrained(str(path))
    return path


def lm_dir(path, name="llama", texts=TEXTS):
    MODELS[name]().model.save_pretrained(str(path))
    make_tokenizer(path, texts)
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-sources")
    text = root / "text.txt"
    text.write_text("\n".join(TEXTS[:200]))
    return {"bert": bert_dir(root / "bert"), "llama": lm_dir(root / "llama"),
            "gpt2": lm_dir(root / "gpt2", "gpt2"), "text": text}


@pytest.fixture(scope="module")
def runs(sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-runs")
    out = {"llama": root / "llama", "bert": root / "bert"}
    assert main(["compress", "--hf", str(sources["llama"]), "--ratio", "0.5", "--out",
                        str(out["llama"])]) == 0
    assert main(["compress", "--hf", str(sources["bert"]), "--ratio", "0.5", "--out",
                        str(out["bert"])]) == 0
    return out


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def with_remote_code(path, marker, model_type=None):
    """auto_map naming a module that leaves a marker file when it is imported."""
    (path / "custom_model.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import *  # noqa\n")
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom_model.CustomConfig",
                          "AutoModel": "custom_model.CustomModel",
                          "AutoModelForCausalLM": "custom_model.CustomModel"}
    if model_type:
        config["model_type"] = model_type
    (path / "config.json").write_text(json.dumps(config))
    tok = path / "tokenizer_config.json"
    if tok.is_file():  # and a custom tokenizer class from the same module
        tok_config = json.loads(tok.read_text())
        tok_config["auto_map"] = {"AutoTokenizer": ["custom_model.CustomTokenizer", None]}
        tok.write_text(json.dumps(tok_config))
    return path


# ---------------------------------------------------------------- 1. remote code

def test_remote_code_never_runs_from_any_entry_point_even_with_yes_on_stdin(
        sources, runs, tmp_path, capsys, monkeypatch):
    marker = tmp_path / MARKER
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 50))
    llama = with_remote_code(copy(sources["llama"], tmp_path / "llama"), marker)
    bert = with_remote_code(copy(sources["bert"], tmp_path / "bert"), marker)
    run = with_remote_code(copy(runs["llama"], tmp_path / "run"), marker)
    rehash(run)  # a run whose hashes were updated with the custom code in it
    text = sources["text"]
    calls = [
        ("compress", "--hf", llama, "--ratio", "0.5", "--out", tmp_path / "c1"),
        ("compress", "--hf", bert, "--ratio", "0.5", "--out", tmp_path / "c2"),
        ("info", run),
        ("eval-lm", run, "--reference", llama, "--text", text, "--window", "32", "--stride", "32"),
        ("eval-lm", runs["llama"], "--reference", llama, "--text", text, "--window", "32"),
        ("eval-embeddings", runs["bert"], "--reference", bert, "--sentences", "20"),
        ("finetune", runs["bert"], "--distill", "--teacher", bert, "--epochs", "1", "--quiet",
         "--calib-sentences", "16", "--out", tmp_path / "f"),
    ]
    for argv in calls:
        code, out, err = cli(capsys, *argv)
        assert code in (0, 2), (argv, err)
        assert "Do you wish" not in out + err
        assert not marker.exists(), argv
    with pytest.warns(UserWarning, match="never runs it"):
        sc.load(run)
    assert not marker.exists()
    # with a built-in model_type the custom class is replaced by the built-in one, with a warning
    code, _, err = cli(capsys, "compress", "--hf", llama, "--ratio", "0.5", "--out", tmp_path / "c3")
    assert code == 0 and "never runs it and loads transformers' built-in 'llama'" in err


def test_a_directory_that_needs_its_own_code_is_refused_in_one_line(sources, tmp_path, capsys):
    marker = tmp_path / MARKER
    src = with_remote_code(copy(sources["llama"], tmp_path / "custom"), marker, model_type="my-llama")
    one_line_exit_2(capsys, "compress", "--hf", src, "--ratio", "0.5", "--out", tmp_path / "c",
                    message="needs its own Python code")
    assert not marker.exists() and not (tmp_path / "c").exists()


# ---------------------------------------------------------------- 2. random weights

def test_a_missing_or_unexpected_tensor_in_the_source_is_refused_by_name(sources, tmp_path, capsys):
    src = copy(sources["llama"], tmp_path / "missing")
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.9.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    err = one_line_exit_2(capsys, "compress", "--hf", src, "--ratio", "0.5", "--out", tmp_path / "c",
                          message="model.layers.1.mlp.up_proj.weight")
    assert "model.layers.9.extra.weight" in err and "random weights" in err


def test_a_config_with_more_layers_than_the_weights_is_refused(sources, tmp_path, capsys):
    src = copy(sources["llama"], tmp_path / "deeper")
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (src / "config.json").write_text(json.dumps(config))
    one_line_exit_2(capsys, "compress", "--hf", src, "--ratio", "0.5", "--out", tmp_path / "c",
                    message="lacks tensor(s) model.layers.3")


def test_save_pretrained_of_a_compressed_model_is_refused_as_a_source(sources, tmp_path, capsys):
    model = load_causal_lm(sources["llama"])
    sc.compress_(model, sc.SVDConfig(ratio=0.5))
    src = tmp_path / "factored"
    model.model.save_pretrained(str(src))
    make_tokenizer(src, TEXTS)
    one_line_exit_2(capsys, "compress", "--hf", src, "--ratio", "0.5", "--out", tmp_path / "c",
                    message="look like svdcompress factors")


def test_eval_references_must_be_the_dense_model_of_the_same_architecture(sources, runs, tmp_path, capsys):
    text = sources["text"]
    one_line_exit_2(capsys, "eval-lm", runs["llama"], "--reference", runs["llama"], "--text", text,
                    message="is a compressed svdcompress run")
    one_line_exit_2(capsys, "eval-lm", runs["llama"], "--reference", sources["gpt2"], "--text", text,
                    message="is not the architecture of the run")
    one_line_exit_2(capsys, "eval-embeddings", runs["bert"], "--reference", runs["bert"],
                    message="is a compressed svdcompress run")
    other = bert_dir(tmp_path / "wider")
    config = json.loads((other / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (other / "config.json").write_text(json.dumps(config))
    tensors = {k: v for k, v in load_file(other / "model.safetensors").items() if "layer.1." not in k}
    save_file(tensors, str(other / "model.safetensors"), metadata={"format": "pt"})
    one_line_exit_2(capsys, "eval-embeddings", runs["bert"], "--reference", other,
                    message="num_hidden_layers is 1")


# ---------------------------------------------------------------- 3. other tokens

def test_a_reference_with_another_tokenizer_is_refused(sources, runs, tmp_path, capsys):
    ref = copy(sources["llama"], tmp_path / "retokenized")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (ref / name).unlink(missing_ok=True)
    make_tokenizer(ref, list(reversed(TEXTS))[:40])  # same weights, other word ids
    one_line_exit_2(capsys, "eval-lm", runs["llama"], "--reference", ref, "--text", sources["text"],
                    message="tokenizer of")
    code, out, _ = cli(capsys, "eval-lm", runs["llama"], "--reference", sources["llama"], "--text",
                       sources["text"], "--window", "32", "--stride", "32")
    assert code == 0 and "perplexity" in out


# ---------------------------------------------------------------- 4. unlisted files

@pytest.mark.parametrize("name", ["added_tokens.json", "special_tokens_map.json", "chat_template.jinja",
                                  "modeling_custom.py"])
def test_a_file_a_loader_would_read_dropped_into_a_run_is_refused(runs, tmp_path, capsys, name):
    run = copy(runs["llama"], tmp_path / "run")
    (run / name).write_text(json.dumps({"[NEW]": 10_000}) if name.endswith("json") else "x")
    for argv in (("info", run), ("eval-lm", run, "--reference", run, "--text", run / name)):
        one_line_exit_2(capsys, *argv, message="is not listed in svdcompress.json")
    with pytest.raises(sc.FormatError, match="added after the run was written"):
        sc.load(run)


def test_other_files_beside_a_run_change_nothing(runs, tmp_path, capsys):
    run = copy(runs["llama"], tmp_path / "run")
    (run / "results.json").write_text("{}")  # what sweep or bench may write beside a run
    assert cli(capsys, "info", run)[0] == 0


# ---------------------------------------------------------------- 5. tokenizers

def test_an_encoder_without_a_tokenizer_is_refused(tmp_path, capsys):
    src = bert_dir(tmp_path / "bare", tokenizer=False)
    one_line_exit_2(capsys, "compress", "--hf", src, "--ratio", "0.5", "--method", "whiten",
                    "--out", tmp_path / "c", message="has no tokenizer")


def test_a_corrupt_tokenizer_is_reported_as_corrupt(sources, tmp_path, capsys):
    for name in ("bert", "llama"):
        src = copy(sources[name], tmp_path / name)
        (src / "tokenizer.json").write_text("{ not json")
        one_line_exit_2(capsys, "compress", "--hf", src, "--ratio", "0.5", "--out", tmp_path / f"c-{name}",
                        message="is corrupt or unreadable")


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(sources, tmp_path, capsys):
    src = copy(sources["llama"], tmp_path / "extra-tokens")
    tok = transformers.AutoTokenizer.from_pretrained(str(src))
    tok.add_tokens([f"newword{i}" for i in range(200)])
    tok.save_pretrained(str(src))
    one_line_exit_2(capsys, "compress", "--hf", src, "--ratio", "0.5", "--out", tmp_path / "c",
                    message="more than the model's vocabulary")


# ---------------------------------------------------------------- 6, 7. one line, never a traceback

@pytest.mark.parametrize("value,message", [
    ("tpu9", "unknown device 'tpu9'"), ("meta", "not supported"),
    pytest.param("cuda", "CUDA is not available", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this machine has CUDA"))])
def test_a_device_that_cannot_be_used_is_one_line(sources, tmp_path, capsys, value, message):
    for method in ("plain", "whiten"):
        one_line_exit_2(capsys, "compress", "--hf", sources["llama"], "--ratio", "0.5", "--method", method,
                        "--calib", sources["text"], "--device", value, "--out", tmp_path / "c",
                        message=message)
    with pytest.raises(sc.ConfigError, match=message):
        sc.compress_(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)),
                     sc.SVDConfig(rank=2), device=value)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_sequences_longer_than_the_models_positions_are_one_line(sources, runs, tmp_path, capsys, name):
    one_line_exit_2(capsys, "compress", "--hf", sources[name], "--ratio", "0.5", "--method", "whiten",
                    "--calib", sources["text"], "--seq-len", "65", "--out", tmp_path / "c",
                    message="--seq-len 65 is longer than the model's 64 positions")
    one_line_exit_2(capsys, "eval-lm", runs["llama"], "--reference", sources["llama"], "--text",
                    sources["text"], "--window", "65", message="--window 65 is longer")


def test_too_few_sentences_to_compare_embeddings_is_one_line(sources, runs, capsys):
    one_line_exit_2(capsys, "eval-embeddings", runs["bert"], "--reference", sources["bert"],
                    "--sentences", "11", message="at least 12 sentences")


def corrupt_header(path):
    raw = bytearray(path.read_bytes())
    raw[8:20] = b"#" * 12
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
     "cannot load the"),
    (lambda d: corrupt_header(d / "model.safetensors"), "cannot load the"),
    (lambda d: (d / "config.json").write_text(
        (d / "config.json").read_text().replace('"hidden_size": 32', '"hidden_size": 48')),
     "do not fit its config"),
    (lambda d: (d / "config.json").write_text(
        (d / "config.json").read_text().replace('"model_type": "llama"', '"model_type": "llama9"')),
     "which transformers"),
    (lambda d: (d / "config.json").write_text("[1, 2]"), "must hold a JSON object"),
    (lambda d: (d / "model.safetensors").unlink(), "holds no .safetensors weights"),
])
def test_a_damaged_source_directory_is_one_line(sources, tmp_path, capsys, damage, message):
    src = copy(sources["llama"], tmp_path / "src")
    damage(src)
    one_line_exit_2(capsys, "compress", "--hf", src, "--ratio", "0.5", "--out", tmp_path / "c", message=message)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("modules", ["{", "[1, 2]", '[{"type": 3}]', '[{"type": "x.Pooling", "path": "nope"}]',
                                     '[{"type": "x.Transformer", "path": "../../etc"}]'])
def test_a_malformed_modules_json_is_one_line(sources, tmp_path, capsys, modules):
    src = copy(sources["bert"], tmp_path / "st")
    (src / "modules.json").write_text(modules)
    one_line_exit_2(capsys, "compress", "--hf", src, "--ratio", "0.5", "--out", tmp_path / "c",
                    message=str(src))


def test_a_missing_reference_is_one_line_of_ours_and_no_progress_bar_is_shown(sources, runs, tmp_path, capsys):
    err = one_line_exit_2(capsys, "eval-lm", runs["llama"], "--reference", tmp_path / "nowhere",
                          "--text", sources["text"], message="not a Hugging Face model directory")
    assert "huggingface.co" not in err
    code, _, err = cli(capsys, "compress", "--hf", sources["llama"], "--ratio", "0.5", "--out", tmp_path / "c")
    assert code == 0 and "Loading weights" not in err
