"""Data: the manifest table, dataset sources, the synthetic generator, torch datasets, splits."""
from fundus_lib.data.manifest import LESIONS, LESION_NAMES, ManifestError, make_manifest, read_image, read_mask

__all__ = ["LESIONS", "LESION_NAMES", "ManifestError", "make_manifest", "read_image", "read_mask"]
