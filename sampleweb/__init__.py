"""A sample web that stands in for the internet in the pipeline's tests and demo.

`build_sample_web` writes distinct JPEGs (edits of real photographs bundled with
scikit-image) plus broken URLs under www/, LAION-style raw metadata CSVs under raw/,
and expected.json, the counts a correct pipeline run reproduces. `SampleWebServer`
serves www/ on 127.0.0.1.

Captions and URL shapes come from `laion_rows.parquet`: 2,000 real LAION-400M rows
(URL, TEXT), a subset of img2dataset's test file. LAION metadata is licensed CC-BY 4.0
(LAION e.V.).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sampleweb.build import build_sample_web
    from sampleweb.serve import SampleWebServer

__all__ = ["SampleWebServer", "build_sample_web"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so `import sampleweb` stays cheap (no pandas or PIL).
    if name == "build_sample_web":
        from sampleweb.build import build_sample_web

        return build_sample_web
    if name == "SampleWebServer":
        from sampleweb.serve import SampleWebServer

        return SampleWebServer
    raise AttributeError(f"module 'sampleweb' has no attribute {name!r}")
