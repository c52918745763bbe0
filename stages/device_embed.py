"""The embedding loop that decodes on the device: tar members are read as bytes on the CPU,
JPEGs are decoded in batches where the model runs (nvJPEG through
``torchvision.io.decode_jpeg(..., device="cuda")`` on a GPU), resized and normalised
there, and embedded under fp16 autocast on CUDA. clip-retrieval still loads the model
(all_clip), computes the embeddings (its ClipMapper) and writes its layout (its
NumpyWriter); only its reader, which decodes and preprocesses each image with PIL in
DataLoader workers, is replaced.

A JPEG the device decoder rejects (CMYK and some progressive files on nvJPEG, anything
that is not a JPEG) is decoded by PIL on the CPU instead and counted
(``decoded_on_cpu``); one that PIL cannot decode either is left out and counted
(``undecodable``), never dropped silently.
"""

from __future__ import annotations

import io
import logging
import queue
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import fsspec

from stages import storage

log = logging.getLogger(__name__)

READ_AHEAD = 4  # batches of raw bytes read ahead of the device


@dataclass
class Sample:
    key: str
    jpg: bytes
    caption: str
    metadata: str


@dataclass
class LoopNumbers:
    """What one call of :func:`embed_tars` did, and where its time went."""

    samples: int = 0
    decoded_on_cpu: int = 0
    undecodable: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("read_wait", "decode", "inference", "write"), 0.0))

    def as_dict(self) -> dict[str, Any]:
        return {"sample_count": self.samples, "decoded_on_cpu": self.decoded_on_cpu, "undecodable": self.undecodable,
                **{f"{k}_duration": round(v, 3) for k, v in self.seconds.items()}}  # fmt: skip


def tar_samples(tars: list[str]) -> Iterator[Sample]:
    """Every sample (jpg, txt and json under one key) of ``tars``, in order, as bytes."""
    for url in tars:
        with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|") as archive:
            current: str | None = None
            parts: dict[str, bytes] = {}
            for member in archive:
                if not member.isfile():
                    continue
                key, _, ext = member.name.rpartition(".")
                if key != current:
                    if current is not None and {"jpg", "txt", "json"} <= parts.keys():
                        yield Sample(current, parts["jpg"], parts["txt"].decode("utf-8"), parts["json"].decode("utf-8"))
                    current, parts = key, {}
                parts[ext] = archive.extractfile(member).read()  # type: ignore[union-attr]
            if current is not None and {"jpg", "txt", "json"} <= parts.keys():
                yield Sample(current, parts["jpg"], parts["txt"].decode("utf-8"), parts["json"].decode("utf-8"))


def batches_read_ahead(samples: Iterator[Sample], batch_size: int) -> Iterator[list[Sample]]:
    """Batches of ``samples``, read by a background thread (I/O and tar parsing) while the
    device works on the previous ones."""
    out: queue.Queue[Any] = queue.Queue(maxsize=READ_AHEAD)
    done = object()

    def read() -> None:
        try:
            batch: list[Sample] = []
            for sample in samples:
                batch.append(sample)
                if len(batch) == batch_size:
                    out.put(batch)
                    batch = []
            if batch:
                out.put(batch)
            out.put(done)
        except BaseException as exc:  # handed to the consumer, which raises it
            out.put(exc)

    threading.Thread(target=read, name="tar-reader", daemon=True).start()
    while (item := out.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def decode_batch(
    data: list[bytes], device: str, numbers: LoopNumbers, decode_jpeg: Callable[..., Any] | None = None
) -> list[Any | None]:
    """RGB uint8 CHW tensors on ``device`` for ``data``; None where no decoder could read it.

    The whole batch goes to the device decoder at once; when it rejects the batch, each
    image is tried alone, and those it rejects are decoded by PIL on the CPU (counted).
    """
    import torch
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as torchvision_decode

    decode = decode_jpeg or torchvision_decode
    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    try:
        return list(decode(encoded, mode=ImageReadMode.RGB, device=device))
    except (RuntimeError, ValueError):
        pass
    images: list[Any | None] = []
    for raw, tensor in zip(data, encoded):
        try:
            images.append(decode(tensor, mode=ImageReadMode.RGB, device=device))
        except (RuntimeError, ValueError):
            images.append(pil_decode(raw, device, numbers))
    return images


def pil_decode(data: bytes, device: str, numbers: LoopNumbers) -> Any | None:
    """The CPU decoder for what the device decoder rejects; None (counted) when PIL cannot either."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            rgb = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        numbers.undecodable += 1
        return None
    numbers.decoded_on_cpu += 1
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).to(device)


@dataclass(frozen=True)
class DeviceTransform:
    """The model's own preprocessing (shortest side resized, centre crop, normalised), on
    tensors where they are: read from the torchvision ``Compose`` the model came with."""

    resize: int
    crop: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, preprocess: Any) -> DeviceTransform:
        from torchvision import transforms as T

        steps = {type(t).__name__: t for t in getattr(preprocess, "transforms", [])}
        resize, crop, normalize = steps.get("Resize"), steps.get("CenterCrop"), steps.get("Normalize")
        if not (isinstance(resize, T.Resize) and isinstance(crop, T.CenterCrop) and isinstance(normalize, T.Normalize)):
            raise ValueError(f"the model's preprocessing is not resize, centre crop and normalise: {preprocess}")
        if not isinstance(resize.size, int) and len(resize.size) != 1:
            raise ValueError(f"the model's preprocessing resizes to a fixed shape {resize.size}, not its shortest side")
        size = resize.size if isinstance(resize.size, int) else resize.size[0]
        return cls(size, tuple(crop.size), tuple(normalize.mean), tuple(normalize.std))

    def __call__(self, images: list[Any]) -> Any:
        import torch
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        batch = torch.stack([
            F.center_crop(F.resize(image, [self.resize], interpolation=InterpolationMode.BICUBIC, antialias=True), list(self.crop))
            for image in images
        ])  # fmt: skip
        batch = batch.float().div_(255)
        mean = torch.tensor(self.mean, device=batch.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=batch.device).view(1, -1, 1, 1)
        return batch.sub_(mean).div_(std)


def embed_tars(
    tars: list[str],
    output_folder: str,
    clip_model: str,
    batch_size: int,
    device: str,
    *,
    decode_jpeg: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Embed every sample of ``tars`` into ``output_folder`` in clip-retrieval's layout
    (one partition: ``img_emb/img_emb_0.npy``, ``text_emb/text_emb_0.npy``,
    ``metadata/metadata_0.parquet``) and ``stats/0.json``; returns the stats.

    ``decode_jpeg`` replaces torchvision's decoder (tests stand in for nvJPEG's refusals
    on a machine without a GPU)."""
    import torch
    from all_clip import load_clip
    from clip_retrieval.clip_inference.mapper import ClipMapper
    from clip_retrieval.clip_inference.writer import NumpyWriter

    # The same arguments as stages.embeddings.preload_clip: all_clip's cache hands back the
    # model loaded once per task.
    _, preprocess, tokenizer = load_clip(clip_model=clip_model, use_jit=False, warmup_batch_size=batch_size, clip_cache_path=None)
    mapper = ClipMapper(enable_image=True, enable_text=True, enable_metadata=True, use_mclip=False, clip_model=clip_model,
                        use_jit=False, mclip_model="", warmup_batch_size=batch_size)  # fmt: skip
    mapper.device = device
    transform = DeviceTransform.of(preprocess)
    writer = NumpyWriter(partition_id=0, output_folder=output_folder, enable_text=True, enable_image=True,
                         enable_metadata=True, output_partition_count=1)  # fmt: skip
    numbers = LoopNumbers()
    autocast = torch.autocast(device_type="cuda", dtype=torch.float16) if device.startswith("cuda") else nullcontext()
    started = time.perf_counter()
    waited = time.perf_counter()
    for batch in batches_read_ahead(tar_samples(tars), batch_size):
        numbers.seconds["read_wait"] += time.perf_counter() - waited
        t = time.perf_counter()
        images = decode_batch([s.jpg for s in batch], device, numbers, decode_jpeg)
        kept = [(s, image) for s, image in zip(batch, images) if image is not None]
        if not kept:
            waited = time.perf_counter()
            continue
        pixels = transform([image for _, image in kept])
        numbers.seconds["decode"] += time.perf_counter() - t
        t = time.perf_counter()
        captions = [s.caption for s, _ in kept]
        with autocast:
            embedded = mapper({
                "image_tensor": pixels, "image_filename": [s.key for s, _ in kept],
                "text_tokens": tokenizer(captions), "text": captions, "metadata": [s.metadata for s, _ in kept],
            })  # fmt: skip
        numbers.seconds["inference"] += time.perf_counter() - t
        t = time.perf_counter()
        writer(embedded)
        numbers.seconds["write"] += time.perf_counter() - t
        numbers.samples += len(kept)
        waited = time.perf_counter()
    t = time.perf_counter()
    writer.flush()
    numbers.seconds["write"] += time.perf_counter() - t
    stats = {**numbers.as_dict(), "total_duration": round(time.perf_counter() - started, 3), "device": device}
    storage.write_json(storage.join(output_folder, "stats", "0.json"), stats)
    if numbers.decoded_on_cpu or numbers.undecodable:
        log.warning("%d images decoded on the CPU (the device decoder rejected them), %d undecodable and left out",
                    numbers.decoded_on_cpu, numbers.undecodable)  # fmt: skip
    return stats
