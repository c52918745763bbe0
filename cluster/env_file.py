"""Print .env.example with a fresh secret in every empty value: ``python -m cluster.env_file > .env``."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

from cluster.topology import Secrets

EXAMPLE = Path(__file__).resolve().parents[1] / ".env.example"


def filled(example: str, keys: Secrets) -> str:
    values = asdict(keys)
    lines = []
    for line in example.splitlines():
        name, sep, value = line.partition("=")
        if sep and not line.startswith("#") and not value and name in values:
            line = f"{name}={values[name]}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def main() -> int:
    sys.stdout.write(filled(EXAMPLE.read_text(), Secrets.generate()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
