"""SDXL LoRAs through our adapters, against diffusers' ``StableDiffusionXLPipeline.load_lora_weights`` +
``fuse_lora`` on the same random ``tiny-sdxl`` weights (fp32).

The random kohya files are named from independent sources: the UNet by our checkpoint's own LDM module
names (kohya sd-scripts trains SDXL on sgm's UNet: ``lora_unet_input_blocks_4_1_...``, conv_in, time_embed,
label_emb and out included) or by diffusers' UNet module paths (``lora_unet_down_blocks_1_attentions_0_...``),
the text encoders by transformers' module paths of CLIP-L (``lora_te1_``) and bigG (``lora_te2_``, whose
q/k/v land on row blocks of our packed ``in_proj_weight``). Alphas differ from the rank and between modules.
Swapping te1 / te2, or a wrong alpha on one bigG module, must fail the same comparisons.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdstudio.adapters import (
    NetworkLibrary,
    NetworkUse,
    key_table,
    load_network,
    network_from_state_dict,
    networks_applied,
)
from sdstudio.models.sdxl import SizeConditioning, size_vector
from sdstudio.models.stablediffusion import StableDiffusion
from tests.adapters.loras import loaded, random_kohya, tiny_model

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

TE, UNET = 0.7, 1.3
ADAPTER = "xl"
UNET_PREFIX = "model.diffusion_model."
WRONG_ALPHA = "lora_te2_text_model_encoder_layers_1_self_attn_k_proj"  # a row block of bigG's in_proj_weight
# the CLIPEncoderLayer linears kohya targets (transformers >= 5's CLIPTextModel has no text_model. prefix)
_TEXT = re.compile(r"(?:text_model\.)?(encoder\.layers\.\d+\.(?:self_attn\.[qkvo]\w*_proj|mlp\.fc[12]))")
WEIGHT_TOL = 1e-6  # fused weights, fp32 (seen: 6e-8)
OUTPUT_TOL = 1e-5  # UNet and text-encoder outputs, fp32


@dataclasses.dataclass(frozen=True)
class Fused:
    """diffusers' pipeline with one kohya file loaded and fused, and its weights in diffusers' layout."""

    pipe: object
    clip_l: object
    big_g: object
    weights: dict[str, torch.Tensor]  # "unet.<path>", "text_encoder.<path>", "text_encoder_2.<path>"


@dataclasses.dataclass(frozen=True)
class Setup:
    model: StableDiffusion  # ours, unpatched
    state: dict[str, torch.Tensor]  # its weights, a copy
    base: dict[str, torch.Tensor]  # those weights in diffusers' layout
    files: dict[str, dict[str, torch.Tensor]]  # "ldm" / "diffusers": the random kohya LoRAs
    fused: dict[str, Fused]
    peft_file: Path  # the "ldm" adapter as diffusers' save_lora_weights writes it


def _layout(config, state: dict[str, torch.Tensor]):
    """(StableDiffusionXLPipeline, CLIP-L, bigG) holding a copy of a single-file state dict, through
    diffusers' own converters (tests.reference)."""
    from tests.reference import a1111_scheduler, diffusers_sdxl_pipeline

    # diffusers' modules take the tensors by assignment: its own copies, or fusing would change ours
    pipe, clip_l, big_g = diffusers_sdxl_pipeline(
        config, {k: v.clone() for k, v in state.items()}, a1111_scheduler("euler")
    )
    return pipe, clip_l, big_g


def _weights(pipe) -> dict[str, torch.Tensor]:
    """The pipeline's UNet and text encoders' weights by "unet." / "text_encoder." / "text_encoder_2." keys."""
    out = {f"unet.{k}": v for k, v in pipe.unet.state_dict().items()}
    for component in ("text_encoder", "text_encoder_2"):
        for key, value in getattr(pipe, component).state_dict().items():
            out[f"{component}.{key if key.startswith('text_model.') else 'text_model.' + key}"] = value
    return out


def _kohya_names(
    state: dict[str, torch.Tensor], pipe, unet_names: str
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """kohya module name -> ("", shape) for ``random_kohya``: every UNet linear / convolution by its LDM
    name (``unet_names="ldm"``, from our checkpoint keys) or its diffusers path (from diffusers' UNet), and
    the attention / MLP linears of both text encoders by their transformers paths."""
    targets: dict[str, tuple[str, tuple[int, ...]]] = {}
    if unet_names == "ldm":
        unet = {k.removeprefix(UNET_PREFIX): v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    else:  # no kohya tool writes add_embedding by its diffusers name (diffusers' converter cannot read it)
        unet = {k: v for k, v in pipe.unet.state_dict().items() if not k.startswith("add_embedding.")}
    for key, value in unet.items():
        if key.endswith(".weight") and value.ndim in (2, 4):
            targets["lora_unet_" + key.removesuffix(".weight").replace(".", "_")] = ("", tuple(value.shape))
    for prefix, encoder in (("lora_te1_", pipe.text_encoder), ("lora_te2_", pipe.text_encoder_2)):
        for key, value in encoder.state_dict().items():
            if (m := _TEXT.fullmatch(key.removesuffix(".weight"))) and key.endswith(".weight"):
                targets[prefix + "text_model_" + m[1].replace(".", "_")] = ("", tuple(value.shape))
    return targets


def _kohya_file(targets, seed: int) -> dict[str, torch.Tensor]:
    kohya = random_kohya(targets, rank=4, alpha=3.0, seed=seed)
    # another alpha on convolutions (kohya's conv_alpha) and on bigG: per-module alphas count
    for key in kohya:
        if key.endswith(".alpha") and ("conv" in key or key.startswith("lora_te2_")):
            kohya[key] = torch.tensor(2.0)
    return kohya


def _fuse(config, state, kohya: dict[str, torch.Tensor], folder: Path | None = None) -> Fused:
    from peft import get_peft_model_state_dict

    pipe, clip_l, big_g = _layout(config, state)
    pipe.load_lora_weights(dict(kohya), adapter_name=ADAPTER)
    components = ("unet", "text_encoder", "text_encoder_2")
    assert pipe.get_list_adapters() == {c: [ADAPTER] for c in components}
    if folder is not None:  # the PEFT file diffusers writes for this adapter, with its LoraConfigs
        type(pipe).save_lora_weights(
            folder,
            unet_lora_layers=get_peft_model_state_dict(pipe.unet, adapter_name=ADAPTER),
            text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder, adapter_name=ADAPTER),
            text_encoder_2_lora_layers=get_peft_model_state_dict(pipe.text_encoder_2, adapter_name=ADAPTER),
            unet_lora_adapter_metadata=pipe.unet.peft_config[ADAPTER].to_dict(),
            text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config[ADAPTER].to_dict(),
            text_encoder_2_lora_adapter_metadata=pipe.text_encoder_2.peft_config[ADAPTER].to_dict(),
        )
    pipe.fuse_lora(components=["unet"], lora_scale=UNET)
    pipe.fuse_lora(components=["text_encoder", "text_encoder_2"], lora_scale=TE)
    pipe.unload_lora_weights()  # drops PEFT's wrappers, keeps the fused weights
    return Fused(pipe, clip_l, big_g, _weights(pipe))


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    model = tiny_model("tiny-sdxl", seed=11)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pipe, _, _ = _layout(model.config, state)
    files = {how: _kohya_file(_kohya_names(state, pipe, how), seed=7) for how in ("ldm", "diffusers")}
    folder = tmp_path_factory.mktemp("sdxl_peft")
    fused = {how: _fuse(model.config, state, files[how], folder if how == "ldm" else None) for how in files}
    return Setup(model, state, _weights(pipe), files, fused, folder / "pytorch_lora_weights.safetensors")


def _modules(kohya: dict[str, torch.Tensor]) -> set[str]:
    return {k.removesuffix(".lora_down.weight") for k in kohya if k.endswith(".lora_down.weight")}


def test_every_sdxl_weight_has_its_names():
    """Each UNet linear / convolution under its LDM and diffusers names, CLIP-L under lora_te1_ /
    text_encoder., bigG under lora_te2_ / text_encoder_2. with q/k/v as row blocks; the refiner's bigG alone
    under lora_te2_ (base files) and lora_te_ (ComfyUI's single-bigG names)."""
    model = tiny_model("tiny-sdxl")
    table = key_table(model)
    ldm = [k for k, p in model.named_parameters() if k.startswith(UNET_PREFIX) and p.ndim in (2, 4)]
    assert len(ldm) == 174
    for key in ldm:
        name = "lora_unet_" + key.removeprefix(UNET_PREFIX).removesuffix(".weight").replace(".", "_")
        target = table.get(name)
        assert target is not None and target.key == key and target.part == "unet"
    assert table.get("lora_unet_label_emb_0_2").key == UNET_PREFIX + "label_emb.0.2.weight"
    assert table.get("unet.add_embedding.linear_2") == table.get("lora_unet_label_emb_0_2")
    # diffusers' up_blocks.0 is the lowest level: 2 transformer blocks there, 1 at the middle level
    deep = table.get("lora_unet_up_blocks_0_attentions_1_transformer_blocks_1_attn2_to_k")
    assert deep.key == UNET_PREFIX + "output_blocks.1.1.transformer_blocks.1.attn2.to_k.weight"
    assert table.get("lora_unet_up_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k") is None
    proj_in = table.get("unet.down_blocks.1.attentions.0.proj_in")
    assert proj_in == table.get("lora_unet_input_blocks_3_1_proj_in") and proj_in.shape == (32 * 2, 32 * 2)

    width = model.config.text2.width
    te1 = table.get("lora_te1_text_model_encoder_layers_1_self_attn_q_proj")
    clip_l = "conditioner.embedders.0.transformer.text_model.encoder.layers."
    assert te1.key == clip_l + "1.self_attn.q_proj.weight"
    assert te1.rows is None and table.get("text_encoder.text_model.encoder.layers.1.self_attn.q_proj") == te1
    for i, proj in enumerate("qkv"):
        te2 = table.get(f"lora_te2_text_model_encoder_layers_2_self_attn_{proj}_proj")
        assert te2.key == "conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight"
        assert te2.rows == (i * width, (i + 1) * width) and te2.shape == (width, width) and te2.part == "te"
        assert table.get(f"text_encoder_2.text_model.encoder.layers.2.self_attn.{proj}_proj") == te2
    fc = table.get("lora_te2_text_model_encoder_layers_0_mlp_fc1")
    assert fc.key == "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight"
    # no name of one encoder reaches the other; bare or lora_te_ names are ambiguous with two encoders
    assert table.get("lora_te1_text_model_encoder_layers_2_self_attn_q_proj") is None  # CLIP-L has 2 layers
    assert table.get("lora_te_text_model_encoder_layers_0_mlp_fc1") is None
    assert table.get("text_model.encoder.layers.0.mlp.fc1") is None

    refiner = key_table(tiny_model("tiny-sdxl-refiner"))
    q = refiner.get("lora_te2_text_model_encoder_layers_1_self_attn_v_proj")
    assert q.key == "conditioner.embedders.0.model.transformer.resblocks.1.attn.in_proj_weight"
    assert q.rows == (2 * width, 3 * width)
    for alias in ("lora_te_text_model_encoder_layers_1_self_attn_v_proj",
                  "text_encoder_2.text_model.encoder.layers.1.self_attn.v_proj",
                  "text_encoder.text_model.encoder.layers.1.self_attn.v_proj"):  # fmt: skip
        assert refiner.get(alias) == q
    assert refiner.get("lora_te1_text_model_encoder_layers_1_self_attn_v_proj") is None
    assert refiner.get("lora_unet_output_blocks_2_1_transformer_blocks_0_attn1_to_out_0").key == (
        UNET_PREFIX + "output_blocks.2.1.transformer_blocks.0.attn1.to_out.0.weight"
    )


def test_full_size_sdxl_names_kohyas_default_targets():
    """sdxl at full size (on the meta device): kohya's default SDXL LoRA targets, every linear in the UNet's
    transformers (722 modules in real files: 70 blocks x 10 linears + 11 x proj_in / proj_out) and both
    encoders' attention and MLP linears (12 and 32 layers x 6), each under its kohya name, right shape."""
    from sdstudio.models.configs import PRESETS

    with torch.device("meta"):
        model = StableDiffusion(PRESETS["sdxl"])
    table = key_table(model)
    unet = [
        f"{name}.{sub}"
        for name, module in model.unet.named_modules()
        if hasattr(module, "transformer_blocks")
        for sub, child in module.named_modules()
        if isinstance(child, torch.nn.Linear)
    ]
    assert len(unet) == 722
    for path in unet:
        target = table.get("lora_unet_" + path.replace(".", "_"))
        assert target is not None and target.key == f"{UNET_PREFIX}{path}.weight"
        assert target.shape == tuple(model.get_parameter(target.key).shape)
    for prefix, layers, width in (("lora_te1_", 12, 768), ("lora_te2_", 32, 1280)):
        for i in range(layers):
            for part in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj"):
                target = table.get(f"{prefix}text_model_encoder_layers_{i}_{part}")
                assert target is not None and target.shape == (width, width)
            fc1 = table.get(f"{prefix}text_model_encoder_layers_{i}_mlp_fc1")
            assert fc1 is not None and fc1.shape == (4 * width, width)
    assert table.get("lora_te2_text_model_encoder_layers_31_self_attn_v_proj").rows == (2560, 3840)


def _ours_in_diffusers_layout(model: StableDiffusion, network) -> dict[str, torch.Tensor]:
    with networks_applied(model, [NetworkUse(network, te=TE, unet=UNET)]):
        merged = {k: v.clone() for k, v in model.state_dict().items()}
    pipe, _, _ = _layout(model.config, merged)
    return _weights(pipe)


@pytest.mark.parametrize("unet_names", ["ldm", "diffusers"])
def test_fused_weights_equal_diffusers(setup, unet_names):
    kohya = setup.files[unet_names]
    network = network_from_state_dict(kohya, key_table(setup.model), name=unet_names)
    assert network.warnings == () and len(network.modules) == len(_modules(kohya))  # every key used
    ours = _ours_in_diffusers_layout(setup.model, network)
    theirs = setup.fused[unet_names].weights
    assert ours.keys() == theirs.keys()
    errors = {k: float((ours[k] - theirs[k]).abs().max()) for k in theirs}
    worst = max(errors, key=errors.__getitem__)
    assert errors[worst] <= WEIGHT_TOL, f"{worst}: {errors[worst]}"
    moved = {k for k in theirs if not torch.equal(theirs[k], setup.base[k])}
    assert moved == {k for k in ours if not torch.equal(ours[k], setup.base[k])}
    # every targeted weight moved: 174 (ldm) / 172 (diffusers, no add_embedding) UNet weights, 2 x 6 CLIP-L
    # linears, 3 x 6 bigG ones (q, k, v as transformers' separate weights)
    parts = {p: sum(k.startswith(p + ".") for k in moved) for p in ("unet", "text_encoder", "text_encoder_2")}
    assert parts == {"unet": 174 if unet_names == "ldm" else 172, "text_encoder": 12, "text_encoder_2": 18}


def _variant(kohya: dict[str, torch.Tensor], how: str) -> dict[str, torch.Tensor]:
    if how == "swapped-te":  # te1's tensors under te2's names and back (tiny-sdxl's encoders are as wide)
        swap = {"lora_te1_": "lora_te2_", "lora_te2_": "lora_te1_"}
        return {swap.get(k[:9], k[:9]) + k[9:]: v for k, v in kohya.items()}
    state = dict(kohya)
    if how == "wrong-alpha":
        state[f"{WRONG_ALPHA}.alpha"] = state[f"{WRONG_ALPHA}.alpha"] * 1.25
    return state


def _inputs(model: StableDiffusion):
    gen = torch.Generator().manual_seed(0)
    body = torch.randint(1, 49000, (2, 12), generator=gen)
    framed = torch.cat([torch.full((2, 1), 49406), body, torch.full((2, 1), 49407)], dim=1)
    ids_l = torch.cat([framed, torch.full((2, 63), 49407)], dim=1)  # CLIP-L pads with EOS, bigG with 0
    ids_g = torch.cat([framed, torch.zeros(2, 63, dtype=torch.long)], dim=1)
    config = model.config.unet
    x = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 77, config.context_dim, generator=gen)
    pooled = torch.randn(2, model.config.text2.projection_dim, generator=gen)
    return ids_l, ids_g, x, torch.tensor([999.0, 20.0]), context, pooled


@pytest.mark.parametrize("how", ["exact", "swapped-te", "wrong-alpha"])
def test_outputs_equal_diffusers_and_a_broken_lora_is_seen(setup, how):
    """Each encoder's last layer (every LoRA'd layer before it), bigG's pooled text, the UNet with its
    vector: within 1e-5 of diffusers' for the file as written, 100x that off where the file is broken."""
    model, fused = setup.model, setup.fused["ldm"]
    ids_l, ids_g, x, t, context, pooled = _inputs(model)
    size = SizeConditioning(original=(96, 80), target=(64, 72), crop=(8, 4))
    time_ids = torch.tensor([[96.0, 80.0, 8.0, 4.0, 64.0, 72.0]] * 2)  # diffusers' add_time_ids of ``size``
    added = {"text_embeds": pooled, "time_ids": time_ids}
    network = network_from_state_dict(_variant(setup.files["ldm"], how), key_table(model), name=how)
    clip_l, big_g = model.text_encoder.encoders
    with networks_applied(model, [NetworkUse(network, te=TE, unet=UNET)]), torch.no_grad():
        ours = {
            "clip_l": clip_l(ids_l, clip_skip=1),
            "big_g": big_g(ids_g, clip_skip=1),
            "pooled": big_g.encode(ids_g, 2)[1],
            "unet": model.unet(x, t, context, y=size_vector(pooled, size, refiner=False)),
        }
    with torch.no_grad():
        out_l = fused.clip_l(ids_l, output_hidden_states=True)
        out_g = fused.big_g(ids_g, output_hidden_states=True)
        theirs = {
            "clip_l": out_l.hidden_states[-1],  # before the final LayerNorm, as SDXL's encoders give it
            "big_g": out_g.hidden_states[-1],
            "pooled": out_g.text_embeds,
            "unet": fused.pipe.unet(x, t, context, added_cond_kwargs=added).sample,
        }
    errors = {k: float((ours[k] - theirs[k]).abs().max()) for k in ours}
    assert ours["unet"].std() > 0.1 and ours["big_g"].std() > 0.1
    text = {"clip_l", "big_g", "pooled"}
    broken = {"exact": set(), "swapped-te": text, "wrong-alpha": text - {"clip_l"}}[how]
    for part, error in errors.items():
        if part in broken:
            assert error > 100 * OUTPUT_TOL, (part, errors)
        else:
            assert error < OUTPUT_TOL, (part, errors)
    if how == "swapped-te":  # bigG's third layer has no CLIP-L twin: said, not silently dropped
        assert len(network.warnings) == 1 and "lora_te1_text_model_encoder_layers_2" in network.warnings[0]


def test_diffusers_written_peft_file_reads_as_the_kohya_file(setup):
    """``unet.`` / ``text_encoder.`` / ``text_encoder_2.`` PEFT keys with the alphas in the adapter metadata
    (bigG's 2 / rank 4 only there): the same deltas as the kohya file they came from."""
    table = key_table(setup.model)
    peft = load_network(setup.peft_file, table)
    assert peft.warnings == ()
    assert any(k.startswith("text_encoder_2.") for k in (m.name for m in peft.modules))
    reference = {
        (m.target.key, m.target.rows): m.delta()
        for m in network_from_state_dict(setup.files["ldm"], table, name="k").modules
    }
    got = {(m.target.key, m.target.rows): m.delta() for m in peft.modules}
    assert got.keys() == reference.keys() and len(got) == 204
    for key, delta in reference.items():
        assert float((got[key] - delta).abs().max()) <= 1e-6, key


def test_lora_tag_changes_an_sdxl_image_and_every_key_is_used(setup, tmp_path, caplog):
    from sdstudio.engine import Pipeline
    from sdstudio.types import GenerationRequest

    folder = tmp_path / "loras"
    folder.mkdir()
    save_file(setup.files["ldm"], folder / "xl_style.safetensors")
    model = tiny_model("tiny-sdxl", seed=11)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pipeline = Pipeline(loaded(model), loras=NetworkLibrary([folder]))

    def image(prompt: str):
        result = pipeline(GenerationRequest(prompt, sampler="Euler", steps=3, seed=5, width=64, height=64))
        return result, np.asarray(result.images[0].image).astype(np.float64)

    with caplog.at_level(logging.WARNING):
        _, plain_image = image("a red cat")
        tagged, tagged_image = image("a red cat <lora:xl_style:1>")
        _, again_image = image("a red cat")
    assert tagged.warnings == () and not [r for r in caplog.records if r.name.startswith("sdstudio.adapters")]
    assert pipeline.networks.patcher.applied == ()  # the last request had no tag
    read = load_network(folder / "xl_style.safetensors", key_table(model))
    assert read.warnings == () and len(read.modules) == len(_modules(setup.files["ldm"]))
    assert 'Lora hashes: "xl_style: ' in tagged.images[0].infotext
    assert np.abs(tagged_image - plain_image).mean() > 2  # the LoRA changes the picture (0..255 scale)
    assert np.array_equal(plain_image, again_image)  # and goes away again, bit for bit
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
