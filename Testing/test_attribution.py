"""Hide-and-Seek attribution on slices, with the tiny reference network and a classifier built for the test."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hideseek.attribution import (
    BLASTIC,
    LYTIC,
    PRESETS,
    AttributionSettings,
    HideAndSeek,
    candidate_maps,
    composite,
    merge_kind_edits,
    normalized_delta,
    search_region,
    settings_for,
    split_components,
)
from hideseek.calibration import shortlist, tune_candidates
from hideseek.classifier import LatentClassifier
from hideseek.errors import Cancelled
from hideseek.metrics import mean_lesion_f1
from hideseek.network import DAEConfig, DiffusionAutoencoder
from hideseek.sampler import DiffusionConfig

FAST = AttributionSettings(encode_steps=5, decode_steps=5, batch_size=4)


@pytest.fixture(scope="module")
def tiny(reference_dir):
    cfg = json.loads((reference_dir / "dae_tiny_golden.json").read_text(encoding="utf-8"))["config"]
    model = DiffusionAutoencoder(DAEConfig.from_dict(cfg)).eval()
    model.load_state_dict(load_file(reference_dir / "dae_tiny_weights.safetensors"))
    return model


@pytest.fixture(scope="module")
def slices():
    """Four 32x32 'vertebrae': a bright rim, textured inside, one with a dark and one with a bright spot."""
    rng = np.random.default_rng(7)
    img = np.full((4, 32, 32), 0.1, np.float32)
    img[:, 6:26, 6:26] = 0.8
    img[:, 8:24, 8:24] = 0.45 + 0.05 * rng.standard_normal((4, 16, 16))
    img[1, 12:17, 12:17] = 0.15
    img[2, 14:19, 10:15] = 0.95
    body = np.zeros(img.shape, bool)
    body[:, 7:25, 7:25] = True
    return img, body


@pytest.fixture(scope="module")
def classifier(tiny, slices):
    """A classifier calling every test slice malignant (P about 0.9), along a random direction."""
    with torch.no_grad():
        z = tiny.encode(torch.from_numpy(slices[0])[:, None]).double().numpy()
    rng = np.random.default_rng(0)
    coef = rng.standard_normal(z.shape[1])
    mean, scale = z.mean(0), z.std(0) + 1e-3
    s = (z - mean) / scale
    intercept = float(np.log(9.0) - (s @ coef).min()) + 0.5
    return LatentClassifier(coef=coef, intercept=intercept, mean=mean, scale=scale)


def _run(tiny, classifier, img, body, settings=FAST, **kw):
    return HideAndSeek(tiny, DiffusionConfig(), classifier, settings).run(img, body, **kw)


def test_composite_is_exact():
    recon, edit = torch.rand(2, 1, 6, 6), torch.rand(2, 1, 6, 6)
    hide = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    hide[0, 0, 1:3, 2:5] = True
    out = composite(recon, edit, hide)
    assert torch.equal(out[hide], edit[hide])
    assert torch.equal(out[~hide], recon[~hide])


def test_delta_is_one_for_the_malignant_score_and_zero_for_the_healthy_one():
    d = normalized_delta(np.array([0.9, 0.1, 0.5]), np.array([0.1] * 3), np.array([0.9] * 3))
    np.testing.assert_allclose(d, [1.0, 0.0, 0.5], atol=1e-6)


def test_candidates_split_by_sign_inside_the_body_above_the_median():
    recon = np.zeros((8, 8), np.float32)
    edit = recon.copy()
    edit[1:3, 1:3] = [[0.1, 0.2], [0.3, 0.4]]  # edit brighter: lytic
    edit[5:7, 5:7] = -0.5  # edit darker: blastic
    edit[0, 7] = 1.0  # outside the body
    body = np.ones((8, 8), bool)
    body[0, 7] = False
    lytic, blastic = candidate_maps(recon, edit, body, 0.5)
    assert lytic.sum() == 2 and lytic[2, 1] and lytic[2, 2]  # strictly above the median 0.25
    assert not lytic[0, 7]
    assert blastic.sum() == 0  # all equal: nothing strictly above their median
    lytic0, blastic0 = candidate_maps(recon, edit, body, 0.0)
    assert blastic0.sum() == 0 and lytic0.sum() == 3


def test_the_search_region_keeps_off_the_body_outline_and_below_the_change_floor():
    body = np.zeros((12, 12), bool)
    body[2:10, 2:10] = True
    recon = np.zeros((12, 12), np.float32)
    edit = recon.copy()
    edit[2:10, 2:10] = 0.2  # the whole body changes, its outline included
    edit[5:7, 5:7] = 0.02  # a weak change in the middle
    assert np.array_equal(search_region(body, recon, edit, 0, 0.0), body)
    inner = search_region(body, recon, edit, 2, 0.0)
    assert inner.sum() == 4 * 4 and inner[4:8, 4:8].all()  # two pixels in from every side
    strong = search_region(body, recon, edit, 2, 0.05)
    assert strong.sum() == 16 - 4 and not strong[5:7, 5:7].any()
    assert not search_region(np.zeros_like(body), recon, edit, 2, 0.0).any()
    with pytest.raises(ValueError, match="must not be negative"):
        AttributionSettings(body_margin_px=-1)


def test_connectivity_decides_whether_diagonal_pixels_join():
    mask = np.zeros((5, 5), bool)
    mask[1, 1] = mask[2, 2] = True
    assert len(split_components(mask, 4)) == 2
    assert len(split_components(mask, 8)) == 1


def test_presets_and_overrides():
    assert PRESETS["published"].encode_steps == 250 and PRESETS["published"].decode_steps == 100
    assert PRESETS["published"].harmonize and PRESETS["published"].delta_threshold == 0.5
    assert settings_for("fast", delta_threshold=0.7).delta_threshold == 0.7
    with pytest.raises(ValueError, match="unknown preset"):
        settings_for("slow")
    with pytest.raises(ValueError, match="unknown attribution settings: colour"):
        settings_for("fast", colour="red")
    with pytest.raises(ValueError, match="connectivity"):
        AttributionSettings(connectivity=6)


def test_run_produces_scored_candidates_and_a_consistent_label_map(tiny, classifier, slices):
    img, body = slices
    results = _run(tiny, classifier, img, body)
    assert len(results) == 4
    total = 0
    for res in results:
        assert res.p_malignant > 0.85
        assert res.p_healthy == pytest.approx(FAST.target_probability, rel=1e-6)
        assert not (res.candidate_mask & ~body[0]).any()
        for c in res.candidates:
            total += 1
            assert c.kind in (LYTIC, BLASTIC) and c.area_px >= FAST.min_component_px
            assert np.isfinite(c.delta) and 0.0 <= c.probability <= 1.0
            assert not (c.mask & ~res.candidate_mask).any()
        labels = res.label_map()
        expected = np.zeros_like(labels)
        for lesion in res.lesions:
            assert lesion.delta > FAST.delta_threshold
            expected[lesion.mask] = lesion.kind
        np.testing.assert_array_equal(labels, expected)
    assert total > 0


def test_same_input_gives_bit_identical_output(tiny, classifier, slices):
    a = _run(tiny, classifier, *slices)
    b = _run(tiny, classifier, *slices)
    for ra, rb in zip(a, b, strict=True):
        assert np.array_equal(ra.edit, rb.edit)
        assert [c.delta for c in ra.candidates] == [c.delta for c in rb.candidates]


@pytest.mark.parametrize("harmonize", [True, False])
def test_batched_and_one_by_one_scoring_agree(tiny, classifier, slices, harmonize):
    settings = AttributionSettings(encode_steps=5, decode_steps=5, harmonize=harmonize, batch_size=64)
    batched = _run(tiny, classifier, *slices, settings=settings)
    single = _run(tiny, classifier, *slices, settings=settings.with_overrides(batch_size=1))
    for rb, rs in zip(batched, single, strict=True):
        np.testing.assert_allclose([c.delta for c in rb.candidates], [c.delta for c in rs.candidates], atol=1e-4)


def test_a_batch_of_slices_equals_the_slices_one_at_a_time(tiny, classifier, slices):
    """Equal up to float rounding: the CPU kernels differ with the batch size, by ~1e-4 per DDIM step."""
    img, body = slices
    together = _run(tiny, classifier, img[:2], body[:2])
    for i in range(2):
        (alone,) = _run(tiny, classifier, img[i : i + 1], body[i : i + 1])
        assert alone.p_malignant == pytest.approx(together[i].p_malignant, abs=1e-4)
        for a, b in ((alone.recon, together[i].recon), (alone.edit, together[i].edit)):
            assert np.abs(a - b).mean() < 1e-3 and np.abs(a - b).max() < 1e-2  # thread count moves single pixels
        assert (alone.candidate_mask == together[i].candidate_mask).mean() > 0.97


def test_empty_body_gives_no_candidates(tiny, classifier, slices):
    img, body = slices
    results = _run(tiny, classifier, img[:2], np.zeros_like(body[:2]))
    assert all(not r.candidates and not r.candidate_mask.any() for r in results)
    assert all(not r.label_map().any() for r in results)


def test_a_slice_the_classifier_calls_healthy_is_not_edited(tiny, classifier, slices):
    img, body = slices
    healthy = LatentClassifier(coef=classifier.coef, intercept=classifier.intercept - 200.0,
                               mean=classifier.mean, scale=classifier.scale)
    (res,) = _run(tiny, healthy, img[:1], body[:1])
    assert res.p_malignant < FAST.target_probability
    assert np.array_equal(res.edit, res.recon) and not res.candidates
    (ungated,) = _run(tiny, classifier, img[:1], body[:1])
    assert ungated.candidates
    gate = FAST.with_overrides(gate_probability=ungated.p_malignant)
    (gated,) = _run(tiny, classifier, img[:1], body[:1], settings=gate)
    assert not gated.candidates and np.array_equal(gated.edit, gated.recon)


def test_progress_reaches_the_total_and_cancel_stops(tiny, classifier, slices):
    img, body = slices
    seen = []
    _run(tiny, classifier, img[:2], body[:2], progress=lambda stage, done, total: seen.append((stage, done, total)))
    stages = [s for s, _, _ in seen]
    assert stages[0] == "encoding" and "healthy edit" in stages
    assert seen[-1][1] == seen[-1][2]
    assert all(d1 <= d2 for (_, d1, _), (_, d2, _) in itertools.pairwise(seen))

    def cancel(stage, done, total):
        if stage == "reconstructing":
            raise Cancelled

    with pytest.raises(Cancelled):
        _run(tiny, classifier, img[:2], body[:2], progress=cancel)


def test_shape_mismatch_is_rejected(tiny, classifier, slices):
    img, body = slices
    with pytest.raises(ValueError, match="same"):
        _run(tiny, classifier, img, body[:2])


def test_edit_then_seek_is_the_run_and_tuning_reproduces_its_choice(tiny, classifier, slices):
    img, body = slices
    truth = np.zeros(img.shape, np.uint8)
    truth[1, 12:17, 12:17] = LYTIC
    truth[2, 14:19, 10:15] = BLASTIC
    method = HideAndSeek(tiny, DiffusionConfig(), classifier, FAST)
    staged = method.seek(method.edit(img), body)
    for a, b in zip(staged, method.run(img, body), strict=True):
        assert np.array_equal(a.edit, b.edit) and [c.delta for c in a.candidates] == [c.delta for c in b.candidates]
    grid = {"body_margin_px": (0, 2), "min_change": (0.0, 0.05), "candidate_quantile": (0.5,)}
    mimics = np.zeros(img.shape, np.uint16)
    mimics[0][body[0]] = 1  # slice 0 has no lesion: any candidate on it flags this benign "mimic"
    ticks = []
    tuning = tune_candidates(method, img, body, truth, mimics, grid=grid, thresholds=(0.5, 0.0), gates=(None,),
                             progress=lambda done, total: ticks.append((done, total)))
    assert len(tuning.table) == 2 * 2 * 2 and tuning.slices == 4
    assert ticks == [(1, 4), (2, 4), (3, 4), (4, 4)]  # one tick per grid setting
    assert tuning.table[0]["f1"] == tuning.f1 == max(r["f1"] for r in tuning.table)
    ranks = [(-r["f1"], r["mimic_fp"]) for r in tuning.table]
    assert ranks == sorted(ranks)  # F1 first, then the fewest mimics flagged
    assert tuning.default_f1 == next(r["f1"] for r in tuning.table if r["body_margin_px"] == 0
                                     and r["min_change"] == 0.0 and r["delta_threshold"] == 0.5)
    # The chosen settings, run from scratch, score what the tuning said.
    chosen = HideAndSeek(tiny, DiffusionConfig(), classifier, FAST.with_overrides(**tuning.settings)).run(img, body)
    maps = np.stack([r.label_map() for r in chosen])
    assert mean_lesion_f1(maps, truth, (LYTIC, BLASTIC)) == pytest.approx(tuning.f1, abs=1e-4)
    assert tuning.table[0]["mimic_fp"] == float(maps[0].any())
    assert "mimic_fp" not in tune_candidates(method, img, body, truth, grid=grid, gates=(None,)).table[0]
    with pytest.raises(ValueError, match="true lesions"):
        tune_candidates(method, img, body, np.zeros_like(truth), grid=grid)


def test_one_inversion_serves_edits_with_other_classifiers_and_steps_exactly(tiny, classifier, slices):
    """The export tunes several edits of the same slices from one inversion: it must change nothing."""
    img, _ = slices
    flipped = LatentClassifier(coef=-classifier.coef, intercept=classifier.intercept + 1.0, mean=classifier.mean,
                               scale=classifier.scale)
    inverted = HideAndSeek(tiny, DiffusionConfig(), classifier, FAST).invert(img)
    for clf, scale in ((classifier, 1.0), (flipped, 3.0)):
        method = HideAndSeek(tiny, DiffusionConfig(), clf, FAST.with_overrides(edit_step_scale=scale))
        alone, shared = method.edit(img), method.edit(inverted)
        assert torch.equal(alone.recon, shared.recon) and torch.equal(alone.edit, shared.edit)
        assert np.array_equal(alone.active, shared.active) and np.array_equal(alone.p_healthy, shared.p_healthy)
        assert np.array_equal(alone.images, shared.images) and not torch.equal(shared.edit, shared.recon)
    with pytest.raises(ValueError, match="DDIM steps"):
        HideAndSeek(tiny, DiffusionConfig(), classifier, FAST.with_overrides(decode_steps=4)).edit(inverted)


def test_tuned_gate_scores_what_a_gated_run_finds(tiny, classifier, slices):
    img, body = slices
    truth = np.zeros(img.shape, np.uint8)
    truth[2, 14:19, 10:15] = BLASTIC
    mimics = np.zeros(img.shape, np.uint16)
    mimics[0][body[0]] = 1
    method = HideAndSeek(tiny, DiffusionConfig(), classifier, FAST)
    gate = float(np.median(method.edit(img).p_malignant))  # leaves two of the four slices unsearched
    grid = {"body_margin_px": (0,), "min_change": (0.0,), "candidate_quantile": (0.5,)}
    tuning = tune_candidates(method, img, body, truth, mimics, grid=grid, thresholds=(0.0,), gates=(None, gate))
    rows = {r["gate_probability"]: r for r in tuning.table}
    assert set(rows) == {None, gate}
    for g, row in rows.items():
        run = HideAndSeek(tiny, DiffusionConfig(), classifier, FAST.with_overrides(gate_probability=g,
                                                                                   delta_threshold=0.0))
        maps = np.stack([r.label_map() for r in run.run(img, body)])
        assert mean_lesion_f1(maps, truth, (LYTIC, BLASTIC)) == pytest.approx(row["f1"], abs=1e-4)
        assert row["mimic_fp"] == float(maps[0].any())
    assert tuning.settings["gate_probability"] in rows
    with pytest.raises(ValueError, match="gate"):
        tune_candidates(HideAndSeek(tiny, DiffusionConfig(), classifier, FAST.with_overrides(gate_probability=0.5)),
                        img, body, truth, mimics, grid=grid)


def test_the_shortlist_ranks_edits_by_change_inside_over_outside_lesions():
    """v14490's table: the old rule fell back to C 0.01 × 1 (least leaky); the most lesion-specific edits lead."""
    table = [{"C": C, "step_scale": k, "inside": i, "outside": o} for C, k, i, o in [
        (0.01, 1, 0.0522, 0.0288), (0.01, 3, 0.0722, 0.0583), (0.01, 10, 0.2450, 0.2622),
        (0.001, 1, 0.1175, 0.0770), (0.001, 3, 0.1129, 0.0817), (0.001, 30, 0.7592, 0.8436)]]
    assert shortlist(table) == [(0.001, "normal", 1), (0.001, "normal", 3), (0.01, "normal", 1)]
    assert shortlist(table, size=1) == [(0.001, "normal", 1)]
    tied = [{"C": 1.0, "step_scale": k, "inside": 0.2, "outside": 0.1} for k in (1, 3)]
    assert shortlist(tied) == [(1.0, "normal", 1), (1.0, "normal", 3)]  # table order breaks ties
    # An edit along the class-mean difference joins the normal's three; it never pushes one of them out.
    means = [{"C": C, "direction": "class means", "step_scale": k, "inside": i, "outside": o} for C, k, i, o in [
        (0.01, 1, 0.1466, 0.0669), (0.01, 3, 0.2489, 0.2171), (0.001, 1, 0.1479, 0.0701)]]
    assert shortlist(table + means) == [(0.001, "normal", 1), (0.001, "normal", 3), (0.01, "normal", 1),
                                        (0.01, "class means", 1)]


def test_merged_kind_edits_brighten_like_the_lytic_edit_and_darken_like_the_blastic_one():
    recon = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    lytic = torch.tensor([[0.7, 0.4, 0.5, 0.6]])  # brightens pixels 0 and 3, darkens pixel 1
    blastic = torch.tensor([[0.3, 0.5, 0.2, 0.6]])  # darkens pixels 0 and 2, brightens pixel 3
    merged = merge_kind_edits(recon, {LYTIC: lytic, BLASTIC: blastic})
    # Pixel 0: both edits changed it, each by its own sign; pixel 1's darkening and pixel 3's second brightening
    # belong to the other type's edit and are left out.
    assert torch.allclose(merged, torch.tensor([[0.5, 0.5, 0.2, 0.6]]))
    one = torch.tensor([[0.1, 0.9, 0.5, 0.5]])
    assert merge_kind_edits(recon, {None: one}) is one


def test_a_classifier_with_kind_directions_edits_once_per_lesion_type(tiny, classifier, slices):
    from dataclasses import replace

    img, body = slices
    rng = np.random.default_rng(3)
    normal = classifier.scale * classifier.coef
    kinds = {"lytic": normal + rng.normal(scale=0.5, size=normal.shape),
             "blastic": normal + rng.normal(scale=0.5, size=normal.shape)}
    per_kind = replace(classifier, kind_directions=kinds)
    inverted = HideAndSeek(tiny, DiffusionConfig(), classifier, FAST).invert(img)
    edits = HideAndSeek(tiny, DiffusionConfig(), per_kind, FAST).edit(inverted)
    # Each type's edit alone, decoded from the same inversion, makes up the merged edit.
    alone = {kind: HideAndSeek(tiny, DiffusionConfig(), per_kind.for_kind(name), FAST).edit(inverted)
             for kind, name in ((LYTIC, "lytic"), (BLASTIC, "blastic"))}
    expected = merge_kind_edits(inverted.recon, {kind: e.edit for kind, e in alone.items()})
    assert torch.allclose(edits.edit, expected, atol=1e-6)
    assert np.allclose(edits.p_healthy, np.maximum(alone[LYTIC].p_healthy, alone[BLASTIC].p_healthy))
    results = HideAndSeek(tiny, DiffusionConfig(), per_kind, FAST).seek(edits, body)
    kinds_seen = set()
    for i, r in enumerate(results):  # lytic candidates where the lytic edit brightened, blastic ones likewise
        change = {kind: e.edit[i, 0].numpy() - r.recon for kind, e in alone.items()}
        for c in r.candidates:
            kinds_seen.add(c.kind)
            assert (change[c.kind][c.mask] * (1 if c.kind == LYTIC else -1)).min() > 0
    assert kinds_seen == {LYTIC, BLASTIC}
    # The progress counts the second edit's decode too, and ends at its total.
    seen = []
    _run(tiny, per_kind, img[:2], body[:2], progress=lambda stage, done, total: seen.append((done, total)))
    assert seen[-1][0] == seen[-1][1] and seen[-1][1] >= 2 * (FAST.encode_steps + 3 * FAST.decode_steps)
