"""fundus_lib.data.in_memory: a split held as uint8 tensors, batches cut and augmented on the device."""
import pytest
import torch
from torch.utils.data import DataLoader

from fundus_lib.data.batch_augment import BatchAugment
from fundus_lib.data.datasets import FundusDataset
from fundus_lib.data.in_memory import TensorData, TensorLoader, tensor_bytes
from fundus_lib.data.pipeline import synthetic_benchmark
from fundus_lib.data.transforms import eval_transform

TASKS = ("dr", "dme", "masks", "lesion_present", "patch_labels", "hr_image", "lr_image")


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    manifest = synthetic_benchmark(7, 2, 2, 64, seed=4, root=tmp_path_factory.mktemp("generated"))
    return manifest[manifest["split"] == "train"].reset_index(drop=True)


@pytest.fixture(scope="module")
def data(split):
    return TensorData(FundusDataset(split, tasks=TASKS, image_size=64))


def test_evaluation_batches_equal_the_dataloader_path_exactly(split, data):
    streamed = DataLoader(FundusDataset(split, tasks=TASKS, transform=eval_transform(64), image_size=64),
                          batch_size=3)
    in_memory = TensorLoader(data, batch_size=3)
    assert len(in_memory) == len(streamed) == 3
    for expected, got in zip(streamed, in_memory):
        assert set(got) == set(expected)
        for key, value in expected.items():
            if key == "meta":
                assert got["meta"]["image_id"] == value["image_id"]
                assert torch.equal(got["meta"]["index"], value["index"])
            else:
                assert got[key].dtype == value.dtype, key
                torch.testing.assert_close(got[key], value, atol=1e-6, rtol=0, msg=key)


def test_storage_is_uint8_and_its_size_is_predicted(data):
    assert data.images.dtype == torch.uint8 and data.images.shape == (7, 3, 64, 64)
    assert data.nbytes >= tensor_bytes(7, 64, TASKS)


def test_training_order_and_augmentation_follow_the_generator(data):
    def epoch(seed):
        loader = TensorLoader(data, batch_size=4, shuffle=True, augment=BatchAugment(),
                              generator=torch.Generator().manual_seed(seed))
        return [b for b in loader], loader

    first, loader = epoch(0)
    again, _ = epoch(0)
    for a, b in zip(first, again):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["masks"], b["masks"])
    assert sorted(sum((b["meta"]["image_id"] for b in first), [])) == sorted(data.meta["image_id"])
    state = loader.state_dict()
    next_epoch = [b["image"] for b in loader]
    loader.load_state_dict(state)
    torch.testing.assert_close(torch.cat([b["image"] for b in loader]), torch.cat(next_epoch), atol=0, rtol=0)
    assert not torch.equal(torch.cat(next_epoch), torch.cat([b["image"] for b in first]))


def test_to_device_shares_the_generator_and_the_rows(data):
    loader = TensorLoader(data, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(1))
    moved = loader.to("cpu")
    assert moved.generator is loader.generator and moved.dataset is loader.dataset
    assert len(moved) == len(loader) == 4


@pytest.mark.parametrize("drop_last", [False, True])
def test_shards_cover_the_split_with_equal_batch_counts(data, drop_last):
    loader = TensorLoader(data, batch_size=4, shuffle=True, drop_last=drop_last)
    shards = [loader.shard(rank, 2) for rank in range(2)]
    counts = []
    seen = []
    for shard in shards:
        shard.generator.manual_seed(3)
        batches = list(shard)
        counts.append(len(batches))
        assert all(len(b["dr"]) == 2 for b in batches) or not drop_last
        seen += sum((b["meta"]["image_id"] for b in batches), [])
        assert len(batches) == len(shard)
    assert counts[0] == counts[1]
    if drop_last:
        assert len(seen) == len(set(seen)) == 4  # 3 rows per rank, one full batch of 2 each
    else:
        assert set(seen) == set(data.meta["image_id"]) and len(seen) == 8
    with pytest.raises(ValueError, match="divisible"):
        loader.shard(0, 3)


def test_bad_construction_is_explained(split):
    with pytest.raises(ValueError, match="transform=None"):
        TensorData(FundusDataset(split, tasks=("dr",), transform=eval_transform(64), image_size=64))
    with pytest.raises(ValueError, match="image_size"):
        TensorData(FundusDataset(split, tasks=("dr",)))
    with pytest.raises(ValueError, match="batch_size"):
        TensorLoader(TensorData(FundusDataset(split, tasks=("dr",), image_size=32)), batch_size=0)
