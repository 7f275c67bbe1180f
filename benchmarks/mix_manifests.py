"""Merge cases of several training manifests into one, e.g. for a curriculum stage on mixed lesion sets.

    python benchmarks/mix_manifests.py --out phantoms/mix-easy5-std3.csv \
        phantoms/lytic-easy/manifest.csv:0-119 phantoms/std-seed3/manifest.csv:120-239

Each source is ``MANIFEST[:FIRST-LAST]``, keeping the cases whose number (the digits of ``case``, as
``hideseek phantom`` names them) lies in that range; without a range every row is kept. Two phantom sets both
name their cases ``case_0000`` onwards, so every case is prefixed with its manifest's folder name, and paths are
rewritten relative to the new manifest (``hideseek train`` resolves them from there). An existing ``--out`` is
refused: it may be the manifest of a trained model.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
from pathlib import Path

from hideseek.dataset import PATH_COLUMNS, read_manifest
from hideseek.errors import HideSeekError


def _source(spec: str) -> tuple[Path, range | None]:
    path, _, span = spec.partition(":")
    if not span:
        return Path(path), None
    match = re.fullmatch(r"(\d+)-(\d+)", span)
    if match is None:
        raise SystemExit(f"error: {spec!r}: a case range is FIRST-LAST, e.g. 0-119")
    return Path(path), range(int(match[1]), int(match[2]) + 1)


def _case_number(case: str) -> int:
    digits = re.findall(r"\d+", case)
    if not digits:
        raise SystemExit(f"error: case {case!r} has no number to select it by range")
    return int(digits[-1])


def mixed_rows(sources: list[str], out: Path) -> list[dict]:
    rows = []
    for spec in sources:
        path, cases = _source(spec)
        try:
            source_rows = read_manifest(path)
        except HideSeekError as e:
            raise SystemExit(f"error: {e}") from None
        kept = [r for r in source_rows if cases is None or _case_number(r.get("case", "")) in cases]
        if not kept:
            raise SystemExit(f"error: {spec}: no row in that case range")
        for row in kept:
            row["case"] = f"{path.parent.name}-{row.get('case', '')}"
            for key in PATH_COLUMNS:
                if row.get(key):
                    row[key] = os.path.relpath(row[key], out.parent.resolve())
        rows += kept
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sources", nargs="+", help="MANIFEST[:FIRST-LAST] (a range of case numbers)")
    parser.add_argument("--out", required=True, type=Path, help="the merged manifest CSV to write (must not exist)")
    args = parser.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"error: --out {args.out} exists; give a new file")
    rows = mixed_rows(args.sources, args.out)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    malignant = sum(r["malignant"] == "1" for r in rows)
    print(f"wrote {args.out}: {len(rows)} vertebrae ({malignant} malignant) from {len(args.sources)} manifests",
          file=sys.stderr)


if __name__ == "__main__":
    main()
