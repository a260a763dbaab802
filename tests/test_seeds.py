"""A1111 seed semantics and CPU-generator noise: golden values, batch independence, variations."""
import math
import random

import pytest
import torch

from sdloom.seeds import MAX_SEED, ImageRNG, all_seeds, fix_seed, slerp


def randn(seed, shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def image_noise(seeds, shape, subseeds=None, subseed_strength=0.0, seed_resize_from=None,
                dtype=torch.float32):
    return ImageRNG(shape, seeds, subseeds, subseed_strength, seed_resize_from,
                    dtype=dtype).first()


def test_noise_is_the_seeded_cpu_generator_and_torch_stream_is_stable():
    x = image_noise([1], (4, 8, 8))
    assert x.shape == (1, 4, 8, 8) and x.dtype == torch.float32
    assert torch.equal(x[0], randn(1, (4, 8, 8)))
    # pins torch's CPU normal stream: if a torch release changes it, old seeds change images
    golden = [-1.5255959, -0.7502318, -0.6539809, -1.6094848, -0.1001672, -0.6091889]
    assert x.flatten()[:6].tolist() == pytest.approx(golden, abs=1e-6)


def test_batch_equals_single_images():
    batch = image_noise([100, 101, 102], (4, 6, 10))
    for i, s in enumerate([100, 101, 102]):
        assert torch.equal(batch[i], image_noise([s], (4, 6, 10))[0])
    assert not torch.equal(batch[0], batch[1])


def test_dtype_is_a_cast_of_fp32_noise():
    half = image_noise([3], (4, 8, 8), dtype=torch.float16)
    assert half.dtype == torch.float16
    assert torch.equal(half, image_noise([3], (4, 8, 8)).half())


def test_variation_endpoints_and_norm():
    shape = (4, 64, 64)
    plain, sub = randn(10, shape), randn(20, shape)
    zero = image_noise([10], shape, subseeds=[20], subseed_strength=0.0)[0]
    one = image_noise([10], shape, subseeds=[20], subseed_strength=1.0)[0]
    half = image_noise([10], shape, subseeds=[20], subseed_strength=0.5)[0]
    assert torch.equal(zero, plain)
    assert (one - sub).abs().max() < 1e-5
    # slerp keeps unit variance; a lerp would give std √0.5 ≈ 0.71
    assert abs(half.std().item() - 1.0) < 0.05
    assert not torch.allclose(half, (plain + sub) / 2, atol=1e-3)


def test_slerp_is_per_column_like_a1111():
    # one [C=1, H=2, W=2] tensor: column 0 is 90° apart, column 1 is 60° apart and scaled
    low = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]])
    high = torch.tensor([[[0.0, 1.0], [1.0, math.sqrt(3.0)]]])
    out = slerp(0.5, low, high)
    s = math.sqrt(0.5)
    # slerp(t) = sin((1-t)ω)/sin ω · a + sin(tω)/sin ω · b for each column's own ω
    k60 = math.sin(math.pi / 6) / math.sin(math.pi / 3)
    expected = torch.tensor([[[s, k60 * 2 + k60 * 1], [s, k60 * math.sqrt(3.0)]]])
    assert (out - expected).abs().max() < 1e-6


def test_slerp_of_equal_tensors_is_that_tensor():
    a = randn(0, (4, 8, 8))
    assert (slerp(0.3, a, a) - a).abs().max() < 1e-6


def test_seed_resize_pastes_old_size_noise_centred():
    shape = (4, 8, 8)
    small = image_noise([7], shape, seed_resize_from=(32, 32))[0]  # 32 px → 4 latent cells
    full = randn(7, shape)
    assert torch.equal(small[:, 2:6, 2:6], randn(7, (4, 4, 4)))
    assert torch.equal(small[:, :2], full[:, :2]) and torch.equal(small[:, :, 6:], full[:, :, 6:])
    big = image_noise([7], shape, seed_resize_from=(128, 96))[0]  # 16 wide × 12 high
    assert torch.equal(big, randn(7, (4, 12, 16))[:, 2:10, 4:12])
    for off in [None, (-1, -1), (0, 512)]:
        assert torch.equal(image_noise([7], shape, seed_resize_from=off)[0], full)


def draw(gens, shape):
    """What a sampler draws from per-image generators (samplers._draw)."""
    return torch.stack([torch.randn(shape, generator=g) for g in gens])


def test_image_rng_generators_continue_each_images_stream():
    # A1111's ImageRNG: first() is the starting noise, then every rng.next() continues each
    # image's own generator; our samplers draw from `generators`
    shape = (4, 6, 6)
    rng = ImageRNG(shape, [5, 9])
    first = rng.first()
    second, third = draw(rng.generators, shape), draw(rng.generators, shape)
    for i, s in enumerate([5, 9]):
        g = torch.Generator().manual_seed(s)
        assert torch.equal(first[i], torch.randn(shape, generator=g))
        assert torch.equal(second[i], torch.randn(shape, generator=g))
        assert torch.equal(third[i], torch.randn(shape, generator=g))
    # image 9's sampling noise is the same alone and in the batch
    alone = ImageRNG(shape, [9])
    alone.first()
    assert torch.equal(draw(alone.generators, shape)[0], second[1])


def test_image_rng_ensd_reseeds_after_the_starting_noise():
    shape = (4, 6, 6)
    rng = ImageRNG(shape, [5], ensd=31337)
    assert torch.equal(rng.first()[0], randn(5, shape))
    assert torch.equal(draw(rng.generators, shape)[0], randn(5 + 31337, shape))


def test_fix_seed():
    assert fix_seed(5) == 5 and fix_seed("7") == 7 and fix_seed(0) == 0
    random.seed(1234)
    expected = random.Random(1234).randrange(MAX_SEED)
    assert fix_seed(-1) == expected  # exactly A1111's random.randrange(4294967294)
    drawn = {fix_seed(v) for v in [-1, None, "", "abc", -1, -1]}
    assert len(drawn) == 6 and all(0 <= s < MAX_SEED for s in drawn)


def test_all_seeds():
    assert all_seeds(10, 3) == ([10, 11, 12], [-1, 0, 1])
    assert all_seeds(10, 3, subseed=100, subseed_strength=0.0) == ([10, 11, 12], [100, 101, 102])
    assert all_seeds(10, 3, subseed=100, subseed_strength=0.4) == ([10, 10, 10], [100, 101, 102])
