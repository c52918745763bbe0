"""Command line: `python -m sampleweb build --root DIR --base-url URL [--n-images N] [--seed S]`."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from sampleweb.build import build_sample_web


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sampleweb", description="Build a sample web.")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="write images, raw metadata and expected.json under --root")
    build.add_argument("--root", type=Path, required=True, help="new or empty directory (or an earlier sample web)")
    build.add_argument("--base-url", required=True, help="where www/ will be served, e.g. http://127.0.0.1:8000")
    build.add_argument("--n-images", type=int, default=240, help="number of good images (default 240)")
    build.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    expected = build_sample_web(args.root, args.base_url, n_images=args.n_images, seed=args.seed)
    summary = {key: value for key, value in expected.items() if key not in ("good_pairs", "broken_urls")}
    summary["good_pairs"] = len(expected["good_pairs"])
    summary["broken_urls"] = len(expected["broken_urls"])
    summary["expected_json"] = str(args.root / "expected.json")
    print(json.dumps(summary, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
