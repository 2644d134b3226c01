"""Helper for test_training_faults: train a small grader with fit(resume="auto") and optionally die.

    python fit_until_killed.py DATA_ROOT CHECKPOINT_DIR OUTPUT.pt --workers 2 [--kill-at-batch N | --kill-in-save N]

``--kill-at-batch N`` sends SIGKILL to this process at the N-th training batch (counted over
the whole run); ``--kill-in-save N`` writes half of the N-th checkpoint and then sends SIGKILL.
Without a kill option the run finishes and saves the final weights to OUTPUT.pt.
"""
import argparse
import io
import os
import signal

import torch
from torch import nn

from fundus_lib import train
from fundus_lib.data.pipeline import make_loaders, synthetic_benchmark


class TinyGrader(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU(), nn.Dropout(0.2), nn.Flatten(),
                                  nn.LazyLinear(5))

    def forward(self, x):
        return {"dr": self.body(x)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data_root")
    parser.add_argument("checkpoint_dir")
    parser.add_argument("output")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data-path", default="stream")
    parser.add_argument("--kill-at-batch", type=int)
    parser.add_argument("--kill-in-save", type=int)
    args = parser.parse_args()

    manifest = synthetic_benchmark(8, 4, 2, 32, seed=0, root=args.data_root)
    loaders = make_loaders(manifest, ("dr",), image_size=32, batch_size=4, num_workers=args.workers, seed=0,
                           data_path=args.data_path)
    torch.manual_seed(0)
    model = TinyGrader()
    model(torch.zeros(1, 3, 32, 32))  # materialise the lazy layer before the optimizer sees it
    calls = {"batch": 0, "save": 0}

    def loss_fn(outputs, batch):
        calls["batch"] += 1
        if calls["batch"] == args.kill_at_batch:
            os.kill(os.getpid(), signal.SIGKILL)
        return nn.functional.cross_entropy(outputs["dr"], batch["dr"])

    real_save = torch.save

    def dying_save(state, stream):
        calls["save"] += 1
        if calls["save"] == args.kill_in_save:
            buffer = io.BytesIO()
            real_save(state, buffer)
            stream.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            stream.flush()
            os.fsync(stream.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        real_save(state, stream)

    torch.save = dying_save
    history = train.fit(model, loss_fn, loaders["train"], loaders["val"], epochs=4, lr=1e-2, device="cpu",
                        checkpoint_dir=args.checkpoint_dir, resume="auto", restore_best=False, progress=False)
    torch.save = real_save
    torch.save({"model": model.state_dict(), "train_loss": history["train_loss"].tolist()}, args.output)


if __name__ == "__main__":
    main()
