"""The embedding loop that decodes where the model runs (stages.device_embed), run on the
CPU: its fallbacks to PIL, its counts, and embeddings that match clip-retrieval's reader's.

There is no GPU here. nvJPEG's refusals (CMYK JPEGs, among others) are stood in for by a
decoder that refuses the CMYK images of the test and otherwise is torchvision's own; the
PNG under a .jpg name and the corrupt bytes are refused by torchvision's real decoder.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from stages.device_embed import DeviceTransform, embed_tars
from stages.embeddings import EmbeddingSettings, compute_embeddings
from stages.layout import RunLayout


def jpeg(seed: int, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray((rng.random((48 + seed, 64, 3)) * 255).astype("uint8")).convert(mode)
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def write_tar(path: Path, images: dict[str, bytes]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        for key, data in images.items():
            meta = json.dumps({"url": f"http://127.0.0.1/{key}.jpg", "key": key}).encode()
            for ext, payload in (("jpg", data), ("txt", f"caption of {key}".encode()), ("json", meta)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
    return str(path)


def refusing(refused: set[bytes]) -> Any:
    """torchvision's decoder, refusing ``refused`` as nvJPEG refuses CMYK JPEGs."""
    from torchvision.io import decode_jpeg

    def decode(data: Any, **kwargs: Any) -> Any:
        batch = data if isinstance(data, list) else [data]
        if any(bytes(t.numpy()) in refused for t in batch):
            raise RuntimeError("nvjpeg: unsupported JPEG (stand-in)")
        return decode_jpeg(data, **kwargs)

    return decode


def test_images_the_device_decoder_refuses_are_decoded_on_the_cpu_and_counted(tmp_path: Path, demo_clip_model: str) -> None:
    cmyk = jpeg(1, mode="CMYK")
    images = {"000000000": jpeg(0), "000000001": cmyk, "000000002": jpeg(2, fmt="PNG"), "000000003": b"\xff\xd8 not a jpeg",
              "000000004": jpeg(4), "000000005": jpeg(5)}  # fmt: skip
    tar = write_tar(tmp_path / "tars" / "00000.tar", images)
    out = tmp_path / "out"
    stats = embed_tars([tar], str(out), demo_clip_model, 4, "cpu", decode_jpeg=refusing({cmyk}))

    assert (stats["sample_count"], stats["decoded_on_cpu"], stats["undecodable"]) == (5, 2, 1)
    assert json.loads((out / "stats" / "0.json").read_text())["decoded_on_cpu"] == 2
    vectors = np.load(out / "img_emb" / "img_emb_0.npy")
    metadata = pd.read_parquet(out / "metadata" / "metadata_0.parquet")
    assert vectors.shape[0] == len(metadata) == 5 and "000000003" not in set(metadata["image_path"])
    assert metadata["caption"].tolist() == [f"caption of {k}" for k in images if k != "000000003"]
    assert metadata["url"].tolist()[0] == "http://127.0.0.1/000000000.jpg"  # the json's fields, as clip-retrieval writes them
    np.testing.assert_allclose(np.linalg.norm(vectors.astype("float32"), axis=1), 1.0, atol=2e-3)


def test_the_device_loop_embeds_as_clip_retrievals_reader_does(tmp_path: Path, demo_clip_model: str) -> None:
    """Both paths through the stage, on the same shards: the same keys and captions, the
    same text embeddings, image embeddings equal up to the resize (tensor against PIL)."""
    tars = [write_tar(tmp_path / "images" / "part-00000" / f"{s:010d}.tar", {f"{s:05d}{i:04d}": jpeg(10 * s + i) for i in range(6)})
            for s in range(2)]  # fmt: skip
    results = {}
    for decode_on in ("reader", "device"):
        layout = RunLayout(str(tmp_path / decode_on))
        settings = EmbeddingSettings(clip_model=demo_clip_model, clip_batch_size=4, num_prepro_workers=1, decode_on=decode_on)
        numbers = compute_embeddings(tars, layout, settings, samples=12)
        assert (numbers["count"], layout.part_embeddings_marker("part-00000").read()["decoded_on_cpu"]) == (12, 0)
        folder = Path(layout.embeddings)
        keys = pd.concat([pd.read_parquet(p) for p in sorted((folder / "metadata").glob("*.parquet"))])["image_path"].tolist()
        image = np.concatenate([np.load(p) for p in sorted((folder / "img_emb").glob("*.npy"))]).astype("float32")
        text = np.concatenate([np.load(p) for p in sorted((folder / "text_emb").glob("*.npy"))]).astype("float32")
        results[decode_on] = dict(zip(keys, zip(image, text)))
    assert results["reader"].keys() == results["device"].keys() and len(results["device"]) == 12
    for key, (image, text) in results["reader"].items():
        device_image, device_text = results["device"][key]
        np.testing.assert_allclose(device_text, text, atol=2e-3)
        assert float(image @ device_image) > 0.98, key


def test_a_preprocessing_it_cannot_run_on_tensors_is_refused_by_name() -> None:
    from torchvision import transforms as T

    with pytest.raises(ValueError, match=r"not resize, centre crop and normalise: Compose"):
        DeviceTransform.of(T.Compose([T.Resize((224, 224)), T.ToTensor()]))
    with pytest.raises(ValueError, match=r"embeddings decode_on 'gpu' is not one of device, reader"):
        EmbeddingSettings(decode_on="gpu")
