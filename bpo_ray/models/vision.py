"""The size at which an image meets the model: what the processor resizes (and crops) it to.

Image weakening adds its noise at this size. Noise added to a 2000×1500 source and then averaged away by the
processor's downsizing is far weaker than the same step on a 336 px source (noise/signal 1.2 against 6.6 at
step 900); the authors noise the processed tensor, so the strength never depends on the source's size.
``ModelInputSize`` is computed once from the policy's processor, on the driver, and travels to Ray tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image


@dataclass(frozen=True)
class ModelInputSize:
    kind: str  # "shortest_edge_crop" (CLIP: LLaVA) | "fixed" | "smart" (Qwen2-VL) | "source" (unknown: as is)
    edge: int = 0  # shortest_edge_crop: the shortest edge after resizing
    height: int = 0  # shortest_edge_crop: the crop; fixed: the size
    width: int = 0
    factor: int = 0  # smart: sides are multiples of patch × merge, the area within [min, max] pixels
    min_pixels: int = 0
    max_pixels: int = 0
    resample: int = Image.Resampling.BICUBIC


def model_input_size(image_processor) -> ModelInputSize:
    """How ``image_processor`` resizes an image, in the terms ``fit`` applies."""
    size = getattr(image_processor, "size", None) or {}
    get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
    resample = int(getattr(image_processor, "resample", None) or Image.Resampling.BICUBIC)
    patch, merge = getattr(image_processor, "patch_size", None), getattr(image_processor, "merge_size", None)
    if patch and merge and get("shortest_edge") and get("longest_edge"):  # Qwen2-VL: pixel counts
        return ModelInputSize("smart", factor=patch * merge, min_pixels=get("shortest_edge"),
                              max_pixels=get("longest_edge"), resample=resample)
    crop = getattr(image_processor, "crop_size", None)
    if get("shortest_edge") and getattr(image_processor, "do_center_crop", False) and crop:
        crop_get = crop.get if isinstance(crop, dict) else lambda k: getattr(crop, k, None)
        return ModelInputSize("shortest_edge_crop", edge=get("shortest_edge"), height=crop_get("height"),
                              width=crop_get("width"), resample=resample)
    if get("height") and get("width"):
        return ModelInputSize("fixed", height=get("height"), width=get("width"), resample=resample)
    return ModelInputSize("source")


def fit(image: Image.Image, size: ModelInputSize) -> Image.Image:
    """``image`` resized (and cropped) as the processor will: its own resize then leaves it as it is."""
    w, h = image.size
    if size.kind == "shortest_edge_crop":
        scale = size.edge / min(w, h)
        image = image.resize((max(size.width, round(w * scale)), max(size.height, round(h * scale))), size.resample)
        left, top = (image.width - size.width) // 2, (image.height - size.height) // 2
        return image.crop((left, top, left + size.width, top + size.height))
    if size.kind == "fixed":
        return image.resize((size.width, size.height), size.resample)
    if size.kind == "smart":
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        new_h, new_w = smart_resize(h, w, factor=size.factor, min_pixels=size.min_pixels, max_pixels=size.max_pixels)
        return image.resize((new_w, new_h), size.resample)
    return image
