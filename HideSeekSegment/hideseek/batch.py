"""`hideseek batch`: a cohort of CTs, one output folder per case, resumable, on local processes or a Dask cluster.

The manifest is a CSV with ``ct`` and ``vertebrae`` and optionally ``case``, ``subregions``, ``body_mask``
(or ``body``), ``label_format``, ``levels``; paths relative to the CSV. Rows with the same case (or, without
a case column, the same CT) are one case, so a per-vertebra training manifest works as is. A case is done when
``OUT/<case>/report.json`` exists: a second run skips it and retries only what failed or never ran. Each case
writes ``OUT/logs/<case>.log``; ``OUT/summary.csv`` lists every case with its status and findings.
"""

from __future__ import annotations

import csv
import functools
import os
import re
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import InputError
from .io import atomic_file

SUMMARY_COLUMNS = ("case", "status", "seconds", "vertebrae", "n_lytic", "n_blastic", "lytic_volume_mm3",
                   "blastic_volume_mm3", "out", "error")  # fmt: skip
OPTIONAL_COLUMNS = ("subregions", "body_mask", "label_format", "levels")


@dataclass(frozen=True)
class Case:
    name: str
    ct: str
    vertebrae: str
    subregions: str | None = None
    body_mask: str | None = None
    label_format: str = "auto"
    levels: str | None = None


@dataclass(frozen=True)
class RunOptions:
    """What every case is run with (picklable: it travels to worker processes and Dask workers)."""

    model: str | None = None
    preset: str | None = None
    overrides: dict = field(default_factory=dict)  # method settings, e.g. {"delta_threshold": 0.6}
    mode: str = "mid"
    device: str = "auto"
    threads: int | None = None


def read_cases(manifest: str | os.PathLike) -> list[Case]:
    """One Case per distinct case (or CT) of the manifest, in order of first appearance."""
    path = Path(manifest)
    if not path.is_file():
        raise InputError(f"{path}: manifest not found")
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"ct", "vertebrae"} <= set(rows[0]):
        raise InputError(f"{path}: a batch manifest needs the columns ct and vertebrae (and optionally case, "
                         f"{', '.join(OPTIONAL_COLUMNS)})")  # fmt: skip
    cases: dict[str, Case] = {}
    for row in rows:
        def resolve(key: str, row=row) -> str | None:
            value = (row.get(key) or "").strip()
            return str((path.parent / value).resolve()) if value else None

        name = (row.get("case") or "").strip() or Path(row["ct"]).name.split(".")[0]
        if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
            raise InputError(f"{path}: case name {name!r} may only use letters, digits, '.', '_' and '-'")
        if name in cases:
            continue
        cases[name] = Case(name, resolve("ct"), resolve("vertebrae"), resolve("subregions"),
                           resolve("body_mask") or resolve("body"), (row.get("label_format") or "auto").strip(),
                           (row.get("levels") or "").strip() or None)  # fmt: skip
    return list(cases.values())


def run_case(case: Case, out_dir: str, options: RunOptions) -> dict:
    """Segment one case into ``out_dir/<case>``, logging to ``out_dir/logs/<case>.log``; never raises."""
    from .outputs import write_outputs
    from .pipeline import segment_ct

    if options.threads:
        import torch

        torch.set_num_threads(options.threads)
    out = Path(out_dir) / case.name
    log_path = Path(out_dir) / "logs" / f"{case.name}.log"
    started = time.monotonic()
    with log_path.open("w", encoding="utf-8") as log:
        def progress(event: dict) -> None:
            if event["stage"] != "hide-and-seek" or event["done"] in (0, event["total"]):
                log.write(f"{time.strftime('%H:%M:%S')} vertebra {event['vertebra']}/{event['vertebrae']} "
                          f"{event['level']} {event['stage']} {event['percent']}%\n")  # fmt: skip
                log.flush()

        log.write(f"case {case.name}: {asdict(case)}\noptions: {asdict(options)}\n")
        try:
            result = segment_ct(case.ct, case.vertebrae, body_mask=case.body_mask, subregions=case.subregions,
                                label_format=case.label_format, levels=case.levels, mode=options.mode,
                                model=_cached_bundle(options.model, options.device), preset=options.preset,
                                overrides=options.overrides, progress=progress)  # fmt: skip
            write_outputs(result, out, overwrite=True)
        except Exception as exc:  # one bad case must not stop a cohort: it is reported and retried next run
            log.write(traceback.format_exc())
            return _summary_row(case, "failed", started, error=f"{type(exc).__name__}: {exc}")
        report = result.report()
        log.write(f"done in {time.monotonic() - started:.1f} s\n")
    ok = [v for v in report["vertebrae"] if v["status"] == "ok"]
    return _summary_row(case, "done", started, out=str(out), vertebrae=len(ok),
                        n_lytic=sum(v["n_lytic"] for v in ok), n_blastic=sum(v["n_blastic"] for v in ok),
                        lytic_volume_mm3=round(sum(v["lytic_volume_mm3"] for v in ok), 1),
                        blastic_volume_mm3=round(sum(v["blastic_volume_mm3"] for v in ok), 1))  # fmt: skip


@functools.cache
def _cached_bundle(model: str | None, device: str):
    """One model per worker process, loaded at its first case."""
    from .bundle import load_bundle
    from .device import resolve_device
    from .pipeline import default_model_path

    return load_bundle(model or default_model_path(), device=resolve_device(device))


def _summary_row(case: Case, status: str, started: float, **fields) -> dict:
    return {"case": case.name, "status": status, "seconds": round(time.monotonic() - started, 1), **fields}


def is_done(case: Case, out_dir: Path) -> bool:
    return (out_dir / case.name / "report.json").is_file()


def run_batch(
    manifest: str | os.PathLike,
    out_dir: str | os.PathLike,
    options: RunOptions,
    *,
    workers: int = 1,
    scheduler: str | None = None,
    report: Callable[[dict], None] | None = None,
) -> Path:
    """Run every unfinished case; returns the path of the summary CSV (all cases, finished ones included)."""
    cases = read_cases(manifest)
    out = Path(out_dir)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    previous = _read_summary(out / "summary.csv")
    todo = [c for c in cases if not is_done(c, out)]
    rows = {c.name: previous.get(c.name, {"case": c.name, "status": "done", "out": str(out / c.name)})
            for c in cases if c not in todo}  # fmt: skip
    for c in cases:
        if c not in todo and report is not None:
            report({"case": c.name, "status": "skipped (done before)"})
    for row in _execute(todo, str(out), options, workers, scheduler):
        rows[row["case"]] = row
        _write_summary(out / "summary.csv", [rows[c.name] for c in cases if c.name in rows])
        if report is not None:
            report(row)
    return _write_summary(out / "summary.csv", [rows[c.name] for c in cases if c.name in rows])


def _execute(todo: list[Case], out: str, options: RunOptions, workers: int, scheduler: str | None) -> Iterator[dict]:
    if not todo:
        return
    if scheduler:
        try:
            from distributed import Client
            from distributed import as_completed as dask_completed
        except ImportError as exc:
            raise InputError("--scheduler needs Dask: pip install 'hideseek[cluster]'") from exc
        with Client(scheduler, timeout="30s") as client:
            futures = client.map(run_case, todo, out_dir=out, options=options, pure=False)
            for future in dask_completed(futures):
                yield future.result()
        return
    if workers <= 1:
        yield from (run_case(c, out, options) for c in todo)
        return
    per_worker = RunOptions(**{**asdict(options), "threads": options.threads or max(1, (os.cpu_count() or 1)
                                                                                     // workers)})
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(run_case, c, out, per_worker) for c in todo]
        for future in as_completed(futures):
            yield future.result()


def _read_summary(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    with path.open(newline="", encoding="utf-8") as fh:
        return {row["case"]: row for row in csv.DictReader(fh)}


def _write_summary(path: Path, rows: list[dict]) -> Path:
    with atomic_file(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path
