"""fundus_lib.train: the one training loop (learning, selection, checkpoints, resume, NaN, DDP)."""
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import fundus_lib.train as train_module
from fundus_lib.train import EpochMeter, NonFiniteLossError, evaluate, fit, load_checkpoint, predict
from tests.unit.ddp_fit_script import DictDataset


class Net(nn.Module):
    """A tiny classifier with dropout, so resume must restore RNG state to replay exactly."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3))

    def forward(self, x):
        return {"logits": self.body(x)}


def cross_entropy(outputs, batch):
    loss = nn.functional.cross_entropy(outputs["logits"], batch["label"])
    return loss, {"ce": loss}


def accuracy(outputs, targets):
    return {"acc": float((outputs["logits"].argmax(1) == targets["label"]).mean())}


def loaders(n=48, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=generator)
    images = torch.randn(n, 3, 2, 2, generator=generator) * 0.5 + labels.view(-1, 1, 1, 1).float()
    train = DataLoader(DictDataset(images, labels), batch_size=8, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))
    val = DataLoader(DictDataset(images[:16], labels[:16]), batch_size=8)
    return train, val


def test_fit_learns_and_returns_a_history_table():
    torch.manual_seed(0)
    train, val = loaders()
    history = fit(Net(), cross_entropy, train, val, epochs=6, lr=1e-2, metrics_fn=accuracy, device="cpu",
                  progress=False)
    for column in ("epoch", "train_loss", "train_ce", "val_loss", "val_ce", "val_acc", "lr", "seconds",
                   "images_per_s"):
        assert column in history.columns
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0] * 0.7
    assert history["val_acc"].iloc[-1] > 0.6
    assert history.attrs["monitor"] == "val_loss" and history.attrs["best_epoch"] is not None


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(tmp_path):
    def run(checkpoint_dir, epochs, resume=False, stop_after=None):
        torch.manual_seed(0)
        train, val = loaders()
        model = Net()

        def interrupt(epoch, row, model):
            if epoch == stop_after:
                raise KeyboardInterrupt

        scheduler = lambda opt, steps: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        history = fit(model, cross_entropy, train, val, epochs=epochs, lr=1e-2, scheduler=scheduler,
                      scheduler_interval="batch", device="cpu", checkpoint_dir=checkpoint_dir, resume=resume,
                      restore_best=False, callbacks=[interrupt] if stop_after else [], progress=False)
        return model, history

    whole_model, whole_history = run(tmp_path / "whole", epochs=5)
    with pytest.raises(KeyboardInterrupt):  # during epoch 3's callbacks: its checkpoint is never written
        run(tmp_path / "cut", epochs=5, stop_after=3)
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 2
    resumed_model, resumed_history = run(tmp_path / "cut", epochs=5, resume=True)
    assert list(resumed_history["epoch"]) == [1, 2, 3, 4, 5]
    np.testing.assert_array_equal(resumed_history["train_loss"], whole_history["train_loss"])
    for name, tensor in whole_model.state_dict().items():
        assert torch.equal(tensor, resumed_model.state_dict()[name]), name


def test_resume_keeps_what_a_callback_changed_the_dual_loss_phase(tmp_path):
    """DualLossSchedule switches in its callback after the epoch whose end drops the rate: a run resumed
    from that epoch's checkpoint must train the next epoch with the dual loss, like an uninterrupted run."""
    from fundus_lib.losses import DualLossSchedule

    def segmenter():
        return nn.Sequential(nn.Conv2d(3, 2, 3, padding=1))

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = segmenter()

        def forward(self, x):
            masks = self.net(x)
            return {"masks": masks, "presence": masks.amax(dim=(2, 3))}

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(16, 3, 8, 8, generator=generator)
    masks = (images[:, :2] > 0.5).float()
    batches = [{"image": images[i:i + 4], "masks": masks[i:i + 4], "lesion_present": masks[i:i + 4].amax(dim=(2, 3)),
                "mask_valid": torch.ones(4, 2)} for i in range(0, 16, 4)]

    def run(checkpoint_dir, epochs, resume=False):
        torch.manual_seed(0)
        model, schedule = Wrap(), DualLossSchedule()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        drop = lambda opt, steps: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)  # after epoch 2
        fit(model, schedule, batches, epochs=epochs, optimizer=optimizer, scheduler=drop, device="cpu",
            checkpoint_dir=checkpoint_dir, resume=resume, restore_best=False, callbacks=[schedule.watch(optimizer)],
            progress=False)
        return model, schedule

    whole_model, whole_schedule = run(tmp_path / "whole", epochs=4)
    run(tmp_path / "cut", epochs=2)
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["loss"]["phase"] == "dual"
    resumed_model, resumed_schedule = run(tmp_path / "cut", epochs=4, resume=True)
    assert whole_schedule.phase == resumed_schedule.phase == "dual"
    for name, tensor in whole_model.state_dict().items():
        assert torch.equal(tensor, resumed_model.state_dict()[name]), name


def test_resume_true_without_checkpoint_is_an_error(tmp_path):
    train, _ = loaders()
    with pytest.raises(FileNotFoundError, match="last.pt"):
        fit(Net(), cross_entropy, train, epochs=1, device="cpu", checkpoint_dir=tmp_path, resume=True,
            progress=False)


def test_non_finite_loss_names_epoch_and_batch_and_keeps_last_good_checkpoint(tmp_path):
    calls = {"n": 0}
    train, _ = loaders()  # 6 batches per epoch

    def exploding(outputs, batch):
        calls["n"] += 1
        loss = nn.functional.cross_entropy(outputs["logits"], batch["label"])
        return loss * float("nan") if calls["n"] == 6 + 3 else loss

    with pytest.raises(NonFiniteLossError, match=r"epoch 2, batch 3.*last\.pt"):
        fit(Net(), exploding, train, epochs=3, device="cpu", checkpoint_dir=tmp_path, progress=False)
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1


def test_early_stopping_and_best_checkpoint_use_the_validation_metric(tmp_path):
    scores = iter([0.5, 0.8, 0.6, 0.7, 0.9, 0.95])
    train, val = loaders()
    model = Net()
    history = fit(model, cross_entropy, train, val, epochs=6, metrics_fn=lambda o, t: {"score": next(scores)},
                  monitor="val_score", early_stopping_patience=2, device="cpu", checkpoint_dir=tmp_path,
                  progress=False)
    assert list(history["epoch"]) == [1, 2, 3, 4]
    assert history.attrs["best_epoch"] == 2 and history.attrs["stopped_early"]
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["epoch"] == 2
    for name, tensor in model.state_dict().items():  # restore_best loaded the epoch-2 weights
        assert torch.equal(tensor, best["model"][name])


def test_model_selection_refuses_anything_but_validation_columns():
    train, val = loaders()
    with pytest.raises(ValueError, match="validation column"):
        fit(Net(), cross_entropy, train, val, epochs=1, monitor="test_acc", device="cpu", progress=False)
    with pytest.raises(ValueError, match="needs a val_loader"):
        fit(Net(), cross_entropy, train, None, epochs=1, monitor="val_acc", device="cpu", progress=False)


def test_gradient_clipping_bounds_the_update():
    torch.manual_seed(0)
    train, _ = loaders(n=8)
    model = Net()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    fit(model, cross_entropy, train, epochs=1, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        grad_clip_norm=1e-3, device="cpu", progress=False)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert 0 < torch.linalg.vector_norm(after - before) <= 1e-3 + 1e-9


def test_epoch_scheduler_steps_once_per_epoch_and_history_shows_the_lr_each_epoch_used():
    train, _ = loaders()
    scheduler = lambda opt, steps: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    history = fit(Net(), cross_entropy, train, epochs=3, lr=0.1, scheduler=scheduler, device="cpu", progress=False)
    np.testing.assert_allclose(history["lr"], [0.1, 0.05, 0.025])


def test_predict_and_evaluate_return_numpy_and_floats():
    train, val = loaders()
    model = Net()
    outputs, targets = predict(model, val, device="cpu", progress=False)
    assert outputs["logits"].shape == (16, 3) and isinstance(outputs["logits"], np.ndarray)
    assert targets["label"].shape == (16,) and "image" not in targets
    results = evaluate(model, val, loss_fn=cross_entropy, metrics_fn=accuracy, device="cpu", progress=False)
    assert set(results) == {"loss", "ce", "acc"} and all(isinstance(v, float) for v in results.values())
    expected = float(nn.functional.cross_entropy(torch.from_numpy(outputs["logits"]),
                                                 torch.from_numpy(targets["label"])))
    assert results["loss"] == pytest.approx(expected, rel=1e-5)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_ddp_with_two_gloo_processes_matches_one_process_on_the_same_global_batch(tmp_path):
    script = Path(__file__).with_name("ddp_fit_script.py")
    single = subprocess.run([sys.executable, str(script), str(tmp_path / "one.pt")], capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={_free_port()}", "--master_addr=127.0.0.1", str(script),
                             str(tmp_path / "two.pt")], capture_output=True, text=True, timeout=240)
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    np.testing.assert_allclose(two["train_loss"], one["train_loss"], rtol=1e-5)
    for name, tensor in one["model"].items():
        torch.testing.assert_close(two["model"][name], tensor, rtol=1e-5, atol=1e-6)


#: Tensor methods that read a value back to the host (a device synchronisation on a GPU).
HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__")


def count_host_reads(monkeypatch, run) -> int:
    """Host reads made by fundus_lib/train.py itself while ``run()`` executes (torch internals and
    the user's loss are not counted: only the loop's own code)."""
    counts = Counter()
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _original=original, _name=name, **kwargs):
            if sys._getframe(1).f_code.co_filename == train_module.__file__:
                counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    try:
        run()
    finally:
        monkeypatch.undo()
    return sum(counts.values())


def test_host_synchronisations_do_not_grow_with_the_number_of_batches(monkeypatch):
    def run(n, check_every=train_module.CHECK_EVERY):
        train, val = loaders(n=n)
        return lambda: fit(Net(), cross_entropy, train, val, epochs=2, metrics_fn=accuracy, device="cpu",
                           progress=False, check_every=check_every)

    six_batches = count_host_reads(monkeypatch, run(48))
    twelve_batches = count_host_reads(monkeypatch, run(96))
    assert six_batches == twelve_batches > 0
    # the counter does see per-batch reads: checking the flag every batch adds one read per batch
    assert count_host_reads(monkeypatch, run(96, check_every=1)) >= twelve_batches + 2 * 12 - 2


def test_epoch_reduction_packs_its_tensors_on_the_training_device(monkeypatch):
    """NCCL only reduces CUDA tensors: every collective must use the model's device, never the CPU."""
    device = torch.device("meta")  # any non-CPU device shows where the tensors were made
    meter = EpochMeter(device)
    meter.add(torch.ones((), device=device), {"ce": torch.ones((), device=device)}, 4)
    reduced = []
    monkeypatch.setattr(train_module.dist, "all_reduce", lambda tensor, op=None: reduced.append(tensor.device))
    meter.all_reduce()
    monkeypatch.setattr(train_module, "_is_distributed", lambda: True)
    with pytest.raises(NotImplementedError):  # reading a meta tensor back fails after the reduction ran
        meter.first_bad()
    assert len(reduced) == 2 and all(d == device for d in reduced), reduced


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = Net()

    def forward(self, x):
        logits = self.net(x)["logits"]
        return {"logits": logits, "attention": logits[:, :, None].repeat(1, 1, 64)}


def test_predict_collects_only_the_outputs_asked_for_as_float32():
    _, val = loaders()
    outputs, targets = predict(TwoHeads(), val, device="cpu", keys=["logits"], progress=False)
    assert set(outputs) == {"logits"} and outputs["logits"].dtype == np.float32
    assert set(targets) == {"label"}
    everything, _ = predict(TwoHeads(), val, device="cpu", progress=False)
    assert set(everything) == {"logits", "attention"}


class TinyGrader(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(8, 5))

    def forward(self, x):
        return {"dr": self.body(x)}


def test_fit_and_predict_over_the_in_memory_path(tmp_path):
    from fundus_lib.data.pipeline import make_loaders, synthetic_benchmark

    manifest = synthetic_benchmark(24, 8, 8, 32, seed=1, root=tmp_path)
    data = make_loaders(manifest, ("dr",), image_size=32, batch_size=8, data_path="memory")
    model = TinyGrader()
    loss = lambda out, batch: nn.functional.cross_entropy(out["dr"], batch["dr"])  # noqa: E731
    history = fit(model, loss, data["train"], data["val"], epochs=4, lr=1e-2, device="cpu", progress=False)
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    outputs, targets = predict(model, data["test"], device="cpu", progress=False)
    assert outputs["dr"].shape == (8, 5) and targets["dr"].shape == (8,)


@pytest.mark.slow
def test_compile_trains_the_same_module_and_saves_plain_keys(tmp_path):
    torch.manual_seed(0)
    train, val = loaders()
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit(model, cross_entropy, train, val, epochs=1, device="cpu", compile=True, checkpoint_dir=tmp_path,
        progress=False)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert set(load_checkpoint(tmp_path / "last.pt")["model"]) == set(before)
