"""Block masking and the SSL collate: rectangle sizes, budgets, stratified ratios, weights, skipped samples."""

import numpy as np
import pytest
import torch

from dinov2_repro.data.collate import SSLCollate, collate_data_and_cast
from dinov2_repro.data.masking import MaskingGenerator


def test_rectangles_are_smaller_than_the_grid_and_total_stays_in_budget():
    gen = MaskingGenerator((14, 14), max_num_patches=0.5 * 14 * 14)
    rng = np.random.default_rng(0)
    requested, achieved = [], []
    for _ in range(300):
        n = int(rng.integers(0, 140))
        mask, boxes = gen.sample_boxes(n, rng)
        union = np.zeros_like(mask)
        for top, left, h, w in boxes:
            assert 0 < h < 14 and 0 < w < 14 and 0 <= top <= 14 - h and 0 <= left <= 14 - w
            union[top:top + h, left:left + w] = True
        assert np.array_equal(union, mask)
        assert mask.sum() <= min(n, 98)  # never more than asked, never more than half the grid
        requested.append(min(n, 98))
        achieved.append(mask.sum())
    assert sum(achieved) >= 0.85 * sum(requested)  # and close to the request on average
    assert not gen(0, rng).any() and gen(0, rng).shape == (14, 14)


def published_mask_areas(height, width, n, rnd, min_num_patches=4, max_num_patches=None, min_aspect=0.3):
    """Plain transcription of the published DINOv2 `MaskingGenerator` (dinov2/data/masking.py, Python's random):
    the number of masked patches and the area h * w of each accepted block."""
    max_num_patches = max_num_patches or 0.5 * height * width
    log_aspect = (np.log(min_aspect), np.log(1 / min_aspect))
    mask = np.zeros((height, width), dtype=bool)
    count, areas = 0, []
    while count < n:
        budget = min(n - count, max_num_patches)
        delta = 0
        for _ in range(10):
            area = rnd.uniform(min_num_patches, budget)
            aspect = np.exp(rnd.uniform(*log_aspect))
            h, w = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
            if w < width and h < height:
                top, left = rnd.randint(0, height - h), rnd.randint(0, width - w)
                new = h * w - mask[top:top + h, left:left + w].sum()
                if 0 < new <= budget:
                    mask[top:top + h, left:left + w] = True
                    delta = int(new)
                    areas.append(h * w)
                    break
        if delta == 0:
            break
        count += delta
    return count, areas


def test_mask_statistics_match_the_published_generator():
    # The collate's requests for a 16 x 16 grid (224 px, patch 14): int(N * U(0.1, 0.5)).
    import random

    rnd, rng = random.Random(0), np.random.default_rng(0)
    gen = MaskingGenerator((16, 16), max_num_patches=128)
    requests = [int(256 * rnd.uniform(0.1, 0.5)) for _ in range(3000)]
    ours_ratio, ours_areas, ref_ratio, ref_areas = [], [], [], []
    for n in requests:
        mask, boxes = gen.sample_boxes(n, rng)
        ours_ratio.append(mask.sum() / n)
        ours_areas += [h * w for _, _, h, w in boxes]
        count, areas = published_mask_areas(16, 16, n, rnd)
        ref_ratio.append(count / n)
        ref_areas += areas
    # achieved / requested: the published generator reaches 0.999 on average; ours must too (was 0.983)
    assert np.mean(ref_ratio) > 0.99 and abs(np.mean(ours_ratio) - np.mean(ref_ratio)) < 0.004
    ours_areas, ref_areas = np.array(ours_areas), np.array(ref_areas)
    assert ours_areas.min() == ref_areas.min() == 1  # small remaining budgets give blocks below min_num_patches
    assert abs((ours_areas < 4).mean() - (ref_areas < 4).mean()) < 0.02  # ~21% of the blocks in both
    grid = np.arange(1, 129)
    cdf = lambda a: np.searchsorted(np.sort(a), grid, side="right") / len(a)  # noqa: E731
    assert np.abs(cdf(ours_areas) - cdf(ref_areas)).max() < 0.03  # block-area distributions agree (KS distance)


def test_mask_generator_is_seeded():
    gen = MaskingGenerator((8, 8))
    a = gen(20, np.random.default_rng(5))
    assert np.array_equal(a, gen(20, np.random.default_rng(5)))
    assert not all(np.array_equal(a, gen(20, np.random.default_rng(s))) for s in range(6, 10))


def _samples(batch, n_global=2, n_local=3, g=4, l=2):
    # crop values encode (sample, crop) so crop-major stacking can be checked
    return [({"global_crops": [torch.full((3, g, g), 10.0 * s + i) for i in range(n_global)],
              "local_crops": [torch.full((3, l, l), 100.0 + 10 * s + i) for i in range(n_local)]}, -1)
            for s in range(batch)]


def test_crop_major_stacking_and_hand_computed_fields():
    gen = MaskingGenerator((4, 4))
    out = collate_data_and_cast(_samples(2), (0.1, 0.5), 0.5, n_tokens=16, mask_generator=gen,
                                rng=np.random.default_rng(0))
    assert set(out) == {"collated_global_crops", "collated_local_crops", "collated_masks", "mask_indices_list",
                        "masks_weight", "n_masked_patches", "upperbound", "n_skipped", "skipped_paths"}
    g = out["collated_global_crops"]
    assert g.shape == (4, 3, 4, 4) and [g[k, 0, 0, 0].item() for k in range(4)] == [0.0, 10.0, 1.0, 11.0]
    loc = out["collated_local_crops"]
    assert loc.shape == (6, 3, 2, 2) and loc[:, 0, 0, 0].tolist() == [100, 110, 101, 111, 102, 112]
    # 4 images, 2 masked, probs = [0.1, 0.3, 0.5]: upperbound = int(16 * 0.3) + int(16 * 0.5)
    assert out["upperbound"] == 4 + 8
    masks = out["collated_masks"]
    assert masks.shape == (4, 16) and masks.dtype == torch.bool
    assert torch.equal(out["mask_indices_list"], masks.flatten().nonzero().flatten())
    assert out["n_masked_patches"].tolist() == [int(masks.sum())]
    assert out["n_skipped"] == 0 and out["skipped_paths"] == []


def test_mask_ratio_statistics_and_weights_over_many_batches():
    n_tokens, batch = 196, 16
    gen = MaskingGenerator((14, 14), max_num_patches=98)
    rng = np.random.default_rng(0)
    ratios, masked_fractions = [], []
    for _ in range(40):
        out = collate_data_and_cast(_samples(batch, n_local=0, g=2), (0.1, 0.5), 0.5, n_tokens=n_tokens,
                                    mask_generator=gen, rng=rng, local_crops_size=7)
        masks = out["collated_masks"]
        per_image = masks.sum(1)
        masked = per_image > 0
        masked_fractions.append(masked.float().mean().item())
        batch_ratios = (per_image[masked].float() / n_tokens).tolist()
        ratios += batch_ratios
        assert max(batch_ratios) >= 0.35 and min(batch_ratios) <= 0.2  # stratified: each batch spans the range
        image_of_token = out["mask_indices_list"] // n_tokens
        weight_sums = torch.zeros(2 * batch).index_add_(0, image_of_token, out["masks_weight"])
        assert torch.allclose(weight_sums[masked], torch.ones(int(masked.sum())))
        assert (weight_sums[~masked] == 0).all()
        assert out["collated_local_crops"].shape == (0, 3, 7, 7)
    assert np.mean(masked_fractions) == pytest.approx(0.5, abs=0.02)  # int(32 * 0.5) / 32, less rare empties
    ratios = np.array(ratios)
    assert ratios.max() <= 0.5 and ratios.min() >= 0.1 - 8 / n_tokens  # rectangle granularity below the minimum
    assert ratios.mean() == pytest.approx(0.3, abs=0.03)


def test_skipped_samples_are_dropped_and_counted():
    good = _samples(3)
    batch = [good[0], None, {"crops": None, "path": "/data/bad.jpg", "position": 5, "label": 0},
             {"crops": good[1][0], "path": "/data/ok.jpg", "position": 6, "label": 0}, good[2]]
    out = collate_data_and_cast(batch, mask_generator=MaskingGenerator((4, 4)), rng=np.random.default_rng(0))
    assert out["n_skipped"] == 2 and out["skipped_paths"] == ["/data/bad.jpg"]
    assert out["collated_global_crops"].shape[0] == 2 * 3
    with pytest.raises(RuntimeError, match="bad.jpg"):
        collate_data_and_cast([None, {"crops": None, "path": "/data/bad.jpg"}], mask_generator=MaskingGenerator(4))


def test_cast_and_position_seeded_collate():
    collate = SSLCollate(MaskingGenerator((4, 4)), seed=3, dtype=torch.bfloat16)

    def with_positions(positions):
        return [{"crops": crops, "path": f"{p}.png", "position": p, "label": -1}
                for (crops, _), p in zip(_samples(len(positions)), positions)]

    a, b, c = (collate(with_positions(p)) for p in ([0, 1, 2, 3], [0, 1, 2, 3], [4, 5, 6, 7]))
    assert a["collated_global_crops"].dtype == torch.bfloat16
    assert torch.equal(a["collated_masks"], b["collated_masks"])
    other_seed = SSLCollate(MaskingGenerator((4, 4)), seed=4)(with_positions([0, 1, 2, 3]))
    assert not (torch.equal(a["collated_masks"], c["collated_masks"])
                and torch.equal(a["collated_masks"], other_seed["collated_masks"]))
