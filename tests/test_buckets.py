"""Aspect-ratio buckets (``vae_toolkit.buckets``): the rule, the choice, the resize and crop, and the reader."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vae_toolkit import load_for_encoding, pil_to_tensor
from vae_toolkit.buckets import bucket_sizes, choose_bucket, plan_crop, prepare_image, size_plan

# --- an independent statement of the rule (floats and a brute-force search) ----------------------


def rule_buckets(area, step=64, max_aspect=4.0):
    kept = []
    w = step
    while w <= area * area:
        h = math.floor(area * area / w / step) * step
        if h >= step and max(w, h) / min(w, h) <= max_aspect:
            kept.append((w, h))
        w += step
    return set(kept) | {(h, w) for w, h in kept}


def rule_choice(W, H, buckets):
    target = math.log(W / H)
    best = min(abs(math.log(w / h) - target) for w, h in buckets)
    near = [
        b for b in buckets if math.isclose(abs(math.log(b[0] / b[1]) - target), best, rel_tol=1e-12, abs_tol=1e-12)
    ]
    return max(near, key=lambda b: (b[0] * b[1], b[0]))


def test_the_issue_example_256():
    listed = {(128, 512), (192, 320), (256, 256), (320, 192), (384, 128), (448, 128), (512, 128)}
    expected = listed | {(h, w) for w, h in listed}
    assert set(bucket_sizes(256)) == expected == rule_buckets(256)
    assert len(bucket_sizes(256)) == 9  # 7 listed, 2 of their transposes are new (128x384, 128x448)
    assert bucket_sizes(256) == sorted(expected, key=lambda b: b[0] / b[1])


@pytest.mark.parametrize("area", [64, 100, 256, 512, 768, 1024, 1536])
@pytest.mark.parametrize("step,max_aspect", [(64, 4.0), (32, 2.0), (8, 3.5), (64, 1.0)])
def test_bucket_list_follows_the_rule(area, step, max_aspect):
    expected = rule_buckets(area, step, max_aspect)
    if not expected:
        with pytest.raises(ValueError, match="give no bucket"):
            bucket_sizes(area, step, max_aspect)
        return
    got = bucket_sizes(area, step, max_aspect)
    assert set(got) == expected
    assert len(got) == len(set(got))
    for w, h in got:
        assert w % step == 0 and h % step == 0 and w * h <= area * area


@settings(max_examples=300, deadline=None)
@given(W=st.integers(1, 6000), H=st.integers(1, 6000), area=st.sampled_from([128, 256, 512, 1024]))
def test_choice_and_crop_follow_the_rule(W, H, area):
    buckets = bucket_sizes(area)
    chosen = choose_bucket(W, H, buckets)
    assert chosen == rule_choice(W, H, buckets)
    plan = plan_crop(W, H, chosen)
    w, h = chosen
    scale = max(w / W, h / H)
    assert plan.original == (H, W) and plan.target == (h, w)
    assert abs(plan.resized[1] - W * scale) <= 0.5 + 1e-9 and abs(plan.resized[0] - H * scale) <= 0.5 + 1e-9
    assert plan.resized[1] >= w and plan.resized[0] >= h  # the resized image covers the bucket
    assert plan.crop == ((plan.resized[0] - h) // 2, (plan.resized[1] - w) // 2)
    assert plan.upscaled == (scale > 1)


@pytest.mark.parametrize("ratio", [Fraction(1, 7), Fraction(1, 4), Fraction(2, 5), Fraction(3, 4), Fraction(1),
                                   Fraction(4, 3), Fraction(16, 9), Fraction(21, 9), Fraction(5, 1)])  # fmt: skip
def test_many_aspect_ratios(ratio):
    for height in (100, 480, 1080, 3000):
        width = max(1, round(height * ratio))
        for area in (256, 1024):
            buckets = bucket_sizes(area)
            assert choose_bucket(width, height, buckets) == rule_choice(width, height, buckets)


def test_ties_go_to_the_larger_area_then_the_wider():
    # a square image between 2:1 and 1:2 only: equal distance, equal area -> the wider
    assert choose_bucket(100, 100, [(64, 128), (128, 64)]) == (128, 64)
    # equal aspect ratio, different area -> the larger
    assert choose_bucket(100, 100, [(64, 64), (128, 128)]) == (128, 128)
    # 2:1 and 1:2 around a square image, the 1:2 one larger -> larger area first
    assert choose_bucket(100, 100, [(64, 32), (64, 128)]) == (64, 128)


def test_no_bucket_is_a_clear_error():
    with pytest.raises(ValueError, match=r"area 32 with step 64 .* give no bucket .*--bucket-step"):
        bucket_sizes(32, 64)
    with pytest.raises(ValueError, match="multiple of 8"):
        bucket_sizes(256, 60)
    with pytest.raises(ValueError, match="max_aspect"):
        bucket_sizes(256, 64, 0.5)
    with pytest.raises(TypeError, match="max_aspect"):
        bucket_sizes(256, 64, "4")


# --- the reader ----------------------------------------------------------------------------------


def _photo(path, w, h, seed=0, quality=None):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    smooth = (np.sin(x / 17.0)[..., None] * 60 + np.cos(y / 11.0)[..., None] * 60 + 128).repeat(3, 2)
    noise = rng.normal(0, 8, (h, w, 3))
    Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8)).save(path, quality=quality or 95)
    return path


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("w,h", [(300, 200), (200, 300), (90, 40), (1200, 500)])
def test_bucket_reader_is_resize_then_crop(tmp_path, w, h, exact):
    path = _photo(tmp_path / "a.png", w, h)
    buckets = bucket_sizes(128, 32)
    got = prepare_image(path, buckets=buckets, exact=exact)
    plan = got.plan
    (rh, rw), (top, left), (th, tw) = plan.resized, plan.crop, plan.target
    with Image.open(path) as img:
        ref = img.convert("RGB").resize((rw, rh), Image.Resampling.BILINEAR).crop((left, top, left + tw, top + th))
    assert got.image.shape == (3, th, tw)
    assert torch.equal(got.image, pil_to_tensor(ref))  # a PNG: no draft, bit for bit


def test_bucket_reader_on_a_large_jpeg_uses_the_fast_draft(tmp_path):
    path = _photo(tmp_path / "a.jpg", 1600, 1000, quality=95)
    buckets = bucket_sizes(128, 32)
    fast = prepare_image(path, buckets=buckets)
    exact = prepare_image(path, buckets=buckets, exact=True)
    assert fast.plan == exact.plan and fast.image.shape == exact.image.shape
    assert not torch.equal(fast.image, exact.image)  # the draft decode was used
    diff = (fast.image - exact.image).abs().mean().item() * 127.5
    assert diff < 1.5  # far below a grey level on average, as the fast --size reader


@pytest.mark.parametrize("exact", [True, False])
def test_a_square_bucket_gives_what_size_gives(tmp_path, exact):
    """Same resampling as --size: a square image into the square bucket is exactly load_for_encoding(path, N)."""
    for name in ("a.png", "b.jpg"):
        path = _photo(tmp_path / name, 640, 640)
        got = prepare_image(path, buckets=[(128, 128)], exact=exact)
        assert torch.equal(got.image, load_for_encoding(path, 128, exact=exact))


def test_smaller_images_are_scaled_up(tmp_path):
    path = _photo(tmp_path / "small.png", 40, 30)
    got = prepare_image(path, buckets=bucket_sizes(64, 16))
    assert got.plan.upscaled and got.image.shape[1] * got.image.shape[2] > 40 * 30


@pytest.mark.parametrize("size", [None, 64])
def test_the_other_modes_are_load_for_encoding_with_their_plan(tmp_path, size):
    path = _photo(tmp_path / "a.png", 150, 100)
    got = prepare_image(path, size=size)
    assert torch.equal(got.image, load_for_encoding(path, size))
    assert got.plan == size_plan(150, 100, size)
    if size is None:
        assert got.plan.target == (96, 144) and got.plan.crop == (2, 3)
    else:  # shorter side to 64: 96 x 64, crop 64 x 64 at left 16
        assert got.plan.resized == (64, 96) and got.plan.crop == (0, 16) and got.plan.target == (64, 64)
