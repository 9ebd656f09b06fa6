"""Tests that run inside ComfyUI's own interpreter (its model management, ``comfy`` importable): the outer test
re-runs its file there with ``run_inner_suite``; the inner half builds its fixtures with the helpers below.
Finding (and installing) ComfyUI is ``comfy_harness``'s."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from comfy_harness import ROOT, comfyui_python, find_comfyui


def tiny_models_folder(root: Path) -> Path:
    """For inner suites (ComfyUI's interpreter): ``root`` becomes ComfyUI's ``trellis2`` model folder, holding the
    tiny random snapshot (official file layout) as ``tiny``. Returns root."""
    import folder_paths

    from trellis2.trellis2_core.testing.tiny_snapshot import write_tiny_snapshot

    write_tiny_snapshot(root / "tiny", seed=0)
    folder_paths.folder_names_and_paths["trellis2"] = ([str(root)], set())
    return root


def rgba_image():
    """For inner suites: a LoadImage-style IMAGE [1, 64, 64, 3] and MASK [1, 64, 64] (1 = transparent) of an
    orange 32 x 32 square in the middle."""
    import torch

    image = torch.zeros(1, 64, 64, 3)
    image[:, 16:48, 16:48] = torch.tensor([0.8, 0.4, 0.2])
    mask = torch.ones(1, 64, 64)
    mask[:, 16:48, 16:48] = 0
    return image, mask


def run_inner_suite(test_file: str, *, timeout: int, allow_skips: bool = False, gpu: bool = False) -> None:
    """Re-run ``test_file`` under ComfyUI's interpreter with TRELLIS2_NODES_INNER=1 (its inner half imports comfy
    directly, on the CPU unless ``gpu``) and fail with its output unless every inner test passed (and, unless
    ``allow_skips``, none was skipped)."""
    folder = find_comfyui()
    env = {**os.environ, "TRELLIS2_NODES_INNER": "1", "TRELLIS2_COMFYUI_DIR": str(folder), "HF_HUB_OFFLINE": "1"}
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [comfyui_python(folder), "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(test_file))]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"inner tests failed:\n{done.stdout[-8000:]}\n{done.stderr[-3000:]}"
    assert " passed" in done.stdout, done.stdout[-2000:]
    if not allow_skips:
        assert "skipped" not in done.stdout.split("\n")[-2], done.stdout[-2000:]
