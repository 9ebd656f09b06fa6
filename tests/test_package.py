"""The package itself: layering, importability without ComfyUI or a GPU, packaging metadata."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMFY_MODULES = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "server", "execution", "nodes"}


def _imports(path: Path) -> list[tuple[int, str, int]]:
    """(line, module, relative level) for every import in a file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, 0) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.lineno, node.module or "", node.level))
    return out


def test_engine_and_kernels_never_import_comfyui_or_nodes():
    bad = []
    for folder in ("trellis2_core", "kernels"):
        for f in (ROOT / folder).rglob("*.py"):
            for line, mod, level in _imports(f):
                top = mod.split(".")[0]
                if level == 0 and top in COMFY_MODULES:
                    bad.append(f"{f.relative_to(ROOT)}:{line} imports {mod}")
                # a relative import that climbs out of the engine may only reach kernels
                if level >= 2 and folder == "trellis2_core":
                    depth = len(f.relative_to(ROOT / folder).parts) - 1  # folders below trellis2_core
                    if level > depth + 1 and top not in ("kernels",):
                        bad.append(f"{f.relative_to(ROOT)}:{line} imports {'.' * level}{mod} (outside the engine)")
    assert not bad, "layering broken:\n" + "\n".join(bad)


def test_kernels_import_only_torch_and_triton():
    allowed = {"torch", "triton"} | set(sys.stdlib_module_names)
    bad = []
    for f in (ROOT / "kernels").rglob("*.py"):
        for line, mod, level in _imports(f):
            if level == 0 and mod.split(".")[0] not in allowed:
                bad.append(f"{f.relative_to(ROOT)}:{line} imports {mod}")
    assert not bad, "\n".join(bad)


def test_pack_imports_without_comfyui_or_gpu(tmp_path):
    # Import the pack the way ComfyUI does: the folder as a package under an arbitrary name.
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('Some-Pack-Folder', r'{ROOT / '__init__.py'}')\n"
        "m = importlib.util.module_from_spec(spec); sys.modules[spec.name] = m; spec.loader.exec_module(m)\n"
        "assert callable(m.comfy_entrypoint) and m.WEB_DIRECTORY\n"
        # 0.3.75 never calls comfy_entrypoint when NODE_CLASS_MAPPINGS exists, even empty
        "assert not hasattr(m, 'NODE_CLASS_MAPPINGS')\n"
        "assert not any(k.split('.')[0] in ('comfy', 'triton', 'nvdiffrast') for k in sys.modules), sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env={"CUDA_VISIBLE_DEVICES": "", "PATH": ""})


def test_every_python_package_is_listed_in_pyproject():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(meta["tool"]["setuptools"]["packages"])
    found = {"trellis2"}
    for init in ROOT.rglob("__init__.py"):
        rel = init.parent.relative_to(ROOT)
        if rel.parts and rel.parts[0] in ("tests", "bench", "build", ".git") or any(p.startswith(".") for p in rel.parts):
            continue
        found.add(".".join(("trellis2",) + rel.parts))
    assert found == listed, f"not listed: {sorted(found - listed)}; listed but missing: {sorted(listed - found)}"


def test_no_binaries_committed():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    bad = [f for f in files if f.endswith((".whl", ".pyd", ".so", ".dll", ".pyc", ".o", ".exe", ".pt", ".ckpt", ".bin"))]
    assert not bad, bad
