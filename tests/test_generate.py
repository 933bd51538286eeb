"""Generation from a compressed causal LM: `svdcompress generate` and generate() with the
Hugging Face key-value cache. Tiny random Llama, no downloads."""

import json

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402

import svdcompress as sc  # noqa: E402
from svdcompress.cli import main  # noqa: E402
from svdcompress.integrations.causal_lm import generate  # noqa: E402
from svdcompress.integrations.hf import synthetic_sentences  # noqa: E402

from .test_transformers import llama, make_tokenizer  # noqa: E402

RANK = 4


def low_rank_llama():
    """The tiny Llama with every block weight of rank RANK: factorised at RANK, it is exact."""
    model = llama()
    with torch.no_grad():
        for name, module in model.model.model.layers.named_modules():
            if isinstance(module, torch.nn.Linear):
                u, s, vh = torch.linalg.svd(module.weight, full_matrices=False)
                module.weight.copy_((u[:, :RANK] * s[:RANK]) @ vh[:RANK])
    return model


@pytest.fixture
def runs(tmp_path):
    src = tmp_path / "src"
    low_rank_llama().model.save_pretrained(str(src))
    make_tokenizer(src, synthetic_sentences(300))
    run = tmp_path / "run"
    assert main(["compress", "--hf", str(src), "--rank", str(RANK), "--out", str(run)]) == 0
    return src, run


PROMPT = "the quick model reads the long text and"


def test_a_compressed_run_generates_the_dense_models_tokens_at_full_rank(runs, capsys):
    src, run = runs
    compressed = sc.load(run)
    assert sum(type(m).__name__.startswith("LowRank") for m in compressed.modules()) == 3 * 7
    assert main(["generate", str(src), "--prompt", PROMPT, "--max-new-tokens", "12", "--json"]) == 0
    want = json.loads(capsys.readouterr().out)
    assert main(["generate", str(run), "--prompt", PROMPT, "--max-new-tokens", "12", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["new_tokens"] == want["new_tokens"] == 12
    assert got["continuation"] == want["continuation"] and got["text"].startswith(PROMPT.split()[0])
    # the key-value cache gives the tokens that recomputing the whole sequence gives
    g = generate(compressed, PROMPT, max_new_tokens=12)
    ids = compressed.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for token in g["tokens"]:
            nxt = int(compressed(ids)[0, -1].argmax())
            assert nxt == token
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    assert main(["generate", str(run), "--prompt", PROMPT, "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip().startswith(PROMPT.split()[0])


def test_sampling_is_seeded_and_does_not_touch_the_callers_random_state(runs):
    model = sc.load(runs[1])
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = generate(model, PROMPT, max_new_tokens=10, sample=True, seed=7)
    assert torch.rand(1) == before  # the caller's generator is untouched
    b = generate(model, PROMPT, max_new_tokens=10, sample=True, seed=7)
    assert a["tokens"] == b["tokens"]
    others = {tuple(generate(model, PROMPT, max_new_tokens=10, sample=True, seed=s)["tokens"])
              for s in range(5)}
    assert len(others) > 1


@pytest.mark.parametrize("args, message", [
    (["--prompt", ""], "prompt is empty"),
    (["--prompt", PROMPT, "--max-new-tokens", "100"], "longer than the model's 64 positions"),
    (["--prompt", PROMPT, "--sample", "--temperature", "0"], "temperature must be"),
    (["--prompt", PROMPT, "--max-new-tokens", "0"], "--max-new-tokens"),
    (["--prompt", PROMPT, "--max-new-tokens", "90"], "plus --max-new-tokens (90), in all 9"),
    (["--prompt", PROMPT, "--sample", "--seed", "9" * 25], "a seed must be from 0 to 2^32 - 1"),
    (["--prompt", PROMPT, "--sample", "--seed", str(2 ** 32)], "a seed must be"),
    (["--prompt", PROMPT, "--seed", "-1"], "a seed must be"),
    (["--prompt", "ab \udcff"], "not valid UTF-8"),
    (["--prompt", PROMPT, "--temperature", "0.5"], "add --sample"),
    (["--prompt", PROMPT, "--top-k", "5"], "add --sample"),  # (argv's undecodable bytes, surrogate-escaped)
])
def test_bad_generation_requests_are_one_line_and_status_2(runs, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        code = main(["generate", str(runs[1]), *args])
        raise SystemExit(code)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
