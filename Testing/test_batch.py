"""`hideseek batch`: one folder per case, resume skips finished cases, failures are reported and retried, Dask."""

from __future__ import annotations

import csv

import pytest

from hideseek.batch import RunOptions, read_cases, run_batch
from hideseek.cli import main
from hideseek.errors import InputError
from hideseek.phantom import write_phantom_set


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Two phantom cases (per-vertebra rows, as 'hideseek phantom' writes them)."""
    out = tmp_path_factory.mktemp("cohort") / "set"
    return write_phantom_set(out, 2, seed=21, levels=("L1", "L2"), spacing=1.4, size=(120.0, 140.0))


def _summary(out) -> dict[str, dict]:
    with (out / "summary.csv").open() as fh:
        return {row["case"]: row for row in csv.DictReader(fh)}


def test_rows_of_one_case_are_merged_and_paths_resolved(cohort):
    cases = read_cases(cohort)
    assert [c.name for c in cases] == ["case_0000", "case_0001"]
    assert all(c.ct.startswith(str(cohort.parent)) for c in cases)
    assert cases[0].body_mask and cases[0].body_mask.endswith("case_0000_body.nii.gz")


def test_batch_runs_resumes_and_retries(cohort, toy_bundle, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["batch", str(cohort), "--out", str(out), "--model", str(toy_bundle), "--threads", "1"]
    assert main(args) == 0
    first = _summary(out)
    assert {r["status"] for r in first.values()} == {"done"}
    assert (out / "case_0000" / "report.json").is_file() and (out / "logs" / "case_0001.log").is_file()
    capsys.readouterr()
    # a second run does nothing but report; a removed result is redone
    (out / "case_0001" / "report.json").unlink()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "case_0000: skipped (done before)" in printed and "case_0001: done" in printed
    assert _summary(out)["case_0000"]["seconds"] == first["case_0000"]["seconds"]


def test_a_failing_case_is_logged_and_does_not_stop_the_others(cohort, toy_bundle, tmp_path, capsys):
    manifest = tmp_path / "cases.csv"
    manifest.write_text("case,ct,vertebrae\n"
                        f"good,{cohort.parent / 'case_0000_ct.nii.gz'},{cohort.parent / 'case_0000_vertebrae.nii.gz'}\n"
                        f"broken,{tmp_path / 'missing.nii.gz'},{cohort.parent / 'case_0000_vertebrae.nii.gz'}\n",
                        encoding="utf-8")
    out = tmp_path / "run"
    assert main(["batch", str(manifest), "--out", str(out), "--model", str(toy_bundle)]) == 1
    rows = _summary(out)
    assert rows["good"]["status"] == "done" and rows["broken"]["status"] == "failed"
    assert "missing.nii.gz" in rows["broken"]["error"]
    assert "Traceback" in (out / "logs" / "broken.log").read_text(encoding="utf-8")


def test_bad_manifests_are_refused(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("image,labels\na,b\n", encoding="utf-8")
    with pytest.raises(InputError, match="ct and vertebrae"):
        read_cases(bad)
    with pytest.raises(InputError, match="not found"):
        read_cases(tmp_path / "nope.csv")


def test_the_same_run_on_a_dask_cluster_over_loopback(cohort, toy_bundle, tmp_path):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp://",
                                  host="127.0.0.1", dashboard_address=None) as cluster:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        summary = run_batch(cohort, tmp_path / "run", RunOptions(model=str(toy_bundle), threads=1),
                            scheduler=cluster.scheduler_address)
    with summary.open() as fh:
        assert {row["status"] for row in csv.DictReader(fh)} == {"done"}
    assert (tmp_path / "run" / "case_0001" / "lesions.seg.nrrd").is_file()
