"""Helper script for test_train: one fit() on a fixed problem, run alone or under torchrun.

Usage: python ddp_fit_script.py OUTPUT.pt  (rank 0 saves the final weights and history)
"""
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fundus_lib.train import _rank, fit, init_distributed


class DictDataset(TensorDataset):
    def __getitem__(self, index):
        image, label = super().__getitem__(index)
        return {"image": image, "label": label}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x):
        return {"logits": self.body(x)}


def main(output: str) -> None:
    init_distributed()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(32, 3, 2, 2, generator=generator)
    labels = torch.randint(0, 3, (32,), generator=generator)
    torch.manual_seed(1)
    model = Net()
    loader = DataLoader(DictDataset(images, labels), batch_size=8, shuffle=False)
    history = fit(model, lambda out, batch: nn.functional.cross_entropy(out["logits"], batch["label"]), loader,
                  epochs=3, optimizer=torch.optim.SGD(model.parameters(), lr=0.5), device="cpu", progress=False)
    if _rank() == 0:
        torch.save({"model": model.state_dict(), "train_loss": history["train_loss"].tolist()}, output)


if __name__ == "__main__":
    main(sys.argv[1])
