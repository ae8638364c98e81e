"""Seeds as AUTOMATIC1111 draws them: per-image generators, ENSD, variation seeds (exact)."""

import torch

from sdstudio.diffusion.noise import ImageNoise, slerp

SHAPE = (4, 6, 5)


def randn(seed, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def a1111_slerp(val, low, high):
    """modules/processing.py ``slerp`` as AUTOMATIC1111 writes it."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(
        1
    ) * high


def test_batch_image_equals_alone():
    batch = ImageNoise([7, 8, 9], SHAPE, ensd=31337)
    alone = ImageNoise([8], SHAPE, ensd=31337)
    for _ in range(3):
        assert torch.equal(batch.draw()[1], alone.draw()[0])


def test_ensd_reseeds_after_the_first_draw():
    plain, ensd = ImageNoise([5], SHAPE), ImageNoise([5], SHAPE, ensd=31337)
    assert torch.equal(plain.draw()[0], randn(5)) and torch.equal(ensd.draw()[0], randn(5))
    gen = torch.Generator().manual_seed(5)
    torch.randn(SHAPE, generator=gen)
    assert torch.equal(plain.draw()[0], torch.randn(SHAPE, generator=gen))  # continues the seed's generator
    gen = torch.Generator().manual_seed(5 + 31337)
    assert torch.equal(ensd.draw()[0], torch.randn(SHAPE, generator=gen))
    assert torch.equal(ensd(None, None)[0], torch.randn(SHAPE, generator=gen))


def test_variation_seed_is_a1111_slerp():
    noise = ImageNoise([5, 6], SHAPE, subseeds=[100, 101], subseed_strength=0.3, ensd=2)
    first = noise.draw()
    assert torch.equal(first[0], a1111_slerp(0.3, randn(5), randn(100)))
    assert torch.equal(first[1], a1111_slerp(0.3, randn(6), randn(101)))
    # later draws ignore the variation seed
    assert torch.equal(noise.draw()[0], randn(5 + 2))
    # strength 0 is the seed's noise; slerp's ends
    assert torch.equal(ImageNoise([5], SHAPE, subseeds=[100], subseed_strength=0.0).draw()[0], randn(5))
    torch.testing.assert_close(slerp(0.0, randn(1), randn(2)), randn(1))
    torch.testing.assert_close(slerp(1.0, randn(1), randn(2)), randn(2))
