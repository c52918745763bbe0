"""Curation between the embeddings and the index: scores, filters, blocklists, subsets."""

from __future__ import annotations

from typing import Any, Mapping


def check_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """Check the curation settings and the blocklists among the params ``values`` before any
    work: a value out of range, a classifier that cannot be loaded, a blocklist that cannot
    be read or holds a bad line raise an error naming the param (and file and line).
    Returns the blocklists' digest counts (never their contents)."""
    from stages.curate.blocklists import BlocklistSettings, validate_blocklists
    from stages.curate.stage import CurationSettings
    from stages.settings import settings_from

    settings_from(CurationSettings, values).check()
    return validate_blocklists(settings_from(BlocklistSettings, values))
