"""Faults around the data path and run bookkeeping: broken photos in a cache build, interrupted and
killed builds resumed, read-only and full disks, the metrics sidecar across runs, bad parameters.

Nothing is lost (finished images are not redone), nothing is half-written (no temporary files,
no truncated PNG under a final name) and every error names the file, folder or parameter.
"""
from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from fundus_lib import nbtools
from fundus_lib.config import ConfigError, resolve
from fundus_lib.data import cache as cache_module
from fundus_lib.data.cache import CacheError, build_cache
from fundus_lib.data.manifest import make_manifest

ROOT = Path(__file__).resolve().parents[2]
N_IMAGES = 6


def photos(folder: Path, n: int = N_IMAGES):
    """``n`` small RGB photos with one MA mask each, as a manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        image, mask = folder / f"img{i}.png", folder / f"img{i}_MA.png"
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(image)
        Image.fromarray((rng.random((40, 48)) > 0.9).astype(np.uint8) * 255).save(mask)
        rows.append({"image_id": f"img{i}", "image_path": str(image), "dr_grade": i % 5, "source": "test",
                     "mask_MA": str(mask), "lesion_MA": 1})
    return make_manifest(rows)


def stamps(root: Path) -> dict[str, int]:
    """Modification time of every cached PNG (a rewritten file gets a new one)."""
    return {str(path.relative_to(root)): path.stat().st_mtime_ns for path in sorted(root.rglob("*.png"))}


def recorded(root: Path) -> set[str]:
    return set(json.loads((root / "cache.json").read_text())["entries"])


def leftovers(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.name.endswith(".tmp")]


def resume_redoes_only(root: Path, manifest, expected: set[str], **kwargs) -> None:
    """Rerun the build; the images recorded before must keep their files, the others get theirs."""
    before = stamps(root)
    done = recorded(root)
    assert done == expected
    cached = build_cache(manifest, root, 24, progress=False, **kwargs)
    after = stamps(root)
    kept = {name for name in before if Path(name).stem in done}
    assert kept and all(after[name] == before[name] for name in kept)
    assert len(after) == 2 * len(manifest) and recorded(root) == set(manifest["image_id"])
    for path in cached["image_path"]:
        with Image.open(path) as handle:
            handle.load()
    assert not leftovers(root)


# ---------------------------------------------------------------- an unreadable photo in the middle of a build

@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_photo_is_named_and_the_finished_images_are_kept(workers, tmp_path):
    manifest = photos(tmp_path / "photos")
    bad = Path(manifest.loc[3, "image_path"])
    good = bad.read_bytes()
    bad.write_bytes(b"")
    root = tmp_path / "cache"
    with pytest.raises(CacheError, match=rf"cannot cache image 'img3' \({bad}\): cannot read image {bad}"):
        build_cache(manifest, root, 24, workers=workers, progress=False)
    assert not leftovers(root)
    bad.write_bytes(good)
    if workers == 0:  # in order: the three images before the bad one are done, the rest never started
        resume_redoes_only(root, manifest, {"img0", "img1", "img2"})
    else:  # in parallel: whatever finished is recorded, the bad one is not
        assert "img3" not in recorded(root)
        resume_redoes_only(root, manifest, recorded(root), workers=workers)


# ---------------------------------------------------------------- interrupted builds resume

def test_build_interrupted_by_ctrl_c_resumes_where_it_stopped(tmp_path, monkeypatch):
    manifest = photos(tmp_path / "photos")
    real_read = cache_module.read_image
    calls = {"n": 0}

    def interrupted(path):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_read(path)

    monkeypatch.setattr(cache_module, "read_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_cache(manifest, tmp_path / "cache", 24, progress=False)
    monkeypatch.setattr(cache_module, "read_image", real_read)
    resume_redoes_only(tmp_path / "cache", manifest, {f"img{i}" for i in range(4)})


def slow_identity(image: np.ndarray) -> np.ndarray:
    """A preprocess hook that takes ``$SLOW_HOOK_S`` seconds, so a build can be killed half-way
    (the delay is not a parameter: the resumed build must use the same hook identity)."""
    time.sleep(float(os.environ.get("SLOW_HOOK_S", "0")))
    return image


KILLED_BUILD = textwrap.dedent("""
    import sys
    import pandas as pd
    from fundus_lib.data import cache
    from tests.robustness.test_data_faults import slow_identity
    cache.SAVE_INTERVAL_S = 0.0  # record every finished image at once
    manifest = pd.read_pickle(sys.argv[1])
    cache.build_cache(manifest, sys.argv[2], 24, slow_identity, progress=False)
""")


def test_build_killed_with_sigkill_resumes_where_it_stopped(tmp_path):
    manifest = photos(tmp_path / "photos")
    manifest.to_pickle(tmp_path / "manifest.pkl")
    root = tmp_path / "cache"
    child = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(tmp_path / "manifest.pkl"), str(root)],
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "SLOW_HOOK_S": "0.3"},
                             stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and child.poll() is None:
        if (root / "cache.json").is_file() and len(recorded(root)) >= 2:
            break
        time.sleep(0.05)
    assert child.poll() is None, child.stderr.read().decode()
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stderr.close()
    done = recorded(root)
    assert 2 <= len(done) < N_IMAGES
    resume_redoes_only(root, manifest, done, preprocess=slow_identity)


# ---------------------------------------------------------------- full and read-only disks

def test_disk_full_during_a_build_names_the_image_and_leaves_no_partial_file(tmp_path, monkeypatch):
    manifest = photos(tmp_path / "photos")
    real_save = Image.Image.save
    calls = {"n": 0}

    def disk_full(self, fp, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # the third image's PNG
            fp.write(b"\x89PNG\r\n\x1a\n half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", disk_full)
    with pytest.raises(CacheError, match=r"cannot cache image 'img2' \(.*img2\.png\): \[Errno 28\] No space left"):
        build_cache(manifest, tmp_path / "cache", 24, progress=False)
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert not leftovers(tmp_path / "cache")
    resume_redoes_only(tmp_path / "cache", manifest, {"img0", "img1"})


@pytest.fixture
def read_only(monkeypatch):
    """Make a folder read-only. Root ignores permission bits, so for root the refusal the kernel
    would give (EACCES on creating anything inside) is simulated on ``os.open`` / ``os.mkdir``."""

    def apply(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o555)
        if os.access(folder, os.W_OK):  # running as root
            real_open, real_mkdir = os.open, os.mkdir

            def refuse(path) -> bool:
                return Path(os.fsdecode(path)).resolve().is_relative_to(folder.resolve()) and not Path(path).exists()

            def open_(path, flags, *args, **kwargs):
                if flags & os.O_CREAT and refuse(path):
                    raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
                return real_open(path, flags, *args, **kwargs)

            def mkdir(path, *args, **kwargs):
                if refuse(path):
                    raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
                return real_mkdir(path, *args, **kwargs)

            monkeypatch.setattr(os, "open", open_)
            monkeypatch.setattr(os, "mkdir", mkdir)
        return folder

    yield apply


def test_read_only_cache_folder_is_named(tmp_path, read_only):
    manifest = photos(tmp_path / "photos", n=2)
    root = read_only(tmp_path / "readonly") / "cache"
    with pytest.raises(CacheError, match=rf"cannot write the cache folder {root}: Permission denied; choose a "):
        build_cache(manifest, root, 24, progress=False)
    assert not root.exists()


def test_read_only_metrics_folder_is_named_and_nothing_is_left(cfg, tmp_path, read_only, monkeypatch):
    folder = read_only(tmp_path / "readonly")
    monkeypatch.setenv("FUNDUS_METRICS_PATH", str(folder / "demo.metrics.json"))
    with pytest.raises(PermissionError, match=rf"record\(\) cannot write the metrics sidecar {folder}/demo\.metrics"
                                              r"\.json: Permission denied; set FUNDUS_METRICS_PATH"):
        nbtools.record("accuracy", 0.5)
    assert list(folder.iterdir()) == []


# ---------------------------------------------------------------- the metrics sidecar across runs

@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project with one notebook's quick preset; record() goes to its default path."""
    folder = tmp_path / "project" / "configs" / "99_demo"
    folder.mkdir(parents=True)
    preset = {"profile": "quick", "seed": 1, "lr": 1e-3, "n_dr_classes": 5, "lambdas": [0.1], "variants": ["8s"]}
    (folder / "quick.yaml").write_text(yaml.safe_dump(preset))
    monkeypatch.delenv("FUNDUS_METRICS_PATH", raising=False)
    for name in preset:
        monkeypatch.delenv(f"FUNDUS_{name.upper()}", raising=False)
    return tmp_path / "project"


@pytest.fixture
def cfg(project):
    return resolve({"profile": "quick"}, "99_demo", root=project)


def test_a_new_run_starts_the_default_sidecar_afresh(project, cfg):
    nbtools.record("old_metric", 1.0)
    nbtools.record("accuracy", 0.25)
    sidecar = project / "runs" / "99_demo" / "metrics.json"
    assert set(json.loads(sidecar.read_text())) == {"_meta", "old_metric", "accuracy"}  # one run accumulates
    resolve({"profile": "quick", "seed": 2}, "99_demo", root=project)  # the notebook is run again
    nbtools.record("accuracy", 0.5)
    data = json.loads(sidecar.read_text())
    assert set(data) == {"_meta", "accuracy"} and data["accuracy"]["value"] == 0.5
    assert data["_meta"]["parameters"]["seed"] == 2


# ---------------------------------------------------------------- parameters

CONFIG_CASES = {
    "lr_nan": ({"lr": math.nan}, r"lr=nan is not a finite number; expected float in \[1e-08, 10\.0\]"),
    "lr_inf": ({"lr": math.inf}, r"lr=inf is not a finite number"),
    "lr_minus_inf": ({"lr": -math.inf}, r"lr=-inf is not a finite number"),
    "lambdas_with_nan": ({"lambdas": [0.1, math.nan]},
                         r"lambdas=\[0\.1, nan\] holds nan, which is not a finite number"),
    "choice_not_a_range": ({"n_dr_classes": 3}, r"n_dr_classes=3 must be one of 2, 5$"),
    "list_choice": ({"variants": ["8s", "3s"]}, r"variants=\['8s', '3s'\]: \['3s'\] not allowed, every item must be "
                                                r"one of '32s', '16s', '8s', '4s', '2s'"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_parameter_is_named_with_what_was_expected(case, project):
    given, message = CONFIG_CASES[case]
    with pytest.raises(ConfigError, match=message) as error:
        resolve({"profile": "quick", **given}, "99_demo", root=project)
    assert " not in [" not in str(error.value)  # a choice never reads like a range


def test_lr_nan_from_the_environment_is_refused(project, monkeypatch):
    monkeypatch.setenv("FUNDUS_LR", ".nan")  # YAML's NaN, as papermill -p or a shell export may pass it
    with pytest.raises(ConfigError, match=r"lr=nan is not a finite number"):
        resolve({"profile": "quick", "lr": None}, "99_demo", root=project)
