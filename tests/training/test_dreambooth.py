"""DreamBooth and full fine-tuning on a tiny model: the loss goes down, the EMA the trainer computed is what
``load_model(use_ema=True)`` and diffusers' single-file loader read back, class images are generated once,
the prior-preservation loss is the hand-computed sum, gradient accumulation equals a larger batch, the
schedules give their learning rates, and a killed run resumes to the same weights."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from sdstudio.errors import SdStudioError
from sdstudio.models.loading import LoadedModel, load_model
from sdstudio.models.stablediffusion import EMA_PREFIX, TEXT_PREFIX, UNET_PREFIX, ema_key
from sdstudio.models.tokenizer import ClipTokenizer
from sdstudio.prompt.conditioning import encode_captions
from sdstudio.training.dreambooth import (
    CLASS_MANIFEST,
    CheckpointedUNet,
    DreamBoothConfig,
    FinetuneConfig,
    PriorPreservation,
    pipeline_class_images,
    prepare_class_images,
    train_dreambooth,
    train_finetune,
)
from sdstudio.training.finetune import RunConfig, TrainingData, dataset_config_for, training_denoiser
from sdstudio.training.trainer import (
    EMA,
    LOG_FILE,
    PLOT_FILE,
    STATE_FILE,
    TrainConfig,
    ema_decay,
    learning_rate,
    read_log,
    train,
)
from tests.adapters.loras import loaded, tiny_model
from tests.training.test_finetune import write_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"))


def fresh() -> LoadedModel:
    return loaded(tiny_model("tiny", seed=2))  # the same weights every call: runs train models in place


def fixed_loss(model: LoadedModel, latents: torch.Tensor, captions: list[str]) -> float:
    """The denoising loss of a fixed batch at fixed timesteps and noise."""
    with torch.no_grad():
        context = encode_captions(model.model.text_encoder, ClipTokenizer(), model.config.text, captions, 1)
        generator = torch.Generator().manual_seed(11)
        return float(training_denoiser(model).training_loss(latents, context, generator).mean())


@pytest.fixture(scope="module")
def finetuned(data, tmp_path_factory) -> tuple[Path, LoadedModel, Path, float, float]:
    """One short full fine-tune with an EMA: (checkpoint, trained model, run folder, loss before, after)."""
    out = tmp_path_factory.mktemp("finetune")
    model = fresh()
    source = TrainingData.open(data, dataset_config_for(model), model, out / "fixed", 4, 0)
    latents, captions = source.batch(0, torch.Generator().manual_seed(0))
    before = fixed_loss(model, latents, captions)
    config = FinetuneConfig(ema_decay=0.9, save_dtype="fp32")
    run = RunConfig(steps=12, batch_size=2, lr=1e-3, bf16=False, save_every=100)
    (path,) = train_finetune(model, data, out / "run", config, run)
    return path, model, out / "run", before, fixed_loss(model, latents, captions)


def test_full_finetune_lowers_the_loss_and_plots_it(finetuned):
    path, _, out, before, after = finetuned
    assert path == out / "finetune.safetensors"
    assert after < 0.8 * before, (before, after)
    records = read_log(out / "state" / LOG_FILE)
    assert [r["step"] for r in records] == list(range(1, 13))
    assert (out / "state" / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ema_is_written_as_ldm_keys_and_loads_back(finetuned):
    path, model, out, _, _ = finetuned
    ema = torch.load(out / "state" / STATE_FILE, weights_only=True)["ema"]  # what the trainer computed
    state = load_file(path)
    assert float(state[EMA_PREFIX + "decay"]) == pytest.approx(0.9)
    assert int(state[EMA_PREFIX + "num_updates"]) == 12
    assert state[ema_key(UNET_PREFIX + "out.2.weight")].shape == model.model.unet.out[2].weight.shape
    with_ema = load_model(path, use_ema=True).model.unet.state_dict()
    plain = load_model(path).model.unet.state_dict()
    trained = model.model.unet.state_dict()
    assert set(with_ema) == set(ema)
    for key in ema:
        assert torch.equal(with_ema[key], ema[key]), key
        assert torch.equal(plain[key], trained[key]), key
    # a broken variant would pass if the EMA were the weights themselves: it is not
    assert max(float((ema[k] - trained[k]).abs().max()) for k in ema) > 1e-4


def test_checkpoint_loads_in_diffusers(finetuned, tmp_path):
    """diffusers' ``from_single_file`` (configs from a local folder, no hub) reads the trained UNet, and its
    LDM converter's ``extract_ema`` reads the same EMA weights as ``load_model(use_ema=True)``."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from sdstudio.models.diffusers_save import folder_configs

    path, model, _, _, _ = finetuned
    for name, content in folder_configs(model.config, model.config.text.layers, torch.float32).items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(json.dumps(content))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.StableDiffusionPipeline.from_single_file(
            str(path), config=str(tmp_path), local_files_only=True, safety_checker=None,
            requires_safety_checker=False, tokenizer=None,
        )  # fmt: skip
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, model.config.unet.context_dim, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500.0])
    with torch.no_grad():
        ours = model.model.unet(x, t, context)
        theirs = pipe.unet(x, t, encoder_hidden_states=context).sample
    assert torch.allclose(ours, theirs, atol=1e-5), float((ours - theirs).abs().max())

    state = load_file(path)
    unet_config = dict(pipe.unet.config)
    extracted = convert_ldm_unet_checkpoint(state, unet_config, extract_ema=True)
    ema_unet = {UNET_PREFIX + k: v for k, v in load_model(path, use_ema=True).model.unet.state_dict().items()}
    expected = convert_ldm_unet_checkpoint(ema_unet, unet_config)
    assert extracted.keys() == expected.keys()
    assert all(torch.equal(extracted[k], expected[k]) for k in expected)
    assert not all(torch.equal(extracted[k], pipe.unet.state_dict()[k]) for k in expected)


def _linear_run(config: TrainConfig, out: Path) -> tuple[EMA, list[dict[str, torch.Tensor]]]:
    """Train a small linear layer; its EMA and its weights before and after every step."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    target, inputs = torch.randn(8, 3), torch.randn(8, 4)
    snapshots = [{k: v.clone() for k, v in layer.state_dict().items()}]

    def loss_fn(step: int, generator: torch.Generator) -> torch.Tensor:
        return (layer(inputs) - target).pow(2).mean()

    def keep(step: int, loss: float) -> None:
        snapshots.append({k: v.clone() for k, v in layer.state_dict().items()})

    _, ema = train(layer, loss_fn, config, out, progress=keep)
    assert ema is not None
    return ema, snapshots


def test_ema_warmup_follows_litema(tmp_path):
    """The EMA after each step equals the hand-computed LitEma recursion
    ``shadow = d * shadow + (1 - d) * w`` with ``d = min(decay, (1 + n) / (10 + n))``, and not the one
    without warm-up; the "power" warm-up is diffusers' ``1 - (1 + n / inv_gamma) ** -power``."""
    for warmup, decay_of in (
        ("ldm", lambda n: min(0.99, (1 + n) / (10 + n))),
        ("power", lambda n: min(0.99, 1 - (1 + n / 1.0) ** (-2 / 3))),
    ):
        config = TrainConfig(steps=12, lr=0.05, warmup=0, bf16=False, ema_decay=0.99, ema_warmup=warmup)
        ema, snapshots = _linear_run(config, tmp_path / warmup)
        assert [ema_decay(config, s) for s in range(3)] == pytest.approx(
            [decay_of(1), decay_of(2), decay_of(3)]
        )
        for key in ("weight", "bias"):
            by_hand, no_warmup = snapshots[0][key].clone(), snapshots[0][key].clone()
            for n, weights in enumerate(snapshots[1:], start=1):
                d = decay_of(n)
                by_hand = d * by_hand + (1 - d) * weights[key]
                no_warmup = 0.99 * no_warmup + 0.01 * weights[key]
            assert torch.allclose(ema.shadow[key], by_hand, atol=1e-6)
            assert not torch.allclose(ema.shadow[key], no_warmup, atol=1e-3)


def test_prior_preservation_generates_class_images_once(tmp_path):
    model = fresh()
    prior = PriorPreservation("a zqxring", num_class_images=3, steps=2, batch=2, seed=5)
    calls: list[tuple[int, int]] = []

    def counting(model, prior, first_seed, count):
        calls.append((first_seed, count))
        return pipeline_class_images(model, prior, first_seed, count)

    first = prepare_class_images(model, prior, tmp_path / "class", make_images=counting)
    assert (first.found, first.generated) == (0, 3) and calls == [(5, 2), (7, 1)]
    manifest = [json.loads(line) for line in (tmp_path / "class" / CLASS_MANIFEST).read_text().splitlines()]
    assert [m["seed"] for m in manifest] == [5, 6, 7] and {m["prompt"] for m in manifest} == {"a zqxring"}
    assert (tmp_path / "class" / "00001-6.txt").read_text() == "a zqxring"
    # the files are what the pipeline makes of the prompt and seed
    from PIL import Image

    (again,) = pipeline_class_images(model, prior, 6, 1)
    assert again[1] == 6
    # (made in a batch of two there, alone here: oneDNN may pick other kernels for another batch size,
    # which moves a few pixels by a level on some machines, e.g. with one thread)
    saved = np.asarray(Image.open(tmp_path / "class" / "00001-6.png"), dtype=np.int16)
    assert np.abs(saved - np.asarray(again[0], dtype=np.int16)).max() <= 2

    second = prepare_class_images(model, prior, tmp_path / "class", make_images=counting)
    assert (second.found, second.generated) == (3, 0) and len(calls) == 2
    more = prepare_class_images(
        model, PriorPreservation("a zqxring", num_class_images=4, steps=2, seed=5), tmp_path / "class"
    )
    assert (more.found, more.generated) == (3, 1) and (tmp_path / "class" / "00003-8.png").is_file()
    with pytest.raises(SdStudioError, match="holds class images of 'a zqxring'"):
        prepare_class_images(model, PriorPreservation("a dog", num_class_images=9), tmp_path / "class")


def by_hand_mse(
    base: LoadedModel, generator: torch.Generator, latents: torch.Tensor, captions: list[str], embeddings=None
) -> torch.Tensor:
    """The eps loss of one batch as the trainer draws it: timesteps, then noise, from ``generator``;
    eps = UNet(c_in * (x0 + sigma n), t, c); ``embeddings``: words the captions name."""
    unet, sigmas = base.model.unet, training_denoiser(base).schedule.sigmas
    with torch.no_grad():
        context = encode_captions(
            base.model.text_encoder, ClipTokenizer(), base.config.text, captions, 1, embeddings
        )
        t = torch.randint(0, len(sigmas), (latents.shape[0],), generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        sigma = sigmas[t][:, None, None, None]
        eps = unet((latents + sigma * noise) / (sigma**2 + 1) ** 0.5, t.float(), context)
        return (eps - noise).pow(2).mean()


def test_dreambooth_loss_is_instance_plus_weighted_prior(data, tmp_path):
    """The logged loss of step 1 equals, by hand on the same batch, timesteps and noise:
    mean(instance MSE) + prior_loss_weight * mean(class MSE), eps = UNet(c_in * (x0 + sigma n), t, c)."""
    prior = PriorPreservation("a ring", num_class_images=2, prior_loss_weight=0.5, steps=2)
    config = DreamBoothConfig(instance_prompt="a sks zqxring", prior=prior)
    run = RunConfig(steps=1, batch_size=2, lr=1e-4, bf16=False, seed=3)
    train_dreambooth(fresh(), data, tmp_path / "run", config, run)
    ((record,),) = [read_log(tmp_path / "run" / "state" / LOG_FILE)]
    assert len(list((tmp_path / "run" / "class_images").glob("*.png"))) == 2

    base = fresh()
    generator = torch.Generator().manual_seed(run.seed)

    options = dataset_config_for(base, template=("a sks zqxring",), missing_caption="empty")
    instance = TrainingData.open(data, options, base, tmp_path / "run" / "latents", 2, run.seed)
    latents, captions = instance.batch(0, generator)
    assert captions == ["a sks zqxring"] * 2
    first = by_hand_mse(base, generator, latents, captions)
    classes = TrainingData.open(tmp_path / "run" / "class_images", dataset_config_for(base, missing_caption="empty"),
                                base, tmp_path / "run" / "latents", 2, run.seed + 1)  # fmt: skip
    class_latents, _ = classes.batch(0, generator)
    second = by_hand_mse(base, generator, class_latents, ["a ring"] * 2)
    assert record["loss"] == pytest.approx(float(first + 0.5 * second), rel=1e-5)
    assert record["loss"] != pytest.approx(float(first + second), rel=1e-3)  # the weight matters
    assert record["loss"] != pytest.approx(float(first), rel=1e-3)  # and so does the class term


def test_gradient_accumulation_of_two_equals_one_batch_of_two(tmp_path):
    """With SGD (lr 1, so the update is the gradient itself) through the optimizer factory: two
    micro-batches of one sample give the weights one batch of both gives; using one sample twice does not."""
    base = fresh()
    denoiser = training_denoiser(base)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.5, 3.0])
    context = torch.randn(2, 77, base.config.unet.context_dim, generator=torch.Generator().manual_seed(2))

    def sgd(groups, config):
        return torch.optim.SGD(groups, lr=config.lr)

    def run(name: str, k: int, pick) -> dict[str, torch.Tensor]:
        unet = fresh().model.unet.requires_grad_(True)
        den = type(denoiser)(unet, denoiser.schedule, denoiser.prediction)

        def loss_fn(index: int, generator: torch.Generator) -> torch.Tensor:
            rows = pick(index)
            return den.loss(x0[rows], noise[rows], sigma[rows], context[rows]).mean()

        config = TrainConfig(steps=1, lr=1.0, warmup=0, weight_decay=0.0, grad_clip=0.0, bf16=False,
                             cosine=False, grad_accumulation=k)  # fmt: skip
        train(unet, loss_fn, config, tmp_path / name, make_optimizer=sgd)
        return {n: p.detach().clone() for n, p in unet.named_parameters()}

    batch = run("batch", 1, lambda index: [0, 1])
    accumulated = run("accumulated", 2, lambda index: [index % 2])
    same_twice = run("same", 2, lambda index: [0])
    start = dict(fresh().model.unet.named_parameters())

    def relative(weights: dict[str, torch.Tensor]) -> float:  # error of the update, to its size
        error = sum(float((weights[n] - batch[n]).pow(2).sum()) for n in batch)
        update = sum(float((batch[n] - start[n]).pow(2).sum()) for n in batch)
        return math.sqrt(error / update)

    assert relative(accumulated) < 1e-5, relative(accumulated)
    assert relative(same_twice) > 1e-2, relative(same_twice)


def test_schedules_and_group_learning_rates(tmp_path):
    """Linear decay after warm-up, as transformers' ``get_linear_schedule_with_warmup`` past its warm-up,
    applied by the loop to every group from its own rate (a text encoder's lower one)."""
    from diffusers.optimization import get_linear_schedule_with_warmup

    config = TrainConfig(
        steps=10, lr=1.0, warmup=2, schedule="linear", lr_min_ratio=0.0, bf16=False, grad_clip=0
    )
    rates = [learning_rate(config, s) for s in range(10)]
    assert rates == pytest.approx([0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])
    reference = get_linear_schedule_with_warmup(
        torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), 2, 10
    )
    expected = [reference.lr_lambda(s) for s in range(10)][2:] if hasattr(reference, "lr_lambda") else None
    if expected is None:
        expected = [reference.lr_lambdas[0](s) for s in range(10)][2:]
    assert rates[2:] == pytest.approx(expected)
    floor = TrainConfig(steps=10, lr=1.0, warmup=0, schedule="linear", lr_min_ratio=0.1)
    assert learning_rate(floor, 10) == pytest.approx(0.1) and learning_rate(floor, 5) == pytest.approx(0.55)
    cosine = TrainConfig(steps=10, lr=1.0, warmup=0, schedule="cosine", lr_min_ratio=0.0)
    assert learning_rate(cosine, 5) == pytest.approx(0.5)
    assert [learning_rate(TrainConfig(steps=4, warmup=0, cosine=True), s) for s in (0, 3)] != [1e-3, 1e-3]
    with pytest.raises(SdStudioError, match="schedule 'step': choose constant, cosine, linear"):
        TrainConfig(steps=4, schedule="step")  # type: ignore[arg-type]

    a, b = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(3))
    seen: list[tuple[float, ...]] = []
    optimizers: list[torch.optim.Optimizer] = []

    def capture(groups, config):
        optimizers.append(torch.optim.SGD(groups, lr=config.lr))
        return optimizers[-1]

    def loss_fn(step: int, generator: torch.Generator) -> torch.Tensor:
        seen.append(tuple(g["lr"] for g in optimizers[0].param_groups))
        return a.sum() + b.sum()

    train(nn.ParameterList([a, b]), loss_fn, config, tmp_path, make_optimizer=capture,
          parameters=[{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.1}])  # fmt: skip
    assert [s[0] for s in seen] == pytest.approx(rates)  # a's group (matrices), with weight decay
    assert [s[3] for s in seen] == pytest.approx([r * 0.1 for r in rates])  # b's group (vectors)


def test_gradient_checkpointing_gives_the_same_outputs_and_gradients():
    def forward_backward(wrap: bool, timestep: float = 300.0) -> tuple[torch.Tensor, torch.Tensor]:
        unet = fresh().model.unet.requires_grad_(True)
        module = CheckpointedUNet(unet) if wrap else unet
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        context = torch.randn(2, 77, unet.config.context_dim, generator=torch.Generator().manual_seed(1))
        out = module(x, torch.tensor([timestep, 20.0]), context)
        out.pow(2).mean().backward()
        return out.detach(), unet.input_blocks[1][0].in_layers[2].weight.grad

    plain, checkpointed = forward_backward(False), forward_backward(True)
    assert torch.allclose(plain[0], checkpointed[0], atol=1e-6)
    assert torch.allclose(plain[1], checkpointed[1], atol=1e-6)
    other = forward_backward(True, timestep=301.0)  # the comparison sees a small change
    assert not torch.allclose(plain[1], other[1], atol=1e-6)


class Stop(Exception):
    pass


def test_killed_finetune_resumes_to_the_same_weights(data, tmp_path):
    """Text encoder, accumulation, checkpointing, EMA warm-up, linear schedule, offset noise: a run killed
    after step 3 and resumed (from its step-2 state) ends with an unbroken run's checkpoint."""
    config = FinetuneConfig(
        name="whole", train_text_encoder=True, text_lr=5e-4, gradient_accumulation=2, gradient_checkpointing=True,
        ema_decay=0.99, lr_schedule="linear", noise_offset=0.1, save_dtype="fp32",
    )  # fmt: skip
    run = RunConfig(steps=5, batch_size=1, lr=1e-3, save_every=2, bf16=False)
    (whole,) = train_finetune(fresh(), data, tmp_path / "whole", config, run)

    def kill(step: int, loss: float) -> None:
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        train_finetune(fresh(), data, tmp_path / "broken", config, run, progress=kill)
    assert not (tmp_path / "broken" / "whole.safetensors").exists()
    (resumed,) = train_finetune(fresh(), data, tmp_path / "broken", config, run)
    a, b = load_file(whole), load_file(resumed)
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < 1e-6, worst
    start = fresh().model.state_dict()
    text_key = next(k for k in start if k.startswith("cond_stage_model.") and k.endswith("weight"))
    assert not torch.equal(a[text_key], start[text_key])  # the text encoder trained
    assert torch.equal(
        a["first_stage_model.decoder.conv_out.weight"], start["first_stage_model.decoder.conv_out.weight"]
    )


def test_v_target_bf16_and_the_8bit_optimizer(data, tmp_path):
    """An eps model fine-tuned for v-prediction under bf16 autocast is saved (and loads) as a v model;
    ``adamw8bit`` runs where bitsandbytes does and otherwise fails by name before any work."""
    config = FinetuneConfig(prediction="v", ema_decay=0.0, save_dtype="bf16")
    run = RunConfig(steps=2, batch_size=2, lr=1e-4, bf16=True)
    (path,) = train_finetune(fresh(), data, tmp_path / "v", config, run)
    model = load_model(path)
    assert model.config.prediction == "v" and not any(k.startswith(EMA_PREFIX) for k in load_file(path))
    assert all(math.isfinite(r["loss"]) for r in read_log(tmp_path / "v" / "state" / LOG_FILE))

    eight = FinetuneConfig(optimizer="adamw8bit", ema_decay=0.0)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(SdStudioError, match="adamw8bit needs bitsandbytes"):
            train_finetune(fresh(), data, tmp_path / "8bit", eight, run)
        return
    train_finetune(
        fresh(), data, tmp_path / "8bit", eight, RunConfig(steps=2, batch_size=2, lr=1e-4, bf16=False)
    )
    state = torch.load(tmp_path / "8bit" / "state" / STATE_FILE, weights_only=True)["optimizer"]["state"]

    def tensors(value: object) -> list[torch.Tensor]:  # bitsandbytes nests its quantisation state in dicts
        if isinstance(value, dict):
            return [t for v in value.values() for t in tensors(v)]
        return [value] if torch.is_tensor(value) else []

    assert any(t.dtype == torch.uint8 and t.numel() >= 4096 for t in tensors(state))  # 8-bit moments


def _class_folder(folder: Path) -> Path:
    """Three captioned class images (kohya's regularisation folder)."""
    write_dataset(folder, n=3)
    (folder / "broken.png").unlink()
    for i, text in enumerate(["a red circle", "a blue square", "a green star"]):
        (folder / f"{i:02d}.txt").write_text(text)
    return folder


def test_lora_with_regularisation_images_adds_their_weighted_loss(data, tmp_path):
    """LoRA with prior preservation (kohya's --reg_data_dir): a folder of captioned class images and no class
    prompt. Step 1's logged loss is, by hand with the base model (the LoRA starts at it exactly), the
    instance MSE plus prior_loss_weight times the class MSE on the class images' own captions; the file
    counts the regularisation images. A folder short of images, or with an uncaptioned image, is refused
    by name before any training."""
    from sdstudio.training.lora import LoraRunOptions, LoraTrainConfig, train_lora

    classes_dir = _class_folder(tmp_path / "reg")
    prior = PriorPreservation("", class_data=str(classes_dir), num_class_images=3, prior_loss_weight=0.25)
    run = RunConfig(steps=1, batch_size=2, lr=1e-3, bf16=False, seed=4)
    options = LoraRunOptions(name="reg", save_dtype="fp32", prior=prior)
    (path,) = train_lora(fresh(), data, tmp_path / "run", LoraTrainConfig(rank=2), run, options)
    ((record,),) = [read_log(tmp_path / "run" / "state" / LOG_FILE)]
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_num_reg_images"], meta["ss_prior_loss_weight"]) == ("3", "0.25")

    base = fresh()
    generator = torch.Generator().manual_seed(run.seed)

    latents_dir = tmp_path / "run" / "latents"
    instance = TrainingData.open(data, dataset_config_for(base), base, latents_dir, 2, run.seed)
    latents, captions = instance.batch(0, generator)
    first = by_hand_mse(base, generator, latents, captions)
    reg = TrainingData.open(classes_dir, dataset_config_for(base, missing_caption="empty"), base, latents_dir, 2,
                            run.seed + 1)  # fmt: skip
    class_latents, class_texts = reg.batch(0, generator)
    assert set(class_texts) <= {"a red circle", "a blue square", "a green star"}
    second = by_hand_mse(base, generator, class_latents, class_texts)
    assert record["loss"] == pytest.approx(float(first + 0.25 * second), rel=1e-5)
    assert record["loss"] != pytest.approx(float(first), rel=1e-3)  # the class term counts

    short = PriorPreservation("", class_data=str(classes_dir), num_class_images=5)
    with pytest.raises(SdStudioError, match="3 class images, 5 asked for; give --class-prompt"):
        train_lora(fresh(), data, tmp_path / "short", LoraTrainConfig(rank=2), run, LoraRunOptions(prior=short))
    (classes_dir / "01.txt").unlink()
    with pytest.raises(SdStudioError, match=r"class images without a caption \(01.png\)"):
        train_lora(fresh(), data, tmp_path / "bare", LoraTrainConfig(rank=2), run, LoraRunOptions(prior=prior))
    with pytest.raises(SdStudioError, match="needs a class prompt"):
        PriorPreservation("")


@pytest.mark.parametrize("method", ["lora", "dreambooth"])
def test_prior_against_the_base_is_zero_at_the_start_and_grows_with_the_drift(method, data, tmp_path):
    """``--prior-target base``: the class images' loss compares with the base model's own prediction. Step 1
    (the network is still the base: a LoRA starts at zero, DreamBooth's UNet is the base) logs the instance
    loss alone, by hand, whatever the prior weight; that step's update does not depend on the weight either
    (the class term's gradient is zero), so at step 2 two runs differ only by their weights times the same
    class term, which is positive once the network has moved. A DreamBooth teacher that moved with the
    network (the UNet itself instead of a copy) would log 0 for it at step 2 as well; the LoRA's teacher is
    checked exactly by the next test."""
    from sdstudio.training.lora import LoraRunOptions, LoraTrainConfig, train_lora

    classes_dir = _class_folder(tmp_path / "reg")
    run = RunConfig(steps=2, batch_size=2, lr=1e-3, bf16=False, seed=4)
    losses = {}
    for weight in (0.5, 5.0):
        prior = PriorPreservation("", class_data=str(classes_dir), num_class_images=3, prior_loss_weight=weight,
                                  target="base")  # fmt: skip
        out = tmp_path / f"run{weight}"
        if method == "lora":
            options = LoraRunOptions(name="reg", save_dtype="fp32", prior=prior)
            (path,) = train_lora(fresh(), data, out, LoraTrainConfig(rank=2, unet_lr=1e-2), run, options)
            with safe_open(str(path), "pt") as f:
                assert f.metadata()["ss_sdstudio_prior_target"] == "base"
        else:
            train_dreambooth(fresh(), data, out, DreamBoothConfig(prior=prior, save_dtype="fp32"), run)
        losses[weight] = [record["loss"] for record in read_log(out / "state" / LOG_FILE)]

    base = fresh()
    generator = torch.Generator().manual_seed(run.seed)
    instance = TrainingData.open(data, dataset_config_for(base), base, tmp_path / "run0.5" / "latents", 2, run.seed)
    latents, captions = instance.batch(0, generator)
    first = float(by_hand_mse(base, generator, latents, captions))
    assert losses[0.5][0] == pytest.approx(first, rel=1e-5) and losses[5.0][0] == pytest.approx(first, rel=1e-5)
    # step 2: (instance + 5 * class) - (instance + 0.5 * class) = 4.5 * class, class > 0
    class_term = (losses[5.0][1] - losses[0.5][1]) / 4.5
    assert class_term > 1e-5, losses  # runs alike but for the weight differ by float rounding (~1e-7)
    assert losses[0.5][1] - 0.5 * class_term > 0  # what is left is the instance loss


def test_the_lora_teacher_is_the_model_without_its_branches():
    """``AttachedLoRA.base()``, the LoRA's prior teacher: exactly the base model's prediction (hooked and
    merged targets alike left out), the branches back afterwards."""
    from sdstudio.training.lora import LoraTrainConfig, TrainableLoRA, attached

    model, plain = fresh(), training_denoiser(fresh())
    lora = TrainableLoRA(model.model, LoraTrainConfig(rank=2), seed=0)
    with torch.no_grad():
        for p in lora.parameters():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, model.config.unet.in_channels, 8, 8, generator=gen)
    sigma, context = torch.tensor([0.5, 3.0]), torch.randn(2, 77, model.config.unet.context_dim, generator=gen)
    with torch.no_grad(), attached(model.model, lora) as run:
        with_lora = run.denoiser.raw(x, sigma, context)
        base = run.base().raw(x, sigma, context)
        again = run.denoiser.raw(x, sigma, context)
        expected = plain.raw(x, sigma, context)
    assert torch.equal(base, expected)
    assert (with_lora - expected).abs().mean() > 0.01 * expected.abs().mean()
    assert torch.equal(again, with_lora)


def first_loss_is_the_starting_vectors(data: Path, out: Path, run: RunConfig):
    """A pivotal run's step-1 logged loss is, by hand with the base model, the loss with the word "zqxring"'s
    starting vectors (those of "red circle") in its place, not its plain BPE tokens'. Returns the base model,
    the starting vectors and the instance data."""
    from sdstudio.prompt.embeddings import Embedding, EmbeddingDatabase
    from sdstudio.training.embedding import initial_vectors

    first = read_log(out / "state" / LOG_FILE)[0]
    base, tokenizer = fresh(), ClipTokenizer()
    start = initial_vectors(base.model.text_encoder.token_embedding, tokenizer, "red circle", 2)
    assert start.abs().sum() > 0 and not torch.equal(start[0], start[1])
    database = EmbeddingDatabase.build([Embedding("zqxring", start)], tokenizer)
    generator = torch.Generator().manual_seed(run.seed)
    instance = TrainingData.open(data, dataset_config_for(base), base, out / "latents", 2, run.seed)
    latents, captions = instance.batch(0, generator)
    assert all("zqxring" in c for c in captions)
    state = generator.get_state()
    assert first["loss"] == pytest.approx(float(by_hand_mse(base, generator, latents, captions, database)), rel=1e-5)
    generator.set_state(state)
    plain = by_hand_mse(base, generator, latents, captions)  # the word's own BPE tokens: another loss
    assert first["loss"] != pytest.approx(float(plain), rel=1e-3)
    return base, start, instance


def test_lora_pivotal_tuning_learns_the_word_with_the_lora(data, tmp_path):
    """Pivotal tuning: the captions' word "zqxring" is a trained vector pair, started from the token vectors
    of "red circle". Step 1's logged loss is, by hand with the base model, the loss with those starting
    vectors in the word's place (not its plain tokens); the vectors then move, are written as an embedding
    file, and a second LoRA run that loads that file with ``embeddings`` (frozen) starts from the loss of
    the trained vectors. A word no caption uses, or a missing embeddings folder, is refused."""
    from sdstudio.prompt.embeddings import EmbeddingDatabase, load_embedding
    from sdstudio.training.embedding import EmbeddingTrainConfig
    from sdstudio.training.lora import LoraRunOptions, LoraTrainConfig, train_lora

    run = RunConfig(steps=3, batch_size=2, lr=1e-3, bf16=False, seed=4)
    word = EmbeddingTrainConfig("zqxring", vectors=2, init_text="red circle")
    options = LoraRunOptions(name="piv", save_dtype="fp32", pivotal=word, pivotal_lr=5e-2)
    lora_path, emb_path = train_lora(fresh(), data, tmp_path / "run", LoraTrainConfig(rank=2), run, options)
    assert emb_path == tmp_path / "run" / "embeddings" / "zqxring.safetensors" and lora_path.exists()
    base, start, instance = first_loss_is_the_starting_vectors(data, tmp_path / "run", run)
    tokenizer = ClipTokenizer()

    trained = load_embedding(emb_path, base.config.text.width)
    assert trained.name == "zqxring" and trained.vectors.shape == start.shape
    assert (trained.vectors - start).abs().max() > 1e-3  # the word was learnt, not only the LoRA

    frozen = LoraRunOptions(name="again", save_dtype="fp32", embeddings=str(emb_path.parent))
    (path,) = train_lora(fresh(), data, tmp_path / "again", LoraTrainConfig(rank=2), run, frozen)
    assert path.name == "again.safetensors"  # no word trained: the LoRA alone
    again = read_log(tmp_path / "again" / "state" / LOG_FILE)[0]
    generator = torch.Generator().manual_seed(run.seed)
    latents, captions = instance.batch(0, generator)
    by_file = EmbeddingDatabase.build([trained], tokenizer)
    assert again["loss"] == pytest.approx(float(by_hand_mse(base, generator, latents, captions, by_file)), rel=1e-5)
    assert torch.equal(load_embedding(emb_path, base.config.text.width).vectors, trained.vectors)  # untouched

    unused = LoraRunOptions(pivotal=EmbeddingTrainConfig("sksdog"))
    with pytest.raises(SdStudioError, match="holds the embedding's name 'sksdog'"):
        train_lora(fresh(), data, tmp_path / "unused", LoraTrainConfig(rank=2), run, unused)
    assert not (tmp_path / "unused").exists()
    missing = LoraRunOptions(embeddings=str(tmp_path / "nowhere"))
    with pytest.raises(SdStudioError, match="nowhere: no such folder of embeddings"):
        train_lora(fresh(), data, tmp_path / "missing", LoraTrainConfig(rank=2), run, missing)
    assert not (tmp_path / "missing").exists()  # refused before the run folder is made


def test_finetune_pivotal_tuning_learns_the_word_with_the_unet(data, tmp_path):
    """Pivotal tuning in a full fine-tune (and DreamBooth, the same loop): step 1's logged loss is, by hand
    with the base model, the loss with the word's starting vectors (those of "red circle") in its place; the
    vectors move and are written as an embedding file beside the checkpoint, whose UNet moved too and whose
    text encoder did not. A word no caption uses is refused before the run folder is made."""
    from sdstudio.prompt.embeddings import load_embedding
    from sdstudio.training.embedding import EmbeddingTrainConfig

    run = RunConfig(steps=3, batch_size=2, lr=1e-3, bf16=False, seed=4)
    word = EmbeddingTrainConfig("zqxring", vectors=2, init_text="red circle")
    config = FinetuneConfig(name="ftpiv", save_dtype="fp32", pivotal=word, pivotal_lr=5e-2)
    ckpt, emb_path = train_finetune(fresh(), data, tmp_path / "run", config, run)
    assert emb_path == tmp_path / "run" / "embeddings" / "zqxring.safetensors" and ckpt.exists()
    base, start, _ = first_loss_is_the_starting_vectors(data, tmp_path / "run", run)

    trained = load_embedding(emb_path, base.config.text.width)
    assert trained.name == "zqxring" and (trained.vectors - start).abs().max() > 1e-3
    saved = load_file(ckpt)
    unet = base.model.unet.state_dict()
    assert any(not torch.equal(saved[UNET_PREFIX + k], v) for k, v in unet.items())  # the UNet trained
    text = base.model.text_encoder.state_dict()
    assert all(torch.equal(saved[TEXT_PREFIX + k], v) for k, v in text.items())  # the encoder itself did not

    unused = FinetuneConfig(pivotal=EmbeddingTrainConfig("sksdog"))
    with pytest.raises(SdStudioError, match="holds the embedding's name 'sksdog'"):
        train_finetune(fresh(), data, tmp_path / "unused", unused, run)
    assert not (tmp_path / "unused").exists()
    with pytest.raises(SdStudioError, match="pivotal learning rate 0"):
        FinetuneConfig(pivotal=word, pivotal_lr=0)


def test_modules_train_only_the_unet_weights_they_name(data, tmp_path):
    """``modules`` (``--modules``): only the UNet weights whose checkpoint key a pattern finds move (here the
    transformer blocks' attention and feed-forward); every other weight, the convolutions among them, is
    written bit for bit as it was. A pattern that finds nothing is refused before the run folder is made."""
    run = RunConfig(steps=3, batch_size=2, lr=1e-3, bf16=False, seed=4)
    config = FinetuneConfig(name="blocks", save_dtype="fp32", ema_decay=0.0, modules=("transformer_blocks",))
    (ckpt,) = train_finetune(fresh(), data, tmp_path / "run", config, run)
    saved = load_file(ckpt)
    base = fresh().model.unet.state_dict()
    moved = {k for k, v in base.items() if not torch.equal(saved[UNET_PREFIX + k], v)}
    assert moved and all(".transformer_blocks." in k for k in moved), sorted(moved)[:5]
    assert any(k.endswith("attn2.to_k.weight") for k in moved) and any(".ff." in k for k in moved)
    assert not any(k.endswith("in_layers.2.weight") for k in moved)  # a ResNet convolution

    with pytest.raises(SdStudioError, match="no UNet weight of .* matches"):
        train_finetune(fresh(), data, tmp_path / "none", FinetuneConfig(modules=("no_such_block",)), run)
    assert not (tmp_path / "none").exists()
