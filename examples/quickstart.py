"""The API example of README.md and docs/api.md: compress a model, save it, load it back, compare outputs."""

import tempfile

import torch

import svdcompress as sc
from svdcompress.study import MLP

torch.manual_seed(0)
model = MLP(784, [1024] * 5, 10)                  # the study's reference network
report = sc.compress_(model, sc.SVDConfig(rank=20))  # every layer but the classifier
print(report)

with tempfile.TemporaryDirectory() as run:
    sc.save(model, run)                              # model.safetensors + svdcompress.json
    loaded = sc.load(run)                            # rebuilt from the JSON, no pickle
    x = torch.randn(8, 784)
    assert torch.equal(loaded(x), model(x))
    print("save -> load round trip: identical outputs")
