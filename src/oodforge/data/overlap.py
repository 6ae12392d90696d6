"""Images that an OOD set shares with an ID set: equal pixels (sets held in memory) or equal file contents
(streamed sets). An OOD set that repeats ID images scores near chance for a reason that is no detector's."""

from __future__ import annotations

import warnings

from oodforge.data.imageset import ImageSet
from oodforge.data.streaming import FileImageSet

Images = ImageSet | FileImageSet


def shared_count(images: Images, reference: Images) -> int | None:
    """How many of ``images`` also occur in ``reference``; None when the two cannot be compared (one set
    held in memory and the other streamed, or different image shapes)."""
    if type(images) is not type(reference):
        return None
    if isinstance(images, ImageSet) and images.image_shape != reference.image_shape:
        return None
    known = {row.tobytes() for row in reference.item_digests()}
    return sum(row.tobytes() in known for row in images.item_digests())


def warn_shared(ood: dict[str, Images], reference: Images, role: str, name: str) -> dict[str, int]:
    """Warn once per OOD set that shares images with ``reference`` (the ``role`` split of ID set ``name``);
    OOD set name -> shared count."""
    found = {}
    for ood_name, images in ood.items():
        count = shared_count(images, reference)
        if count:
            found[ood_name] = count
            warnings.warn(f"OOD set {ood_name!r} shares {count} of its {len(images)} images with the ID {role} set "
                          f"{name!r}; its scores measure nothing about OOD detection there",
                          stacklevel=2)
    return found
