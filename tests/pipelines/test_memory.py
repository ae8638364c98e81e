"""The memory estimate and check (``sdstudio.pipelines.memory``): how the estimate scales, what the check
refuses and when it tiles, what it reads from the machine. Against ``sdstudio generate``'s measured peak:
``benchmarks/memory_estimate.py``."""

import dataclasses
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sdstudio.errors import SdStudioError
from sdstudio.models.configs import PRESETS
from sdstudio.models.loading import LoadedModel, load_model, save_model
from sdstudio.models.prepacked import _mkldnn_bf16
from sdstudio.models.stablediffusion import random_model
from sdstudio.models.tokenizer import ClipTokenizer
from sdstudio.pipelines import memory
from sdstudio.pipelines.generate import decode_latents, generate
from sdstudio.pipelines.sampling import plan
from sdstudio.pipelines.validate import Limits
from sdstudio.prompt.parser import parse
from sdstudio.types import GenerationRequest, Hires

TOKENIZER = ClipTokenizer()
GiB = 2**30
NO_CAPS = Limits(max_pixels=10**12)


@pytest.fixture(scope="module")
def tiny():
    config = PRESETS["tiny"]
    return LoadedModel(
        model=random_model(config), config=config, path=Path("tiny"), dtype=torch.float32, ema=False
    )


def request(**kw):
    return GenerationRequest(
        **{"prompt": "a red ball", "steps": 2, "seed": 1, "width": 64, "height": 64, **kw}
    )


def estimate(model, kept_heap=False, tiled=None, **kw):
    r = request(**kw)
    return memory.estimate(model, plan(model, r, NO_CAPS), r, tiled, kept_heap=kept_heap)


def test_estimate_scales_with_size_batch_and_guidance(tiny):
    small, large = estimate(tiny, width=64, height=64), estimate(tiny, width=128, height=128)
    # 4x the pixels: the convolutions' maps 4x; the fused attention's per-thread blocks stay
    assert 3.5 < large.unet / small.unet <= 4.0
    # the tiny VAE's attention (at half the image's side) on NCHW maps: PyTorch's math path, scores 16x
    assert 4 < large.vae / small.vae < 16
    vae = PRESETS["tiny"].vae
    nchw = memory._Policy("cpu", torch.float32, channels_last=False, threads=2)
    a, b = (memory.decoder_activations(vae, 1, n, n, nchw) for n in (32, 64))
    assert 12 < b / a < 16  # the scores' matrix dominates
    fused = memory._Policy("cpu", torch.bfloat16, channels_last=True, threads=2)  # PyTorch's fused kernel
    a, b = (memory.decoder_activations(vae, 1, n, n, fused) for n in (128, 256))
    assert b / a == pytest.approx(4, rel=0.01)
    assert large.images == 4 * small.images
    assert large.weights == small.weights > 0
    two = estimate(tiny, width=64, height=64, batch_size=2)
    assert 1.9 < two.unet / small.unet <= 2.0
    assert two.vae == pytest.approx(2 * small.vae, rel=0.01) and two.images == 2 * small.images
    # CFG runs the prompt and the negative as one batch; CFG 1 one row; an AND prompt three rows
    r = request(width=128, height=128)
    p = plan(tiny, r, NO_CAPS)
    rows = [
        memory.guidance_rows(dataclasses.replace(r, cfg_scale=1.0), parse(r.prompt, 2)),
        memory.guidance_rows(r, parse(r.prompt, 2)),
        memory.guidance_rows(r, parse("a red ball AND a blue cube", 2)),
    ]
    assert rows == [1, 2, 3]
    unets = [memory.estimate(tiny, p, r, None, rows=n, kept_heap=False).unet for n in rows]
    assert unets[0] < unets[1] < unets[2]
    assert unets[1] / unets[0] == pytest.approx(2, rel=0.1)


def test_hires_takes_its_larger_pass(tiny):
    hires = estimate(tiny, hires=Hires(scale=2.0, steps=2))
    first, second = estimate(tiny), estimate(tiny, width=128, height=128)
    assert (hires.unet, hires.vae, hires.images) == (second.unet, second.vae, second.images)
    # where the heap keeps freed memory, every pass grows it: both UNet passes add up
    kept = estimate(tiny, kept_heap=True, hires=Hires(scale=2.0, steps=2))
    assert kept.unet == estimate(tiny, kept_heap=True).unet + estimate(tiny, True, width=128, height=128).unet
    assert kept.peak > hires.peak > first.peak
    # a pixel upscaler decodes the first pass and encodes the second's size too
    lanczos = Hires(scale=2.0, steps=2, upscaler="Lanczos")
    assert estimate(tiny, hires=lanczos).vae > hires.vae
    kept_pixels = estimate(tiny, kept_heap=True, hires=lanczos)  # decode, encode at 128x128, decode at 64x64
    assert kept_pixels.vae > 2 * kept.vae > 2 * estimate(tiny, kept_heap=True).vae


def test_tiling_bounds_the_vae(tiny):
    # 2048x2048 on the tiny VAE (downsampling 2): 1024x1024 latents, far above the automatic tiling
    sizes = {"width": 2048, "height": 2048}
    untiled, tiled, auto = (estimate(tiny, tiled=t, **sizes) for t in (False, True, None))
    assert auto.vae == tiled.vae < untiled.vae / 10
    # tiled, the network runs on one tile at a time: its share stays, the image buffers grow with the size
    larger = estimate(tiny, tiled=True, width=4096, height=4096)
    pixels = 3 * 4096 * 4096 * 4
    assert larger.vae - tiled.vae == pytest.approx(2 * (pixels - 3 * 2048 * 2048 * 4), rel=0.05)


def test_vae_decode_matches_its_measured_live_peak():
    """The layer-by-layer count against the peak resident memory of one decode, in a fresh process whose
    large blocks go back to the system when freed (so its resident memory follows the live tensors)."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs")
    script = textwrap.dedent(
        """
        import ctypes, torch
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: blocks above 64 KiB mapped apart
        from sdstudio.models.configs import VAEConfig
        from sdstudio.models.vae import AutoencoderKL
        from sdstudio.pipelines.vae_tiling import decode
        torch.set_num_threads(1)
        torch.manual_seed(0)
        vae = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1, norm_groups=16)).eval()
        def rss(key):
            for line in open("/proc/self/status"):
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        z = torch.randn(1, 4, 48, 48)
        with torch.inference_mode():
            decode(vae, z, False)
            open("/proc/self/clear_refs", "w").write("5")
            before = rss("VmRSS")
            out = decode(vae, z, False)
            print(rss("VmHWM") - before)
        """
    )
    measured = int(
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    )
    config = PRESETS["toyworld"].vae
    policy = memory._Policy("cpu", torch.float32, channels_last=False, threads=1)
    estimated = memory.decoder_activations(config, 1, 48, 48, policy)
    assert estimated == pytest.approx(measured, rel=0.1)


def test_far_too_big_is_refused_quickly(tiny):
    r = request(width=100_000, height=100_000)
    p = plan(tiny, r, NO_CAPS)
    before = memory.resident_bytes()
    start = time.perf_counter()
    with pytest.raises(SdStudioError) as error:
        memory.check_memory(tiny, p, r, available=16 * GiB)
    assert time.perf_counter() - start < 0.5
    assert before is None or memory.resident_bytes() - before < 64 * 2**20  # nothing large was allocated
    message = str(error.value)
    assert message.startswith("this request needs about ") and ", 16.0 GiB available; try " in message
    assert "--vae-tiling" not in message  # automatic tiling already tiles there
    assert "a smaller size (up to about " in message and "batch" not in message
    # the size it names fits, at the request's aspect ratio
    side = int(message.split("up to about ")[1].split("x")[0])
    smaller = request(width=side, height=side)
    assert memory.check_memory(tiny, plan(tiny, smaller, NO_CAPS), smaller, available=16 * GiB).tiled is None
    # with the machine's own memory too, and through generate with the pixel cap raised
    with pytest.raises(SdStudioError, match="needs about .* available; try a smaller size"):
        memory.check_memory(tiny, p, r)
    start = time.perf_counter()
    with pytest.raises(SdStudioError, match="needs about .* available; try a smaller size"):
        generate(tiny, TOKENIZER, r, limits=NO_CAPS)
    assert time.perf_counter() - start < 1


def test_refusal_names_only_what_helps(tiny):
    r = request(width=512, height=512, batch_size=8, vae_tiling=False)
    p = plan(tiny, r, NO_CAPS)
    untiled, tiled = memory.estimate(tiny, p, r, False), memory.estimate(tiny, p, r, True)
    one = dataclasses.replace(p, seeds=p.seeds[:1])
    alone = memory.estimate(tiny, one, r, True)
    # room for one tiled image, not for eight
    available = memory.with_margin(alone.needed) + 1
    assert memory.with_margin(tiled.needed) > available
    with pytest.raises(SdStudioError) as error:
        memory.check_memory(tiny, p, r, available=available)
    assert " available; try --vae-tiling on / a smaller size (up to about " in str(error.value)
    assert str(error.value).endswith(" tiled) / a smaller batch")
    auto = dataclasses.replace(r, vae_tiling=None)
    with pytest.raises(
        SdStudioError, match=r"available; try a smaller size \(up to about \d+x\d+\) / a smaller batch$"
    ):
        memory.check_memory(tiny, p, auto, available=available)
    # room for eight tiled, not untiled: an explicit "off" is kept, and the error says what would fit
    available = (memory.with_margin(tiled.needed) + memory.with_margin(untiled.needed)) // 2
    with pytest.raises(
        SdStudioError, match=r"; try --vae-tiling on / a smaller size \(up to about \d+x\d+\) /"
    ):
        memory.check_memory(tiny, p, r, available=available)
    check = memory.check_memory(tiny, p, auto, available=available)  # automatic tiling tiles this size
    assert check.tiled is None and check.estimate.vae == tiled.vae and check.warnings == ()
    # not even the weights fit
    with pytest.raises(SdStudioError, match="free some memory or use a machine with more"):
        memory.check_memory(tiny, p, r, available=1)


def test_tiling_turned_on_where_that_makes_it_fit():
    # the tiny model without attention at the UNet's full resolution (seconds, not tens, at this size)
    tiny = PRESETS["tiny"]
    config = dataclasses.replace(tiny, unet=dataclasses.replace(tiny.unet, attention_resolutions=(2,)))
    model = LoadedModel(
        model=random_model(config), config=config, path=Path("t"), dtype=torch.float32, ema=False
    )
    # 192x192 on the tiny VAE: 96x96 latents, the largest the automatic setting decodes whole
    r = request(width=192, height=192, steps=1, cfg_scale=1.0)
    p = plan(model, r, NO_CAPS)
    untiled, tiled = memory.estimate(model, p, r, None), memory.estimate(model, p, r, True)
    assert tiled.needed < untiled.needed
    budget = (memory.with_margin(tiled.needed) + memory.with_margin(untiled.needed)) // 2
    check = memory.check_memory(model, p, r, available=budget)
    assert check.tiled is True and check.estimate == tiled
    assert check.warnings[0].startswith("VAE tiling turned on: untiled, this request needs about")
    # generate decodes with it: the same image as asking for tiling, not the untiled one
    steps = []
    result = generate(model, TOKENIZER, r, steps.append, memory_budget=budget)
    asked = generate(model, TOKENIZER, dataclasses.replace(r, vae_tiling=True))
    assert result.warnings[0] == check.warnings[0] and result.request == r and len(steps) == 1
    assert np.array_equal(np.asarray(result.images[0].image), np.asarray(asked.images[0].image))
    latents = steps[0].x
    with torch.inference_mode():
        assert not torch.equal(decode_latents(model, latents, True), decode_latents(model, latents, False))
    # refused before any step
    steps.clear()
    with pytest.raises(SdStudioError, match="needs about"):
        generate(model, TOKENIZER, r, steps.append, memory_budget=1)
    assert steps == []


def test_available_bytes_takes_the_tighter_of_meminfo_and_cgroups(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\n")
    proc_cgroup = tmp_path / "cgroup"
    root = tmp_path / "fs"
    assert memory.available_bytes(meminfo, proc_cgroup, root) == 20000000 * 1024  # no cgroup file
    # cgroup v2: limit - usage + inactive page cache, the tightest of the group and its parents
    proc_cgroup.write_text("0::/jobs/one\n")
    group = root / "jobs" / "one"
    group.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("memory\n")
    (group / "memory.max").write_text(f"{8 * GiB}\n")
    (group / "memory.current").write_text(f"{6 * GiB}\n")
    (group / "memory.stat").write_text(f"anon 100\ninactive_file {GiB}\n")
    (root / "jobs" / "memory.max").write_text("max\n")
    (root / "jobs" / "memory.current").write_text(f"{7 * GiB}\n")
    assert memory.available_bytes(meminfo, proc_cgroup, root) == 3 * GiB
    (root / "jobs" / "memory.max").write_text(f"{8 * GiB}\n")  # the parent is tighter
    assert memory.available_bytes(meminfo, proc_cgroup, root) == GiB
    # cgroup v1
    v1 = tmp_path / "v1"
    (v1 / "memory" / "a").mkdir(parents=True)
    proc_cgroup.write_text("4:memory:/a\n1:cpu:/\n")
    (v1 / "memory" / "a" / "memory.limit_in_bytes").write_text(f"{4 * GiB}\n")
    (v1 / "memory" / "a" / "memory.usage_in_bytes").write_text(f"{3 * GiB}\n")
    (v1 / "memory" / "a" / "memory.stat").write_text("total_inactive_file 0\n")
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # no limit
    (v1 / "memory" / "memory.usage_in_bytes").write_text(f"{3 * GiB}\n")
    assert memory.available_bytes(meminfo, proc_cgroup, v1) == GiB
    assert memory.available_bytes(tmp_path / "absent", tmp_path / "absent", v1) is None


def test_weights_mapped_from_the_file_are_told_apart(tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_model(random_model(PRESETS["tiny"]), path, dtype=torch.float32)
    same = load_model(path, dtype=torch.float32)  # views of the mapped file
    total, mapped = memory.weight_bytes(same.model)
    params = sum(t.numel() * t.element_size() for t in same.model.state_dict().values())
    assert total == params and mapped > 0.9 * total
    cast = load_model(path, dtype=torch.bfloat16)  # copies
    assert memory.weight_bytes(cast.model) == (params // 2, 0)
    r = request()
    e = memory.estimate(same, plan(same, r), r, None)
    assert e.weights_mapped == mapped and e.needed > mapped  # pages the request will read in


@pytest.mark.skipif(not _mkldnn_bf16(), reason="oneDNN without bf16")
def test_packed_weights_counted_until_made():
    config = PRESETS["tiny"]
    model = random_model(config, dtype=torch.bfloat16)
    model.unet.to(memory_format=torch.channels_last)
    tiny = LoadedModel(model=model, config=config, path=Path("tiny"), dtype=torch.bfloat16, ema=False)
    packed, made = memory.packed_bytes(model.unet, channels_last=True)
    layers = [m for m in model.unet.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    first_conv = model.unet.input_blocks[0][0].weight
    assert packed == sum(m.weight.nbytes for m in layers) - first_conv.nbytes and made == 0
    before = estimate(tiny)
    generate(tiny, TOKENIZER, request())
    after = estimate(tiny)
    assert memory.packed_bytes(model.unet, channels_last=True) == (packed, packed)
    assert before.peak == after.peak and before.needed - after.needed == packed


def test_heap_setting_is_read_from_glibc():
    script = (
        "from sdstudio.pipelines.memory import heap_keeps_freed_memory as kept\n"
        "from sdstudio.host_memory import keep_freed_memory\n"
        "before = kept(); changed = keep_freed_memory(); print(before, changed, kept())"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.split()
    if out[1] == "False":
        pytest.skip("not glibc: the heap cannot be set")
    assert out == ["False", "True", "True"]
