"""Run by tests/test_distributed.py under torchrun (or alone): one job, its result saved
per rank, so the test can compare processes bit for bit and against one process."""

import sys

import torch
from safetensors.torch import save_file

import svdcompress as sc
from svdcompress.core import dist
from svdcompress.study import MLP
from svdcompress.study.data import Dataset
from svdcompress.study.train import TrainConfig, train


def data(n=256, features=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()
    return Dataset("synthetic", x[:200], y[:200], x[200:], y[200:], 0.0, 1.0)


def dynamic(out):
    torch.manual_seed(0)
    model = MLP(20, [32, 32], 3)
    sc.project_(model, 4)
    train(model, data(), TrainConfig(epochs=2, lr=3e-3, batch_size=32), progress=False)
    model.train()
    tensors = {}
    for name, m in model.named_modules():
        if isinstance(m, sc.ProjectedLinear):
            with torch.no_grad():
                u, v = m.factors()  # one more tracker step, as the next forward would take
            tensors[f"{name}.u"], tensors[f"{name}.v"] = u.contiguous(), v.contiguous()
    return tensors


def calibration(out):
    torch.manual_seed(0)
    model = MLP(20, [32, 32], 3)
    batches = [torch.randn(16, 20, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    sc.compress_(model, sc.SVDConfig(rank=5, method="whiten"), batches)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def blockwise(out):
    import transformers

    from svdcompress.integrations.causal_lm import CausalLM
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                   max_position_embeddings=64)
    model = CausalLM(transformers.LlamaForCausalLM(cfg).eval(), 64)
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 100, (2, 12), generator=g)} for _ in range(6)]
    sc.compress_(model, sc.SVDConfig(ratio=0.4, method="whiten"), batches)
    return {k: v.contiguous() for k, v in model.state_dict().items() if "rotary" not in k}


if __name__ == "__main__":
    job, out = sys.argv[1], sys.argv[2]
    dist.setup()
    tensors = {"dynamic": dynamic, "calibration": calibration, "blockwise": blockwise}[job](out)
    save_file(tensors, f"{out}-rank{dist.rank()}.safetensors")
    dist.teardown()
