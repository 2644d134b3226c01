"""Faults during training: kills, broken or hostile checkpoints, full disks, NaN metrics, divergence,
misused schedulers. Each case asserts a clear error naming the item, or the documented result."""
import errno
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fundus_lib.data.pipeline import synthetic_benchmark
from fundus_lib.train import CheckpointError, DivergenceError, NonFiniteLossError, fit, load_checkpoint, save_checkpoint
from tests.unit.test_train import Net, accuracy, cross_entropy, loaders

SCRIPT = Path(__file__).with_name("fit_until_killed.py")


# --------------------------------------------------------------------------- kills and exact resume

@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("generated")
    synthetic_benchmark(8, 4, 2, 32, seed=0, root=root)  # generated once, shared by every subprocess
    return root


def _run(data_root, folder, *options):
    return subprocess.run([sys.executable, str(SCRIPT), str(data_root), str(folder / "ckpt"), str(folder / "final.pt"),
                           *options], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def uninterrupted(data_root, tmp_path_factory):
    results = {}
    for data_path in ("stream", "memory"):
        folder = tmp_path_factory.mktemp(f"whole-{data_path}")
        done = _run(data_root, folder, "--data-path", data_path)
        assert done.returncode == 0, done.stderr[-3000:]
        results[data_path] = torch.load(folder / "final.pt")
    return results


def _assert_same(resumed, whole):
    np.testing.assert_array_equal(resumed["train_loss"], whole["train_loss"])
    differing = [k for k, v in whole["model"].items() if not torch.equal(v, resumed["model"][k])]
    assert not differing, differing


@pytest.mark.slow
@pytest.mark.parametrize("data_path, kill", [("stream", ("--kill-at-batch", "6")),      # epoch 3 of 4 (2 batches each)
                                             ("stream", ("--kill-in-save", "4")),       # while writing a checkpoint
                                             ("memory", ("--kill-at-batch", "5"))])
def test_sigkill_then_resume_reaches_the_uninterrupted_weights_with_two_workers(data_root, uninterrupted, tmp_path,
                                                                               data_path, kill):
    killed = _run(data_root, tmp_path, "--data-path", data_path, *kill)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "final.pt").exists()
    resumed = _run(data_root, tmp_path, "--data-path", data_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not list((tmp_path / "ckpt").glob("*.tmp*")), "a killed write left its temporary file behind"
    _assert_same(torch.load(tmp_path / "final.pt"), uninterrupted[data_path])


# --------------------------------------------------------------------------- checkpoint files

class _RunsCode:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_checkpoint_that_would_run_code_is_refused_and_named(tmp_path):
    marker = tmp_path / "pwned"
    payload = _RunsCode()
    payload.marker = str(marker)
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "extra": payload}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pt.*refusing"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["empty", "truncated", "text", "not_a_dict"])
def test_damaged_checkpoints_are_named(tmp_path, damage):
    path = tmp_path / "last.pt"
    torch.save({"model": Net().state_dict(), "epoch": 1}, path)
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "text":
        path.write_text("these are not the weights you are looking for")
    else:
        torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match=r"last\.pt"):
        load_checkpoint(path)


def test_a_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_checkpoint(tmp_path / "nowhere.pt")


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_a_failed_write_keeps_the_previous_checkpoint_and_leaves_no_temporary_file(tmp_path, monkeypatch, error):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}, "epoch": 1})
    real_save = torch.save

    def failing_save(state, stream):
        stream.write(b"half a checkpoint")
        raise OSError(error, "simulated")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*last\.pt"):
        save_checkpoint(path, {"model": {"w": torch.zeros(2)}, "epoch": 2})
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    assert load_checkpoint(path)["epoch"] == 1


def test_fit_checkpoints_load_with_weights_only_including_every_rng_state(tmp_path):
    train_loader, val = loaders()
    fit(Net(), cross_entropy, train_loader, val, epochs=1, device="cpu", checkpoint_dir=tmp_path, progress=False)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert {"python", "numpy", "torch", "loader"} <= set(state["rng"])


# --------------------------------------------------------------------------- numbers that go wrong

def test_nan_validation_metric_never_wins_and_the_warning_names_the_column(tmp_path):
    scores = iter([float("nan"), 0.4, float("nan"), 0.6, float("nan")])
    train_loader, val = loaders()
    model = Net()
    with pytest.warns(RuntimeWarning, match="val_auc is NaN at epoch 1"):
        history = fit(model, cross_entropy, train_loader, val, epochs=5, metrics_fn=lambda o, t: {"auc": next(scores)},
                      monitor="val_auc", device="cpu", checkpoint_dir=tmp_path, progress=False)
    assert history.attrs["best_epoch"] == 4 and history.attrs["best_value"] == 0.6
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 4


def test_nan_loss_names_epoch_and_first_bad_batch():
    calls = {"n": 0}
    train_loader, _ = loaders()

    def exploding(outputs, batch):
        calls["n"] += 1
        loss = nn.functional.cross_entropy(outputs["logits"], batch["label"])
        return loss * float("inf") if calls["n"] in (4, 5) else loss

    with pytest.raises(NonFiniteLossError, match=r"loss is inf at epoch 1, batch 4"):
        fit(Net(), exploding, train_loader, epochs=2, device="cpu", progress=False)


def test_a_learning_rate_far_too_high_stops_with_a_divergence_error(tmp_path):
    torch.manual_seed(0)
    train_loader, _ = loaders()
    model = Net()
    with pytest.raises((DivergenceError, NonFiniteLossError), match=r"epoch 1"):
        fit(model, cross_entropy, train_loader, epochs=3, optimizer=torch.optim.SGD(model.parameters(), lr=1e6),
            device="cpu", checkpoint_dir=tmp_path, progress=False)
    assert not (tmp_path / "last.pt").exists()  # the diverged epoch was not saved as "good"


def test_divergence_error_names_lr_and_can_be_switched_off():
    torch.manual_seed(0)
    train_loader, _ = loaders()
    model = Net()
    scale = iter(range(1, 1000))
    growing = lambda o, b: cross_entropy(o, b)[0] * 10.0 ** next(scale)
    with pytest.raises(DivergenceError, match=r"lr=0\.001.*divergence_factor=None"):
        fit(model, growing, train_loader, epochs=2, device="cpu", progress=False)
    scale = iter(range(1, 1000))
    fit(Net(), lambda o, b: cross_entropy(o, b)[0] * 1.0001 ** next(scale), train_loader, epochs=2, device="cpu",
        progress=False, divergence_factor=None)


# --------------------------------------------------------------------------- schedulers misused

def test_plateau_scheduler_on_a_missing_column_names_it_and_the_available_ones():
    train_loader, val = loaders()
    model = Net()
    optimizer = torch.optim.Adam(model.parameters())
    with pytest.raises(KeyError, match=r"val_kappa.*val_acc"):
        fit(model, cross_entropy, train_loader, val, epochs=1, optimizer=optimizer, metrics_fn=accuracy,
            monitor="val_kappa", scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer), device="cpu",
            progress=False)


def test_a_scheduler_class_instead_of_an_instance_is_refused_with_an_example():
    train_loader, _ = loaders()
    with pytest.raises(TypeError, match=r"StepLR is a class.*lambda optimizer, steps"):
        fit(Net(), cross_entropy, train_loader, epochs=1, scheduler=torch.optim.lr_scheduler.StepLR, device="cpu",
            progress=False)
