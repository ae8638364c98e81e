"""The same random kohya LoRA (LoCon on every convolution, conv_in / conv_out and the time embedding
included, alpha != rank, different text and UNet multipliers) applied by diffusers (``load_lora_weights``
with its own kohya converter, fused by PEFT) and by sdstudio to the same random tiny SD 1 checkpoint:
equal weights, equal UNet and text-encoder outputs, equal DDIM images. A wrong alpha on one module, or
one module left out, must fail the same comparisons: they are tight enough to see it. And the PEFT file
diffusers itself writes for that adapter reads as the kohya file does."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from sdstudio.adapters import NetworkUse, key_table, load_network, network_from_state_dict, networks_applied
from sdstudio.models.stablediffusion import StableDiffusion
from tests.adapters.loras import diffusers_layout, loaded, lora_targets, random_kohya, tiny_model

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

TE, UNET = 0.7, 1.3
ADAPTER = "style"
ONE_MODULE = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v"


@dataclasses.dataclass(frozen=True)
class Setup:
    model: StableDiffusion  # ours, unpatched
    state: dict  # its weights, a copy
    targets: dict  # kohya module name -> (diffusers-layout key, shape)
    kohya: dict  # the random kohya LoRA
    pipe: object  # diffusers' StableDiffusionPipeline with the LoRA fused
    clip: object  # its transformers text encoder
    theirs: dict  # its fused weights, in the diffusers layout of ``diffusers_layout``
    peft_file: Path  # the adapter as diffusers' save_lora_weights writes it


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    return build("tiny", tmp_path_factory.mktemp("peft"))


def build(arch: str, folder: Path) -> Setup:
    """The random model of ``arch``, the random LoRA, and diffusers' pipeline with it fused (its PEFT file
    written into ``folder``); ``benchmarks/lora_parity.py`` runs it at sd15's full size."""
    from peft import get_peft_model_state_dict

    from tests.reference import a1111_scheduler, diffusers_pipeline

    model = tiny_model(arch, seed=11)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    targets = lora_targets(model.config, state)
    kohya = random_kohya(targets, rank=4, alpha=3.0, seed=7)
    for key in kohya:  # another alpha on the convolutions, as kohya's conv_alpha: per-module alphas matter
        if key.endswith(".alpha") and "conv" in key:
            kohya[key] = torch.tensor(2.0)
    # diffusers' modules take our tensors by assignment: its own copies, or fusing would change ours
    pipe, clip = diffusers_pipeline(
        model.config, {k: v.clone() for k, v in state.items()}, a1111_scheduler("ddim")
    )
    pipe.load_lora_weights(dict(kohya), adapter_name=ADAPTER)
    assert pipe.get_list_adapters() == {"unet": [ADAPTER], "text_encoder": [ADAPTER]}
    # the PEFT file diffusers writes for this adapter, with its LoraConfig (alpha_pattern for the convs)
    type(pipe).save_lora_weights(
        folder,
        unet_lora_layers=get_peft_model_state_dict(pipe.unet, adapter_name=ADAPTER),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder, adapter_name=ADAPTER),
        unet_lora_adapter_metadata=pipe.unet.peft_config[ADAPTER].to_dict(),
        text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config[ADAPTER].to_dict(),
    )
    pipe.fuse_lora(components=["unet"], lora_scale=UNET)
    pipe.fuse_lora(components=["text_encoder"], lora_scale=TE)
    pipe.unload_lora_weights()  # drops PEFT's wrappers, keeps the fused weights
    theirs = {f"unet.{k}": v for k, v in pipe.unet.state_dict().items()}
    for key, value in pipe.text_encoder.state_dict().items():
        theirs["text_encoder." + (key if key.startswith("text_model.") else "text_model." + key)] = value
    return Setup(
        model, state, targets, kohya, pipe, clip, theirs, folder / "pytorch_lora_weights.safetensors"
    )


def variant(kohya: dict, how: str) -> dict:
    state = dict(kohya)
    if how == "wrong-alpha":
        state[f"{ONE_MODULE}.alpha"] = state[f"{ONE_MODULE}.alpha"] * 1.25
    elif how == "skipped-module":
        for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
            del state[ONE_MODULE + suffix]
    return state


def outputs(model, pipe, clip, tokens, x, t, context):
    """(ours, theirs) for the text encoder on ``tokens`` and the UNet on ``x, t, context``."""
    with torch.no_grad():
        ours_text = model.text_encoder(tokens, clip_skip=1)
        ours_unet = model.unet(x, t, context)
        their_text = clip(tokens).last_hidden_state
        their_unet = pipe.unet(x, t, encoder_hidden_states=context).sample
    return (ours_text, their_text), (ours_unet, their_unet)


def test_fused_weights_equal(setup):
    model, theirs = setup.model, setup.theirs
    network = network_from_state_dict(setup.kohya, key_table(model), name="style")
    with networks_applied(model, [NetworkUse(network, te=TE, unet=UNET)]):
        ours = {k: v.clone() for k, v in diffusers_layout(model.config, model.state_dict()).items()}
    base = diffusers_layout(model.config, setup.state)
    assert ours.keys() == theirs.keys()
    for key in theirs:
        error = float((ours[key] - theirs[key]).abs().max())
        assert error <= 2e-6, f"{key}: {error}"
    moved = [k for k in theirs if not torch.equal(theirs[k], base[k])]
    assert sorted(moved) == sorted(
        key for key, _ in setup.targets.values()
    )  # diffusers applied every module too


@pytest.mark.parametrize("how", ["exact", "wrong-alpha", "skipped-module"])
def test_outputs_equal_and_a_broken_lora_is_seen(setup, how):
    model = setup.model
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 49408, (2, 77), generator=gen)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([999.0, 20.0])
    context = torch.randn(2, 77, model.config.unet.context_dim, generator=gen)
    network = network_from_state_dict(variant(setup.kohya, how), key_table(model), name=how)
    with networks_applied(model, [NetworkUse(network, te=TE, unet=UNET)]):
        text, unet = outputs(model, setup.pipe, setup.clip, tokens, x, t, context)
    text_error = float((text[0] - text[1]).abs().max())
    unet_error = float((unet[0] - unet[1]).abs().max())
    assert text_error < 1e-5  # the broken module is in the UNet: the text encoder still agrees
    if how == "exact":
        assert unet_error < 1e-5, unet_error
    else:
        assert unet_error > 1e-3, unet_error  # 100x the tolerance: the comparison sees one module's change


def test_ddim_images_within_40_db(setup):
    """The issue's acceptance measure: txt2img (DDIM, 10 steps, CFG 7, fp32, 32x32) with the LoRA, ours against
    diffusers' pipeline with the fused LoRA, >= 40 dB PSNR (and the LoRA visibly changes the image)."""
    to_theirs, to_plain = ddim_psnr(setup, 32)
    assert to_theirs >= 40
    assert to_plain < 30  # the LoRA changes the picture: the 40 dB say something


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean().clamp_min(1e-20)))


def ddim_psnr(setup: Setup, size: int, steps: int = 10) -> tuple[float, float]:
    """PSNR of our DDIM image with the LoRA against diffusers' (the parity), and against ours without it."""
    from sdstudio.models.tokenizer import ClipTokenizer
    from sdstudio.pipelines.txt2img import decode_latents, parse_request, plan, sample_latents
    from sdstudio.prompt.conditioning import chunk_tokens, encode_conditioning
    from sdstudio.types import GenerationRequest

    model, pipe, clip = setup.model, setup.pipe, setup.clip
    request = GenerationRequest(prompt="a red circle", negative_prompt="blurry", sampler="DDIM", steps=steps,
                                cfg_scale=7.0, seed=1234, width=size, height=size)  # fmt: skip
    tokenizer = ClipTokenizer()
    runnable = loaded(model)

    def ours() -> torch.Tensor:
        p = plan(runnable, request)
        with torch.inference_mode():
            cond = encode_conditioning(
                model.text_encoder, tokenizer, model.config.text, *parse_request(request), 1
            )
            image = decode_latents(
                runnable, sample_latents(runnable, p, cond, request.steps, request.cfg_scale)
            )
        return ((image + 1) / 2).clamp(0, 1)

    plain = ours()
    network = network_from_state_dict(setup.kohya, key_table(model), name="style")
    with networks_applied(runnable, [NetworkUse(network, te=TE, unet=UNET)]):
        with_lora = ours()
    ids = [
        chunk_tokens(tokenizer.encode(s), model.config.text)[0]
        for s in (request.prompt, request.negative_prompt)
    ]
    with torch.inference_mode():
        embeds = clip(torch.tensor(ids)).last_hidden_state
        down = model.config.vae.downsample
        latents = torch.randn((1, 4, size // down, size // down), generator=torch.Generator().manual_seed(request.seed))
        theirs_image = pipe(prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:], num_inference_steps=steps,
                            guidance_scale=7.0, eta=0.0, latents=latents, height=size, width=size,
                            output_type="pt").images  # fmt: skip
    return psnr(with_lora, theirs_image), psnr(with_lora, plain)


def test_diffusers_written_peft_file_reads_as_the_kohya_file(setup):
    table = key_table(setup.model)
    peft = load_network(setup.peft_file, table)
    assert peft.warnings == () and json.loads(peft.metadata["lora_adapter_metadata"])["unet.alpha_pattern"]
    reference = {
        m.target.key: m.delta() for m in network_from_state_dict(setup.kohya, table, name="k").modules
    }
    got = {m.target.key: m.delta() for m in peft.modules}
    assert got.keys() == reference.keys()
    for key, value in reference.items():
        assert float((got[key] - value).abs().max()) <= 1e-6, key
