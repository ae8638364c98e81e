"""torch-fidelity's modules, loaded for the tests without its package ``__init__``."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest


def torch_fidelity_module(name: str) -> types.ModuleType:
    """A torch-fidelity module loaded without its package ``__init__`` (which imports torchvision, which
    cannot be installed beside this torch); installed with ``pip install --no-deps torch-fidelity``."""
    if not getattr(sys.modules.get("torch_fidelity"), "_sdstudio_stub", False):
        spec = importlib.util.find_spec("torch_fidelity")
        if spec is None or spec.origin is None:
            pytest.skip("torch-fidelity is not installed (pip install --no-deps torch-fidelity==0.4.0)")
        package = types.ModuleType("torch_fidelity")
        package.__path__ = [str(Path(spec.origin).parent)]
        package._sdstudio_stub = True  # type: ignore[attr-defined]
        sys.modules["torch_fidelity"] = package
        # torch_fidelity.utils imports torchvision; the metric functions we call never use what the metric
        # modules import from it (feature extraction from datasets), so a stub with those names serves.
        utils = types.ModuleType("torch_fidelity.utils")
        for attr in ("create_feature_extractor", "extract_featuresdict_from_input_id_cached",
                     "resolve_feature_extractor", "resolve_feature_layer_for_metric", "get_cacheable_input_name",
                     "cache_lookup_one_recompute_on_miss"):  # fmt: skip
            setattr(utils, attr, None)
        sys.modules["torch_fidelity.utils"] = utils
    return importlib.import_module(f"torch_fidelity.{name}")
