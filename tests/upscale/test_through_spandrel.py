"""Architectures sdstudio does not implement go to spandrel where it imports (sdstudio.upscale.through_spandrel).

spandrel's package imports torchvision (for LaMa and RestoreFormer, neither an upscaler), and this project's
package index has no CPU torchvision for our torch: here `import spandrel` fails, and a file of such an
architecture is refused, saying why. To run spandrel's real loader, the second test starts a Python process
whose path holds a stand-in torchvision with the three names those two modules import (never called by an
upscaler): in that process spandrel imports whole, and a SAFMN file (an architecture sdstudio lacks) must
upscale through sdstudio exactly as through spandrel's own descriptor.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from sdstudio.errors import CheckpointError
from sdstudio.upscale import load_upscaler
from sdstudio.upscale.through_spandrel import spandrel_unavailable

# SAFMN (Zheng et al. 2023) with its key layout as spandrel detects it: dim 8, one block, x2
SAFMN_SHAPES = {
    "to_feat.weight": (8, 3, 3, 3), "to_feat.bias": (8,),
    "feats.0.norm1.weight": (8,), "feats.0.norm1.bias": (8,),
    "feats.0.safm.mfr.0.weight": (2, 1, 3, 3), "feats.0.safm.mfr.0.bias": (2,),
    "feats.0.safm.mfr.1.weight": (2, 1, 3, 3), "feats.0.safm.mfr.1.bias": (2,),
    "feats.0.safm.mfr.2.weight": (2, 1, 3, 3), "feats.0.safm.mfr.2.bias": (2,),
    "feats.0.safm.mfr.3.weight": (2, 1, 3, 3), "feats.0.safm.mfr.3.bias": (2,),
    "feats.0.safm.aggr.weight": (8, 8, 1, 1), "feats.0.safm.aggr.bias": (8,),
    "feats.0.norm2.weight": (8,), "feats.0.norm2.bias": (8,),
    "feats.0.ccm.ccm.0.weight": (16, 8, 3, 3), "feats.0.ccm.ccm.0.bias": (16,),
    "feats.0.ccm.ccm.2.weight": (8, 16, 1, 1), "feats.0.ccm.ccm.2.bias": (8,),
    "to_img.0.weight": (12, 8, 3, 3), "to_img.0.bias": (12,),
}  # fmt: skip


def safmn_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) * (0.3 if len(shape) > 1 else 0.1) + (1.0 if "norm" in k and
            k.endswith("weight") else 0.0) for k, shape in SAFMN_SHAPES.items()}  # fmt: skip


def test_without_spandrel_the_refusal_says_why(tmp_path):
    if importlib.util.find_spec("spandrel") is None:
        pytest.fail("spandrel is not installed; it is a test dependency: pip install --no-deps spandrel==0.4.2")
    why = spandrel_unavailable()
    if not why:
        pytest.skip("spandrel imports in this environment: the refusal does not apply")
    path = tmp_path / "4x-safmn.safetensors"
    save_file(safmn_state(), path)
    with pytest.raises(CheckpointError) as e:
        load_upscaler(path)
    text = str(e.value)
    assert "its keys are those of SAFMN" in text and "pip install spandrel torchvision" in text, text
    assert "torchvision" in why and "\n" not in text


STAND_IN = {  # the names spandrel's LaMa and RestoreFormer modules import from torchvision at import time
    "torchvision/__init__.py": "",
    "torchvision/transforms/__init__.py": "",
    "torchvision/transforms/functional.py": """
        import enum
        class InterpolationMode(enum.Enum):
            NEAREST = "nearest"
            BILINEAR = "bilinear"
        def rotate(*args, **kwargs):
            raise NotImplementedError("a test's stand-in torchvision")
        def normalize(*args, **kwargs):
            raise NotImplementedError("a test's stand-in torchvision")
    """,
}

CHILD = """
import json, sys
import numpy as np, torch
from PIL import Image
import spandrel
from sdstudio.upscale import load_upscaler
from sdstudio.upscale.tiling import Tiling

path, out = sys.argv[1], sys.argv[2]
up = load_upscaler(path)
x = torch.rand(1, 3, 21, 30, generator=torch.Generator().manual_seed(1))
ours = up.upscale_tensor(x)
ref = spandrel.ModelLoader().load_from_file(path)
ref.model.eval()
with torch.no_grad():
    theirs = ref(x)
image = up.upscale_by(Image.new("RGB", (30, 21), (200, 40, 90)), 2)
# in tiles of 48 (starts on spandrel's grid of 8): the first tile's inner part equals the whole image's
tiled = load_upscaler(path, tiling=Tiling(48, 16))
big = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(2))
with torch.no_grad():
    whole = ref(big)
parts = tiled.upscale_tensor(big)
json.dump({"describe": up.config.describe(), "scale": up.scale, "align": up.config.align,
           "whole": up.config.whole_image, "tile": up.tiling.size,
           "shape": list(ours.shape), "err": float((ours - theirs).abs().max()), "range": float(theirs.std()),
           "size": list(image.size), "inner": float((parts - whole)[..., :32, :32].abs().max()),
           "seams": float((parts - whole).abs().max())}, open(out, "w"))
"""


def test_a_file_spandrel_knows_runs_through_it(tmp_path):
    for name, text in STAND_IN.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(text), encoding="utf-8")
    path, out = tmp_path / "2x-safmn.safetensors", tmp_path / "out.json"
    save_file(safmn_state(), path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", CHILD, str(path), str(out)], env=env, capture_output=True,
                          text=True, timeout=240, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["describe"] == "SAFMN x2 (run by spandrel)" and got["scale"] == 2 and got["align"] == 8
    assert got["shape"] == [1, 3, 42, 60] and not got["whole"] and got["tile"] == 192  # tiled as ESRGAN
    assert got["size"] == [56, 40]  # A1111 rounds the target down to multiples of 8
    # through sdstudio's tiles (one here: 30x21 fits a tile) and spandrel's padding to a multiple of 8
    assert got["range"] > 0.05 and got["err"] < 1e-5, got
    assert got["inner"] < 1e-5 < got["seams"], got  # tiles differ only near their cut edges
