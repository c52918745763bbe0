"""The real LAION rows the sample web borrows its captions and URL shapes from."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pandas as pd

logger = logging.getLogger(__name__)

LAION_ROWS_PATH = Path(__file__).with_name("laion_rows.parquet")

# pandas reads these whole-field values as NaN by default: a caption equal to one of them
# would turn into a null on re-read and make the ground truth ambiguous.
_PANDAS_NA_TOKENS = frozenset(
    ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
     "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"]
)
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def load_laion_rows(path: Path = LAION_ROWS_PATH) -> pd.DataFrame:
    """Read the bundled LAION rows (columns URL, TEXT) in their stored order."""
    return pd.read_parquet(path, columns=["URL", "TEXT"])


def is_usable_caption(text: object) -> bool:
    """True for a caption that survives a CSV round trip unchanged and unambiguous.

    Captions with control characters, surrounding whitespace or a pandas NA token are
    skipped, so that the generator's ground truth does not depend on how a reader
    treats whitespace and nulls.
    """
    return (
        isinstance(text, str)
        and text == text.strip()
        and text not in _PANDAS_NA_TOKENS
        and not _CONTROL_CHARS.search(text)
    )


def write_laion_rows_subset(source: Path, dest: Path, n_rows: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Write a random `n_rows` subset of a LAION parquet file, columns URL and TEXT only.

    The two longest captions and every row whose URL repeats with another caption are
    kept, replacing random picks, so the subset still holds those rare edge cases.
    """
    rows = pd.read_parquet(source, columns=["URL", "TEXT"]).reset_index(drop=True)
    picked = rows.sample(n=n_rows, random_state=seed)
    longest = rows["TEXT"].str.len().nlargest(2).index
    repeated_urls = rows.index[rows["URL"].duplicated(keep=False)]
    must_keep = [i for i in dict.fromkeys([*longest, *repeated_urls]) if i not in picked.index]
    if must_keep:
        droppable = [i for i in picked.index if i not in set(longest) | set(repeated_urls)]
        picked = picked.drop(droppable[-len(must_keep):])
        picked = pd.concat([picked, rows.loc[must_keep]])
    picked = picked.reset_index(drop=True)
    picked.to_parquet(dest, index=False)
    logger.info("Wrote %s LAION rows to %s", len(picked), dest)
    return picked
