"""The in-memory data path: a split held as uint8 tensors, batches cut by index on the training device.

For a dataset that fits in memory (every synthetic profile, IDRiD, Messidor at working size) the
DataLoader path — decode, resize and augment each image in worker processes — cannot feed a GPU.
Here every image (and mask) is read ONCE, at the working size, into a uint8 tensor; an epoch is a
random permutation of row indices; a batch is ``images[index]`` on the training device, augmented
as a whole by :class:`~fundus_lib.data.batch_augment.BatchAugment`, converted to float and
normalised there. Nothing waits for the CPU after the first epoch.

:class:`TensorLoader` behaves like the DataLoader it replaces where the course relies on it:
``len(loader)`` is the number of batches, batches are dicts with the same keys and dtypes as
:class:`~fundus_lib.data.datasets.FundusDataset` samples (``meta`` collated into lists),
``loader.dataset`` is the FundusDataset of the split (for ``dataset[i]`` and ``dataset.manifest``),
``loader.generator`` seeds shuffling and augmentation. :func:`~fundus_lib.train.fit` calls
``loader.to(device)`` (a view of the same data on that device, sharing the generator) and, under
DistributedDataParallel, ``loader.shard(rank, world)``.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from fundus_lib.data.batch_augment import BatchAugment
from fundus_lib.data.datasets import FundusDataset
from fundus_lib.data.patches import grid_patch_labels
from fundus_lib.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize
from fundus_lib.utils import usable_cores

#: Sample keys read from the dataset into memory (everything else is computed per batch).
_STORED_KEYS = ("dr", "dme", "masks", "mask_valid", "lesion_present")


def tensor_bytes(n_images: int, image_size: int, tasks: Sequence[str]) -> int:
    """Bytes of uint8 storage a split of ``n_images`` needs at ``image_size`` (3 colour + 8 mask planes)."""
    planes = 3 + (8 if {"masks", "patch_labels"} & set(tasks) else 0)
    return n_images * planes * image_size * image_size


class TensorData:
    """A split of a :class:`FundusDataset` read once into uint8 tensors (on the CPU).

    ``images`` (N, 3, S, S) uint8; ``masks`` (N, 8, S, S) uint8 when the tasks need masks; the
    labels the tasks ask for; ``meta`` as lists. Copies on other devices are made on demand by
    :meth:`on` and kept, so every loader of the split shares one copy per device.
    """

    def __init__(self, dataset: FundusDataset, *, threads: int | None = None) -> None:
        if dataset.transform is not None:
            raise ValueError("TensorData reads the un-augmented pictures: build the FundusDataset with "
                             "transform=None (augmentation happens per batch, on the device)")
        if dataset.image_size is None:
            raise ValueError("TensorData needs a FundusDataset with image_size set (one size for every image)")
        self.dataset = dataset
        self.tasks = dataset.tasks
        self.needs_masks = bool({"masks", "patch_labels"} & set(self.tasks))
        reader = FundusDataset(dataset.manifest, tasks=self._reading_tasks(), image_size=dataset.image_size,
                               lr_scale=dataset.lr_scale, normalize=False)
        workers = threads or min(8, usable_cores())
        with ThreadPoolExecutor(max_workers=workers) as pool:  # decoding and resizing release the GIL
            samples = list(pool.map(reader.__getitem__, range(len(reader))))
        self.images = torch.stack([(s["hr_image"] * 255).round_().to(torch.uint8) for s in samples])
        self.fields: dict[str, torch.Tensor] = {}
        for key in _STORED_KEYS:
            if key in samples[0]:
                stacked = torch.stack([s[key] for s in samples])
                self.fields[key] = stacked.to(torch.uint8) if key == "masks" else stacked
        self.meta = {name: [s["meta"][name] for s in samples] for name in ("image_id", "source", "split")}
        self._copies: dict[str, dict[str, torch.Tensor]] = {"cpu": {"images": self.images, **self.fields}}

    def _reading_tasks(self) -> tuple[str, ...]:
        tasks = [t for t in self.tasks if t in ("dr", "dme", "masks", "lesion_present")]
        if self.needs_masks and "masks" not in tasks:
            tasks.append("masks")
        return (*tasks, "hr_image")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._copies["cpu"].values())

    def on(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The stored tensors on ``device`` (copied once, then reused)."""
        key = str(device)
        if key not in self._copies:
            self._copies[key] = {name: t.to(device, non_blocking=True) for name, t in self._copies["cpu"].items()}
        return self._copies[key]


@dataclass
class TensorLoader:
    """Batches of a :class:`TensorData` split as dicts, shuffled and augmented on ``device``.

    ``augment`` (a :class:`BatchAugment`, or None) and ``shuffle`` are for training; evaluation
    loaders keep the row order and only convert and normalise. ``drop_last`` as in DataLoader.
    ``rank`` / ``world`` select every ``world``-th row of each epoch's order (see :meth:`shard`).
    """

    data: TensorData
    batch_size: int
    shuffle: bool = False
    augment: BatchAugment | None = None
    generator: torch.Generator = field(default_factory=torch.Generator)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    normalize: bool = True
    drop_last: bool = False
    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        self.device = torch.device(self.device)

    @property
    def dataset(self) -> FundusDataset:
        """The split's FundusDataset (``dataset[i]``, ``dataset.manifest``), as on a DataLoader."""
        return self.data.dataset

    def _rows(self) -> int:
        total = len(self.data)
        return total // self.world if self.drop_last else -(-total // self.world)

    def __len__(self) -> int:
        rows = self._rows()
        return rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)

    def to(self, device: str | torch.device) -> "TensorLoader":
        """The same loader (same generator, same rows) producing batches on ``device``."""
        return replace(self, device=torch.device(device))

    def shard(self, rank: int, world: int) -> "TensorLoader":
        """This rank's share under DistributedDataParallel: batch size / world, every world-th row."""
        if self.batch_size % world:
            raise ValueError(f"under DistributedDataParallel the batch size ({self.batch_size}) must be divisible "
                             f"by the number of processes ({world}) so the global batch stays the same")
        return replace(self, batch_size=self.batch_size // world, rank=rank, world=world)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What decides the next epoch's order and augmentation (saved in checkpoints)."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        total = len(self.data)
        order = torch.randperm(total, generator=self.generator) if self.shuffle else torch.arange(total)
        augment_generator = None
        if self.augment is not None:  # one draw per epoch seeds the device-side generator: no host sync
            seed = int(torch.randint(0, 2**62, (), generator=self.generator))
            augment_generator = torch.Generator(device=self.device).manual_seed(seed)
        if self.world > 1:  # every rank gets as many rows: trim (drop_last) or wrap around, as DistributedSampler
            rows = self._rows() * self.world
            order = order[:rows] if self.drop_last else torch.cat([order, order[: rows - total]])
            order = order[self.rank::self.world]
        stored = self.data.on(self.device)
        device_order = order.to(self.device, non_blocking=True)
        step = self.batch_size
        stop = len(order) - len(order) % step if self.drop_last else len(order)
        for start in range(0, stop, step):
            yield self._batch(stored, device_order[start:start + step], order[start:start + step], augment_generator)

    def _batch(self, stored: dict[str, torch.Tensor], index: torch.Tensor, host_index: torch.Tensor,
               augment_generator: torch.Generator | None) -> dict[str, Any]:
        images = stored["images"].index_select(0, index).float().div_(255)
        masks = stored["masks"].index_select(0, index) if "masks" in stored else None
        if self.augment is not None:
            images, masks = self.augment(images, masks, generator=augment_generator)
        tasks = self.data.tasks
        batch: dict[str, Any] = {}
        for key in ("dr", "dme", "lesion_present"):
            if key in stored:
                batch[key] = stored[key].index_select(0, index)
        if "mask_valid" in stored and {"masks", "lesion_present"} & set(tasks):
            batch["mask_valid"] = stored["mask_valid"].index_select(0, index)
        if masks is not None:
            masks = masks.float()
            if "masks" in tasks:
                batch["masks"] = masks
            if "patch_labels" in tasks:
                options = self.data.dataset.patch_options
                batch["patch_labels"] = grid_patch_labels(masks, **options)
        if "hr_image" in tasks:
            batch["hr_image"] = images
        if "lr_image" in tasks:
            scale = self.data.dataset.lr_scale
            size = (images.shape[-2] // scale, images.shape[-1] // scale)
            batch["lr_image"] = F.interpolate(images, size=size, mode="bicubic", align_corners=False,
                                              antialias=True).clamp_(0.0, 1.0)
        batch["image"] = normalize(images, IMAGENET_MEAN, IMAGENET_STD) if self.normalize else images
        rows = host_index.tolist()  # a CPU tensor: no device synchronisation
        batch["meta"] = {name: [values[i] for i in rows] for name, values in self.data.meta.items()}
        batch["meta"]["index"] = host_index
        return batch
