"""``lora bake`` and ``lora extract`` on tiny random checkpoints.

Bake: generating with the baked file equals generating with the same LoRAs merged at run time by
``WeightPatcher`` (DDIM latents within fp32 rounding; a multiplier off by 0.1 is seen), untouched weights keep
their bits, a checkpoint stored in fp16 gives the bits of "merge in float32, round once", and the header
holds the recipe. Extract: a checkpoint baked from a rank-4 LoRA gives back >= 99.9 % of the difference's
energy at rank 4 and clearly less at rank 3 (SD 1 and SD 2's fused q/k/v); the file reads with every
module matched (our reader and diffusers' kohya loader, which also fuses it to the tuned weights) and
carries kohya's metadata and A1111's hash; near-zero differences are skipped and what no module holds is
reported. Bad inputs are one clear error each, before any work."""

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdstudio.adapters import NetworkUse, WeightPatcher, key_table, load_network, short_hash
from sdstudio.adapters.bake import (
    BAKE_METADATA,
    LoraSpec,
    bake,
    extract,
    kohya_modules,
    low_rank,
    parse_lora_spec,
)
from sdstudio.adapters.hashes import addnet_hash
from sdstudio.cli_lora import add_lora_commands
from sdstudio.errors import SdStudioError
from sdstudio.models.loading import file_sha256, load_model, read_safetensors, save_model
from sdstudio.models.tokenizer import ClipTokenizer
from sdstudio.pipelines.generate import generate
from sdstudio.types import GenerationRequest
from tests.adapters.loras import lora_targets, random_kohya, tiny_model

RANK = 4
TE, UNET = 0.7, 1.3


@dataclasses.dataclass(frozen=True)
class Files:
    base: Path  # tiny random checkpoint, fp32
    lora: Path  # random rank-4 kohya LoRA over kohya's targets (LoCon: convolutions included)
    second: Path  # another one, seed 2
    baked: Path  # base + lora (TE, UNET), fp32


def write_checkpoint(folder: Path, arch: str) -> Files:
    model = tiny_model(arch)
    base = save_model(model, folder / f"{arch}.safetensors", dtype=torch.float32)
    kohya = {m.name for m in kohya_modules(key_table(model)) if m.block != "other"}
    targets = {k: v for k, v in lora_targets(model.config, model.state_dict()).items() if k in kohya}
    assert targets.keys() == kohya  # the fixture's names (from diffusers' converters) are the kohya names
    lora, second = folder / f"{arch}-lora.safetensors", folder / f"{arch}-second.safetensors"
    save_file(random_kohya(targets, rank=RANK, alpha=3.0, seed=1), lora)
    save_file(random_kohya(targets, rank=2, alpha=1.0, seed=2), second)
    baked = bake(base, [LoraSpec(lora, TE, UNET)], folder / f"{arch}-baked.safetensors").output
    return Files(base, lora, second, baked)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory) -> Files:
    return write_checkpoint(tmp_path_factory.mktemp("sd1"), "tiny")


@pytest.fixture(scope="module")
def sd2(tmp_path_factory) -> Files:
    return write_checkpoint(tmp_path_factory.mktemp("sd2"), "tiny-sd2")


def latents_of(loaded, prompt: str = "a red ball") -> tuple[torch.Tensor, bytes]:
    """The last x0 estimate (float) and the image bytes of a short fp32 DDIM txt2img."""
    steps = []
    request = GenerationRequest(prompt=prompt, negative_prompt="blur", sampler="DDIM", steps=3, cfg_scale=5.0,
                                seed=5, width=32, height=32)  # fmt: skip
    result = generate(loaded, ClipTokenizer(), request, callback=lambda s: steps.append(s.denoised.clone()))
    return steps[-1], result.images[0].image.tobytes()


def patched(files: Files, uses):
    base = load_model(files.base)
    WeightPatcher(base).apply(uses)
    return base


# --- bake -------------------------------------------------------------------------------------------------


def test_bake_then_generate_equals_generate_with_the_lora_merged(sd1, tmp_path):
    base = load_model(sd1.base)
    network = load_network(sd1.lora, key_table(base.model))
    plain, _ = latents_of(base)
    WeightPatcher(base).apply([NetworkUse(network, TE, UNET)])
    merged, merged_image = latents_of(base)
    baked, baked_image = latents_of(load_model(sd1.baked))
    assert float((baked - merged).abs().max()) <= 1e-5
    assert baked_image == merged_image
    assert float((merged - plain).abs().max()) > 0.05  # the LoRA changes the picture
    # broken variant: the text-encoder multiplier 0.1 off; the same comparison sees it
    off = bake(sd1.base, [LoraSpec(sd1.lora, TE - 0.1, UNET)], tmp_path / "off.safetensors").output
    wrong, _ = latents_of(load_model(off))
    assert float((wrong - merged).abs().max()) > 1e-3


def test_baked_weights_recipe_and_two_networks(sd1, tmp_path):
    specs = [LoraSpec(sd1.lora, TE, UNET), parse_lora_spec(f"{sd1.second}:-0.5")]
    result = bake(sd1.base, specs, tmp_path / "two.safetensors")
    table = key_table(load_model(sd1.base).model)
    first, second = load_network(sd1.lora, table), load_network(sd1.second, table)
    reference = patched(sd1, [NetworkUse(first, TE, UNET), NetworkUse(second, -0.5, -0.5)]).model.state_dict()
    before = load_model(sd1.base).model.state_dict()
    got, metadata = read_safetensors(result.output)
    touched = {m.target.key for m in first.modules}
    assert result.weights == len(touched) and result.dtype == "fp32"
    for key, value in reference.items():
        if key in touched:
            assert float((got[key] - value).abs().max()) <= 1e-6, key
            assert not torch.equal(got[key], before[key]), key
        else:
            assert torch.equal(got[key], before[key]), key  # untouched weights keep their bits
    recipe = json.loads(metadata[BAKE_METADATA])
    assert recipe["base"] == {"file": sd1.base.name, "sha256": file_sha256(sd1.base),
                              "hash": file_sha256(sd1.base)[:10]}  # fmt: skip
    assert [(x["file"], x["hash"], x["te"], x["unet"]) for x in recipe["loras"]] == [
        (sd1.lora.name, short_hash(sd1.lora), TE, UNET),
        (sd1.second.name, short_hash(sd1.second), -0.5, -0.5),
    ]
    assert "\n".join(result.summary()).count("modules") == 2


def test_fp16_checkpoint_bakes_as_float32_merge_rounded_once(sd1, tmp_path):
    half = save_model(load_model(sd1.base).model, tmp_path / "half.safetensors", dtype=torch.float16)
    result = bake(half, [LoraSpec(sd1.lora, TE, UNET)], tmp_path / "baked16.safetensors")
    assert result.dtype == "fp16"  # the checkpoint's own dtype by default
    reference = load_model(half, dtype=torch.float32)  # float32 weights, merged in float32
    WeightPatcher(reference).apply([NetworkUse(load_network(sd1.lora, key_table(reference.model)), TE, UNET)])
    got, _ = read_safetensors(result.output)
    for key, value in reference.model.state_dict().items():
        assert torch.equal(got[key], value.to(torch.float16)), key
    as_fp32 = bake(
        half, [LoraSpec(sd1.lora, TE, UNET)], tmp_path / "baked32.safetensors", dtype=torch.float32
    )
    got32, _ = read_safetensors(as_fp32.output)
    key = next(m.target.key for m in load_network(sd1.lora, key_table(reference.model)).modules)
    assert got32[key].dtype == torch.float32 and torch.equal(got32[key], reference.model.state_dict()[key])


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("a.safetensors", LoraSpec(Path("a.safetensors"))),
        ("a.safetensors:0.5", LoraSpec(Path("a.safetensors"), 0.5)),
        ("a.safetensors:0.5:-1", LoraSpec(Path("a.safetensors"), 0.5, -1.0)),
        ("C:\\loras\\a.safetensors:2", LoraSpec(Path("C:\\loras\\a.safetensors"), 2.0)),
        ("dir:x/a.safetensors", LoraSpec(Path("dir:x/a.safetensors"))),
    ],
)
def test_lora_spec_parsing(text, spec):
    assert parse_lora_spec(text) == spec
    assert spec.unet_multiplier == (spec.te if spec.unet is None else spec.unet)


def test_bake_refuses_bad_inputs(sd1, tmp_path):
    out = tmp_path / "out.safetensors"
    with pytest.raises(SdStudioError, match="not a finite number"):
        parse_lora_spec("a.safetensors:nan")
    with pytest.raises(SdStudioError, match="no such LoRA file"):
        bake(sd1.base, [LoraSpec(tmp_path / "missing.safetensors")], out)
    with pytest.raises(SdStudioError, match="must end in .safetensors"):
        bake(sd1.base, [LoraSpec(sd1.lora)], tmp_path / "out.ckpt")
    with pytest.raises(SdStudioError, match="is also an input"):
        bake(sd1.base, [LoraSpec(sd1.lora)], sd1.base, overwrite=True)
    out.write_bytes(b"x")
    with pytest.raises(SdStudioError, match="already exists; pass --overwrite"):
        bake(sd1.base, [LoraSpec(sd1.lora)], out)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"lora_unet_nothing_here.lora_down.weight": torch.ones(1, 2),
               "lora_unet_nothing_here.lora_up.weight": torch.ones(2, 1)}, foreign)  # fmt: skip
    with pytest.raises(SdStudioError, match="nothing to bake"):
        bake(sd1.base, [LoraSpec(foreign)], out, overwrite=True)
    # not strict: the unknown module is a warning, the rest is baked
    extra = tmp_path / "extra.safetensors"
    save_file({**read_safetensors(sd1.lora)[0], **read_safetensors(foreign)[0]}, extra)
    with pytest.raises(SdStudioError, match=r"match nothing .* \(--strict-networks\)"):
        bake(sd1.base, [LoraSpec(extra)], out, strict=True, overwrite=True)
    result = bake(sd1.base, [LoraSpec(extra, TE, UNET)], out, overwrite=True)
    assert any("match nothing" in w for w in result.warnings)
    assert torch.equal(read_safetensors(out)[0]["model.diffusion_model.out.2.weight"],
                       read_safetensors(sd1.baked)[0]["model.diffusion_model.out.2.weight"])  # fmt: skip


# --- extract ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["sd1", "sd2"])
def test_extract_recovers_the_baked_lora_at_its_rank(arch, request, tmp_path):
    files: Files = request.getfixturevalue(arch)
    exact = extract(files.baked, files.base, tmp_path / "r4.safetensors", rank=RANK, conv_rank=RANK)
    assert exact.captured >= 0.999 and all(p.captured >= 0.999 for p in exact.parts)
    assert all(p.outside == 0 and p.skipped == 0 for p in exact.parts)
    # broken variant: one rank short must miss the 99.9 %
    short = extract(files.baked, files.base, tmp_path / "r3.safetensors", rank=RANK - 1, conv_rank=RANK - 1)
    assert short.captured < 0.99 and all(p.captured < 0.99 for p in short.parts)

    base = load_model(files.base)
    table = key_table(base.model)
    network = load_network(exact.output, table)
    assert network.warnings == ()  # every module name matched: the kohya names are right
    baked_from = read_safetensors(files.lora)[0]
    assert {m.name for m in network.modules} == {
        k.removesuffix(".lora_down.weight") for k in baked_from if k.endswith(".lora_down.weight")
    }
    assert all(m.factors.scale == 1.0 and m.factors.rank == RANK for m in network.modules)
    # the extracted LoRA on the base gives the tuned weights (within the fp16 rounding of its factors)
    WeightPatcher(base).apply([NetworkUse(network, 1.0, 1.0)])
    tuned = load_model(files.baked).model.state_dict()
    for key, value in base.model.state_dict().items():
        assert float((value - tuned[key]).abs().max()) <= 2e-3 * max(1.0, float(tuned[key].abs().max())), key

    _, metadata = read_safetensors(exact.output)
    sd2 = arch == "sd2"
    expected = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": "4",
        "ss_network_alpha": "4.0",
        "ss_v2": str(sd2),
        "ss_base_model_version": "sd_v2" if sd2 else "sd_v1",
    }
    assert {k: metadata[k] for k in expected} == expected
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "4.0"}
    assert metadata["sshs_model_hash"] == addnet_hash(exact.output)


@pytest.mark.parametrize("shape", [(24, 8, 3, 3), (80, 12)])  # wide (factored as its transpose), tall
def test_low_rank_is_the_truncated_svd(shape):
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(*shape, generator=gen)
    matrix = delta.flatten(1)
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    factors = low_rank(delta, 5, dtype=torch.float32)
    assert factors.up.shape == (shape[0], 5) and factors.down.shape == (5, matrix.shape[1])
    best = (u[:, :5] * s[:5]) @ vh[:5]  # Eckart-Young: the best rank-5 approximation
    assert float((factors.up.double() @ factors.down.double() - best).abs().max()) < 1e-4
    assert factors.captured == pytest.approx(float((s[:5] ** 2).sum() / (s**2).sum()), rel=1e-5)
    clamped = low_rank(delta, 5, clamp_quantile=0.9, dtype=torch.float32)  # kohya's clamping costs energy
    assert clamped.captured < factors.captured - 1e-3
    assert low_rank(delta, 500, dtype=torch.float32).down.shape[0] == min(matrix.shape)
    assert low_rank(delta, 500, dtype=torch.float32).residual < 1e-6 * factors.difference


def test_extract_skips_tiny_differences_and_reports_the_rest(sd1, tmp_path):
    model = load_model(sd1.base).model
    state = model.state_dict()
    gen = torch.Generator().manual_seed(4)
    big = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    tiny = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    with torch.no_grad():
        state[big] += torch.randn(32, 2, generator=gen) @ torch.randn(2, 32, generator=gen) * 0.1
        state[tiny] += state[tiny] * 1e-4  # under min_diff 1e-3 of the weight
        # a resnet convolution: no target without conv_rank
        state["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"] += 0.01
        state["first_stage_model.decoder.conv_out.weight"] *= 2
    tuned = save_model(model, tmp_path / "tuned.safetensors", dtype=torch.float32)
    report = extract(tuned, sd1.base, tmp_path / "x.safetensors", rank=2, dtype=torch.float32)
    unet, te = report.parts
    assert (unet.modules, unet.skipped, te.modules, te.difference) == (1, 1, 0, 0.0)
    assert unet.outside == pytest.approx(0.01**2 * 32 * 32 * 9, rel=1e-3)
    assert 0.99999 < unet.captured < 1  # what is lost is the skipped module's difference
    assert any("VAE differs" in w for w in report.warnings)
    text = "\n".join(report.summary())
    assert "1 skipped" in text and "--conv-rank" in text and "no difference" in text
    written = {k.split(".")[0] for k in read_safetensors(report.output)[0]}
    assert written == {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"}
    everything = extract(tuned, sd1.base, tmp_path / "y.safetensors", rank=2, min_diff=0)
    assert everything.parts[0].modules == 2
    # an fp16 copy of a float32 model differs by rounding only: under the default min_diff everywhere
    half = save_model(load_model(sd1.base).model, tmp_path / "half.safetensors", dtype=torch.float16)
    with pytest.raises(SdStudioError, match="under --min-diff 0.001"):
        extract(half, sd1.base, tmp_path / "z.safetensors", rank=2)


def test_extract_loads_in_diffusers(sd1, tmp_path):
    """diffusers' kohya loader takes every extracted module, and fused at scale 1 gives the tuned weights."""
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from tests.adapters.loras import diffusers_layout
    from tests.reference import a1111_scheduler, diffusers_pipeline

    report = extract(sd1.baked, sd1.base, tmp_path / "x.safetensors", rank=RANK, conv_rank=RANK)
    base, tuned = (load_model(p).model for p in (sd1.base, sd1.baked))
    pipe, _ = diffusers_pipeline(base.config, {k: v.clone() for k, v in base.state_dict().items()},
                                 a1111_scheduler("ddim"))  # fmt: skip
    pipe.load_lora_weights(str(report.output), adapter_name="x")
    assert pipe.get_list_adapters() == {"unet": ["x"], "text_encoder": ["x"]}
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0)
    pipe.unload_lora_weights()
    theirs = {f"unet.{k}": v for k, v in pipe.unet.state_dict().items()}
    for key, value in pipe.text_encoder.state_dict().items():
        theirs["text_encoder." + (key if key.startswith("text_model.") else "text_model." + key)] = value
    before, after = (
        diffusers_layout(base.config, base.state_dict()),
        diffusers_layout(tuned.config, tuned.state_dict()),
    )
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert {k for k in theirs if not torch.equal(theirs[k], before[k])} == changed
    for key in changed:
        assert float((theirs[key] - after[key]).abs().max()) <= 1e-3, key


def test_extract_refuses_bad_inputs(sd1, sd2, tmp_path):
    out = tmp_path / "x.safetensors"
    with pytest.raises(
        SdStudioError,
        match=r"different architectures: .*proj_in.weight is \[32, 32\] in the first, \[32, 32, 1, 1\]",
    ):
        extract(sd2.baked, sd1.base, out, rank=4)
    with pytest.raises(SdStudioError, match="do not differ"):
        extract(sd1.base, sd1.base, out, rank=4)
    for kw, message in [({"rank": 0}, "at least 1"), ({"rank": 4, "conv_rank": 0}, "at least 1"),
                        ({"rank": 4, "min_diff": -1.0}, ">= 0"), ({"rank": 4, "clamp_quantile": 1.5}, r"\(0, 1\]")]:  # fmt: skip
        with pytest.raises(SdStudioError, match=message):
            extract(sd1.baked, sd1.base, out, **kw)
    with pytest.raises(SdStudioError, match="under --min-diff"):
        extract(sd1.baked, sd1.base, out, rank=4, min_diff=10.0)
    out.write_bytes(b"x")
    with pytest.raises(SdStudioError, match="already exists"):
        extract(sd1.baked, sd1.base, out, rank=4)
    with pytest.raises(SdStudioError, match="is a file, not a folder"):
        extract(sd1.baked, sd1.base, out / "x.safetensors", rank=4)


def test_cli(sd1, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_lora_commands(parser.add_subparsers(dest="command", required=True))
    baked = tmp_path / "b.safetensors"
    args = parser.parse_args(["lora", "bake", str(sd1.base), f"{sd1.lora}:{TE}:{UNET}", "-o", str(baked),
                              "--dtype", "fp32"])  # fmt: skip
    assert args.func(args) == 0
    assert torch.equal(read_safetensors(baked)[0]["model.diffusion_model.out.2.weight"],
                       read_safetensors(sd1.baked)[0]["model.diffusion_model.out.2.weight"])  # fmt: skip
    assert str(baked) in capsys.readouterr().out
    args = parser.parse_args(["lora", "extract", str(baked), str(sd1.base), "--rank", "4",
                              "-o", str(tmp_path / "x.safetensors")])  # fmt: skip
    assert args.func(args) == 0
    assert "% of the difference's energy captured" in capsys.readouterr().out
    args = parser.parse_args(["lora", "extract", str(baked), str(sd1.base), "--rank", "4", "--device", "tpu",
                              "-o", str(tmp_path / "y.safetensors")])  # fmt: skip
    with pytest.raises(SdStudioError, match="--device tpu"):
        args.func(args)
