"""Recovery training of a compressed causal LM: tiny random Llama, text built in the test."""

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import svdcompress as sc  # noqa: E402
from svdcompress.core.io import dense_origin  # noqa: E402
from svdcompress.integrations import recover_lm as recover_module  # noqa: E402
from svdcompress.integrations.causal_lm import load_causal_lm, token_ids  # noqa: E402
from svdcompress.integrations.recover_lm import held_out_scores, split_sequences, trainable  # noqa: E402
from tests.test_guarantees import one_line_exit_2  # noqa: E402
from tests.test_hf_guarantees import TEXTS, lm_dir  # noqa: E402
from tests.test_study import cli  # noqa: E402

ARGS = ["--seq-len", "16", "--batch-size", "4", "--accumulate", "2", "--lr", "3e-3", "--quiet"]


def trained_teacher(src, text, steps=150):
    """Train the tiny random model on the text for a moment: a teacher with opinions (a
    random one predicts nearly uniformly, and compression hardly changes that)."""
    model = load_causal_lm(src)
    seqs, _ = split_sequences(token_ids(model, text), 16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = seqs[torch.randint(0, len(seqs), (16,), generator=g)]
        loss = torch.nn.functional.cross_entropy(model(x)[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.model.save_pretrained(str(src))


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    from svdcompress.cli import main
    root = tmp_path_factory.mktemp("recover")
    src = lm_dir(root / "src")
    text = root / "text.txt"
    text.write_text("\n".join(TEXTS))
    trained_teacher(src, text)
    run = root / "run"
    assert main(["compress", "--hf", str(src), "--ratio", "0.3", "--out", str(run)]) == 0
    return root, src, text, run


def test_recovery_lowers_the_held_out_kl_to_the_teacher_and_trains_only_the_factors(compressed, tmp_path, capsys):
    root, src, text, run = compressed
    student, teacher = sc.load(run), load_causal_lm(src)
    _, held = split_sequences(token_ids(student, text), 16)
    before = held_out_scores(student, teacher, held, 8)
    code, out, err = cli(capsys, "finetune", run, "--distill", "--text", text, "--epochs", 2,
                         "--out", tmp_path / "rec", *ARGS)
    assert code == 0, err
    history = sc.read_info(tmp_path / "rec").history
    assert len(history) == 2 and history[-1]["held_out_kl"] < 0.8 * before["held_out_kl"]
    assert history[-1]["held_out_perplexity"] < before["held_out_perplexity"]
    trained, original = load_file(tmp_path / "rec" / "model.safetensors"), load_file(run / "model.safetensors")
    for key in original:  # factors moved, everything else (embeddings, norms) is the run's
        changed = not torch.equal(trained[key], original[key])
        assert changed == key.endswith((".u", ".v")), key


def test_a_recovered_run_recovers_again_from_the_dense_model_it_descends_from(compressed, tmp_path, capsys):
    # its source is the compressed run, not a dense model: the teacher is found through the
    # chain of runs (a probe's finding: a second round of recovery was refused)
    root, src, text, run = compressed
    first = ["--text", text, "--max-sequences", 8, "--epochs", 1, *ARGS]
    assert cli(capsys, "finetune", run, "--out", tmp_path / "rec", *first)[0] == 0
    assert cli(capsys, "quantize", tmp_path / "rec", "--out", tmp_path / "q")[0] == 0
    assert dense_origin(tmp_path / "q") == dense_origin(tmp_path / "rec") == str(src.resolve())
    code, out, err = cli(capsys, "finetune", tmp_path / "rec", "--distill", "--out", tmp_path / "rec2", *first)
    assert code == 0, err
    assert sc.read_info(tmp_path / "rec2").distill["teacher"] == str(src.resolve())


def test_a_recovery_that_fails_before_training_leaves_no_partial_directory(compressed, tmp_path, capsys):
    root, src, text, run = compressed
    one_line_exit_2(capsys, "finetune", run, "--teacher", tmp_path / "missing", "--text", text,
                    "--out", tmp_path / "rec", *ARGS, message="does not exist")
    assert not (tmp_path / "rec.partial").exists() and not (tmp_path / "rec").exists()


def test_recovery_without_distill_trains_on_the_next_tokens(compressed, tmp_path, capsys):
    _, _, text, run = compressed
    code, _, err = cli(capsys, "finetune", run, "--text", text, "--out", tmp_path / "ce", *ARGS)
    assert code == 0, err
    assert sc.read_info(tmp_path / "ce").distill["alpha"] == 0.0


def test_a_killed_recovery_resumes_to_the_same_weights(compressed, tmp_path, capsys, monkeypatch):
    _, _, text, run = compressed
    argv = ["finetune", run, "--distill", "--text", text, "--epochs", 3, *ARGS]
    assert cli(capsys, *argv, "--out", tmp_path / "whole")[0] == 0
    real = recover_module.save_checkpoint

    def save_then_stop(*args, **kwargs):  # killed right after epoch 2's checkpoint
        real(*args, **kwargs)
        if args[3] == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(recover_module, "save_checkpoint", save_then_stop)
    assert cli(capsys, *argv, "--out", tmp_path / "cut")[0] == 130
    assert not (tmp_path / "cut").exists()
    monkeypatch.setattr(recover_module, "save_checkpoint", real)
    one_line_exit_2(capsys, *argv, "--out", tmp_path / "cut", "--lr", "1e-2", "--resume",
                    message="lr=0.003")
    assert cli(capsys, *argv, "--out", tmp_path / "cut", "--resume")[0] == 0
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    kl = lambda run: [h["held_out_kl"] for h in sc.read_info(run).history]  # noqa: E731
    assert kl(tmp_path / "cut") == kl(tmp_path / "whole")


def test_bad_recovery_settings_are_one_line(compressed, tmp_path, capsys):
    root, src, text, run = compressed
    short = tmp_path / "short.txt"
    short.write_text(TEXTS[0])
    one_line_exit_2(capsys, "finetune", run, "--distill", "--out", tmp_path / "a", *ARGS, message="--text FILE")
    one_line_exit_2(capsys, "finetune", run, "--text", short, "--out", tmp_path / "b", *ARGS,
                    message="needs at least 10")
    one_line_exit_2(capsys, "finetune", run, "--text", text, "--out", tmp_path / "c", *ARGS[:-1],
                    "--seq-len", "65", message="longer than the model's 64 positions")
    one_line_exit_2(capsys, "finetune", run, "--text", text, "--out", tmp_path / "d", *ARGS,
                    "--train-also", "(", message="not a valid regex")
    other = lm_dir(tmp_path / "gpt2", "gpt2")
    one_line_exit_2(capsys, "finetune", run, "--distill", "--teacher", other, "--text", text,
                    "--out", tmp_path / "e", *ARGS, message="is not the architecture of the run")


def test_only_factors_and_what_train_also_names_are_trainable(compressed):
    model = sc.load(compressed[3])
    chosen = {id(p) for p in trainable(model, r".*norm.*")}
    names = {n for n, p in model.named_parameters() if id(p) in chosen}
    assert any(n.endswith(".u") for n in names) and any("norm" in n for n in names)
    assert not any("embed_tokens" in n for n in names)


def test_a_few_training_sequences_are_scored_on_as_few_held_out_ones(compressed):
    _, src, text, run = compressed
    student, teacher = sc.load(run), load_causal_lm(src)
    calls = []
    real = recover_module.held_out_scores
    recover_module.held_out_scores = lambda s, t, held, b: calls.append(len(held)) or real(s, t, held, b)
    try:
        recover_module.recover_lm(student, teacher, token_ids(student, text),
                                  recover_module.LMTrainConfig(seq_len=16, max_sequences=18),
                                  recover_module.Distill(1.0, 1.0),
                                  progress=False)
    finally:
        recover_module.held_out_scores = real
    assert calls == [2]  # ceil(18 / 9)


def test_alternating_factors_train_u_then_v(compressed, tmp_path, capsys, monkeypatch):
    """--factors alternate (SVD-LLM's order): the first half of the optimiser steps moves only
    the output factors u, the second half only the input factors v (the phase is a function
    of the step's position, so a resumed run keeps it), and two runs end alike."""
    _, _, text, run = compressed
    original = load_file(run / "model.safetensors")
    argv = ["finetune", run, "--distill", "--text", text, "--factors", "alternate", *ARGS]
    assert cli(capsys, *argv, "--epochs", 2, "--out", tmp_path / "half", "--max-sequences", 8)[0] == 0
    # 2 epochs of 1 step each (8 sequences, 4 x 2 per step): epoch 1 is u's, epoch 2 is v's
    whole = load_file(tmp_path / "half" / "model.safetensors")
    real = recover_module.save_checkpoint
    first = {}

    def keep_first(*args, **kwargs):
        real(*args, **kwargs)
        if args[3] == 1:
            first.update({k: v.detach().clone() for k, v in args[1].state_dict().items()})
    monkeypatch.setattr(recover_module, "save_checkpoint", keep_first)
    assert cli(capsys, *argv, "--epochs", 2, "--out", tmp_path / "again", "--max-sequences", 8)[0] == 0
    names = [k for k in original if k.endswith((".u", ".v"))]
    assert names
    for key in names:
        state_key = next(k for k in first if k.endswith(key.split("model.", 1)[-1]) or k == key)
        moved_first = not torch.equal(first[state_key], original[key])
        assert moved_first == key.endswith(".u"), key  # after epoch 1: u moved, v did not
        moved_second = not torch.equal(whole[key], first[state_key])
        assert moved_second == key.endswith(".v"), key  # epoch 2 moved v only
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert all(torch.equal(again[k], whole[k]) for k in whole)  # deterministic
    with pytest.raises(ValueError, match="factors"):
        recover_module.LMTrainConfig(factors="u")
