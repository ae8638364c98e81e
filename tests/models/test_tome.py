"""Token merging (ToMe): the merge plan, merge/unmerge, and the UNet and request options that use them."""

from __future__ import annotations

import pytest
import torch

from sdstudio.models.configs import preset
from sdstudio.models.tome import MAX_RATIO, TokenMerging, merge, plan_merge, unmerge
from tests.models.test_attention import unet_and_inputs


def test_destinations_are_the_top_left_of_each_whole_cell():
    plan = plan_merge(torch.randn(1, 7 * 6, 8), 7, 6, TokenMerging(0.5, 42))
    assert plan is not None
    rows, cols = plan.dst_pos // 6, plan.dst_pos % 6
    assert sorted(zip(rows.tolist(), cols.tolist())) == [(i, j) for i in (0, 2, 4) for j in (0, 2, 4)]
    # row 6 (odd) holds sources only
    assert sorted(plan.src_pos.tolist() + plan.dst_pos.tolist()) == list(range(42))


def test_merge_averages_each_merged_source_into_its_most_similar_destination():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8 * 8, 16, generator=gen)
    plan = plan_merge(x, 8, 8, TokenMerging(0.5, 64))
    assert plan is not None and plan.merged.shape == (2, 32)
    out = merge(x, plan)
    assert out.shape == (2, 64 - 32, 16)
    unit = x / x.norm(dim=-1, keepdim=True)
    for b in range(2):
        sim = unit[b, plan.src_pos] @ unit[b, plan.dst_pos].T
        best = sim.max(dim=1).values
        # the merged sources are the most similar ones, each joining its best destination
        assert best[plan.merged[b]].min() >= best[plan.kept[b]].max()
        assert torch.equal(plan.into[b], sim.argmax(dim=1)[plan.merged[b]])
        for d in range(len(plan.dst_pos)):
            joined = plan.src_pos[plan.merged[b][plan.into[b] == d]]
            members = torch.cat([plan.dst_pos[d : d + 1], joined])
            torch.testing.assert_close(out[b, plan.kept.shape[1] + d], x[b, members].mean(0))


def test_unmerge_inverts_merge_when_merged_tokens_are_equal_to_their_destination():
    gen = torch.Generator().manual_seed(1)
    cells = torch.randn(1, 4, 4, 8, generator=gen)  # one vector per 2x2 cell, repeated over the cell
    x = cells.repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(1, 64, 8)
    plan = plan_merge(x, 8, 8, TokenMerging(0.75, 64))
    assert plan is not None and plan.kept.shape[1] == 0  # every source merged into its cell's destination
    torch.testing.assert_close(unmerge(merge(x, plan), plan), x)


def test_unmerge_restores_kept_tokens_and_gives_merged_ones_their_destination():
    x = torch.randn(2, 8 * 8, 16, generator=torch.Generator().manual_seed(2))
    plan = plan_merge(x, 8, 8, TokenMerging(0.5, 64))
    assert plan is not None
    merged = merge(x, plan)
    out = unmerge(merged, plan)
    kept = plan.kept.shape[1]
    for b in range(2):
        kept_pos = plan.src_pos[plan.kept[b]]
        torch.testing.assert_close(out[b, kept_pos], x[b, kept_pos])
        torch.testing.assert_close(out[b, plan.dst_pos], merged[b, kept:])
        torch.testing.assert_close(out[b, plan.src_pos[plan.merged[b]]], merged[b, kept + plan.into[b]])


def test_nothing_to_merge_gives_no_plan():
    assert plan_merge(torch.randn(1, 64, 8), 8, 8, TokenMerging(0.001, 64)) is None
    assert plan_merge(torch.randn(1, 1, 8), 1, 1, TokenMerging(0.5, 1)) is None


@pytest.mark.parametrize("arch", ["tiny", "tiny-sd2"])
def test_unet_with_token_merging_is_close_but_not_exact_and_deterministic(arch):
    unet, (x, t, context) = unet_and_inputs(preset(arch).unet, 16, seed=3)
    with torch.no_grad():
        exact = unet(x, t, context)
        assert torch.equal(unet(x, t, context, token_merging=0.0), exact)
        merged = unet(x, t, context, token_merging=0.5)
        assert torch.equal(unet(x, t, context, token_merging=0.5), merged)
    rel = (merged - exact).norm() / exact.norm()
    assert 0 < rel < 0.5, rel
    with torch.no_grad():  # in bf16 and channels-last, as the CPU policy runs it
        unet.to(torch.bfloat16, memory_format=torch.channels_last)
        fast = unet(x.bfloat16(), t, context.bfloat16(), token_merging=0.5).float()
    assert (fast - merged).norm() / merged.norm() < 0.05


def test_request_ratio_is_checked_and_recorded(tmp_path):
    from sdstudio.errors import SdStudioError
    from sdstudio.models.loading import load_model, save_model
    from sdstudio.models.stablediffusion import random_model
    from sdstudio.models.tokenizer import ClipTokenizer
    from sdstudio.pipelines.generate import generate
    from sdstudio.types import GenerationRequest

    path = save_model(random_model(preset("tiny"), seed=0), tmp_path / "tiny.safetensors")
    model = load_model(path)
    tokenizer = ClipTokenizer()
    request = GenerationRequest(prompt="a cat", steps=2, seed=1, width=128, height=128, token_merging_ratio=0.5)
    result = generate(model, tokenizer, request)
    assert "Token merging ratio: 0.5" in result.images[0].infotext
    with pytest.raises(SdStudioError, match=f"token merging ratio must be between 0 and {MAX_RATIO}"):
        generate(model, tokenizer, GenerationRequest(prompt="a cat", steps=2, token_merging_ratio=0.9))
