"""The command line, run in-process: offline on the tiny snapshot, and its error paths."""

from __future__ import annotations

import time

import numpy as np
import pytest
import trimesh
from PIL import Image

from trellis2.trellis2_core.cli import main
from trellis2.trellis2_core.testing.tiny_snapshot import write_tiny_snapshot


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    return write_tiny_snapshot(tmp_path_factory.mktemp("cli") / "tiny")


@pytest.fixture
def image_path(tmp_path):
    rgba = np.zeros((80, 80, 4), np.uint8)
    rgba[10:70, 15:65] = (180, 120, 40, 255)
    path = tmp_path / "object.png"
    Image.fromarray(rgba, "RGBA").save(path)
    return path


def test_generate_offline_on_the_tiny_snapshot_writes_a_textured_glb(snapshot, image_path, tmp_path, capsys):
    out = tmp_path / "object.glb"
    args = ["generate", str(image_path), "-o", str(out), "--weights", str(snapshot), "--offline", "--device", "cpu",
            "--pipeline", "512", "--steps", "2", "--texture-size", "256", "--faces", "20000", "-q"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    scene = trimesh.load(out, force="scene")
    geom = next(iter(scene.geometry.values()))
    assert len(geom.faces) > 0
    mat = geom.visual.material
    assert mat.baseColorTexture.size == (256, 256)
    assert mat.metallicRoughnessTexture.size == (256, 256)
    uv = np.asarray(geom.visual.uv)
    assert uv.min() >= 0 and uv.max() <= 1
    # the same command again must not overwrite the result
    before = out.read_bytes()
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == before
    # same seed, same bytes (determinism end to end); --no-cuda-graphs changes nothing off CUDA
    again = tmp_path / "again.glb"
    args[3] = str(again)
    assert main(args + ["--no-cuda-graphs"]) == 0
    assert again.read_bytes() == before


def test_missing_weights_offline_fail_fast_and_say_what_to_download(image_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    start = time.perf_counter()
    code = main(["generate", str(image_path), "-o", str(tmp_path / "x.glb"), "--offline", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and time.perf_counter() - start < 20
    assert "pipeline.json" in err and "microsoft/TRELLIS.2-4B" in err
    assert not (tmp_path / "x.glb").exists()


def test_bad_arguments_are_reported(snapshot, image_path, tmp_path, capsys):
    assert main(["generate", str(image_path), "-o", str(tmp_path / "x.obj"), "--weights", str(snapshot)]) == 2
    assert "must end in .glb" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "nope.png"), "-o", str(tmp_path / "x.glb"), "--weights", str(snapshot)]) == 2
    assert "cannot read the image" in capsys.readouterr().err
    for flag, value in (("--texture-size", "9000"), ("--faces", "2"), ("--steps", "0"), ("--seed", "-1")):
        assert main(["generate", str(image_path), "-o", str(tmp_path / "x.glb"), flag, value]) == 2
        assert flag in capsys.readouterr().err  # refused before any weights are resolved
    opaque = tmp_path / "opaque.png"
    Image.new("RGB", (32, 32), (10, 200, 30)).save(opaque)
    code = main(["generate", str(opaque), "-o", str(tmp_path / "x.glb"), "--weights", str(snapshot), "--offline",
                 "--device", "cpu", "-q"])  # fmt: skip
    assert code == 2 and "mask" in capsys.readouterr().err.lower()


def test_tiny_snapshot_command(tmp_path, capsys):
    assert main(["tiny-snapshot", str(tmp_path / "snap")]) == 0
    assert (tmp_path / "snap" / "pipeline.json").is_file()
    assert main(["tiny-snapshot", str(tmp_path / "snap")]) == 2  # refuses to write into a non-empty folder


def test_fp8_flag_reaches_the_pipeline(snapshot, image_path, tmp_path, monkeypatch):
    from trellis2.trellis2_core.pipeline import Trellis2Pipeline

    seen = []

    class Stop(Exception):
        pass

    def from_pretrained(*args, **kwargs):
        seen.append(kwargs)
        raise Stop

    monkeypatch.setattr(Trellis2Pipeline, "from_pretrained", staticmethod(from_pretrained))
    base = ["generate", str(image_path), "-o", str(tmp_path / "x.glb"), "--weights", str(snapshot), "--offline", "-q"]
    for extra, want in (([], False), (["--fp8"], True)):
        with pytest.raises(Stop):
            main(base + extra)
        assert seen[-1]["fp8"] is want
