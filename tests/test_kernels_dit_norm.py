"""DiT norm epilogues: reference == the blocks' original op sequence (CPU), dispatcher rules (CPU), and the
Triton kernels against the reference over awkward sizes and every dtype (CUDA)."""

from __future__ import annotations

import pytest
import torch

from conftest import check_backend_order
from trellis2.kernels import dit_norm
from trellis2.kernels.dit_norm import BackendUnavailableError, reference
from trellis2.trellis2_core.nn import transformer
from trellis2.trellis2_core.nn.modulation import modulate
from trellis2.trellis2_core.nn.norm import MultiHeadRMSNorm, layer_norm_32
from trellis2.trellis2_core.nn.rope import apply_rope, rope_phases

# Relative-norm tolerance, Triton vs reference: fp32 differs only in reduction order; half types round at the
# same points, so only an fp32 LN/RMS statistic landing on the other side of a rounding boundary moves a value.
TOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}
MISMATCH = {torch.float32: 1.0, torch.float16: 0.02, torch.bfloat16: 0.02}  # max fraction of non-identical values


def _mod(b, c, dtype, device="cpu", g=None):
    return torch.randn(b, 6 * c, generator=g).to(device, dtype).unsqueeze(1).chunk(6, dim=-1)


# ------------------------------------------------------------------------------------------------ reference (CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_the_blocks_op_sequence_bit_exact(dtype):
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(2, 9, 48, generator=g).to(dtype) for _ in range(2))
    shift, scale, gate = _mod(2, 48, dtype, g=g)[:3]
    ln = torch.nn.LayerNorm(48, eps=1e-6)
    with torch.no_grad():
        ln.weight.normal_(generator=g), ln.bias.normal_(generator=g)
        _, h = reference.residual_norm(x, shift=shift, scale=scale)
        assert torch.equal(h, modulate(layer_norm_32(x), shift, scale))
        xn, h = reference.residual_norm(x, y, gate, weight=ln.weight, bias=ln.bias, eps=ln.eps)
        assert torch.equal(xn, x + y * gate) and torch.equal(h, layer_norm_32(x + y * gate, ln))
        xn, h = reference.residual_norm(x, y, norm=False)
        assert torch.equal(xn, x + y) and h is None
        q = torch.randn(2, 9, 3, 4, 12, generator=g).to(dtype).unbind(-3)[0]  # strided view out of a fused qkv
        rms = MultiHeadRMSNorm(12, 4)
        rms.gamma.normal_(generator=g)
        ph = rope_phases(torch.randint(0, 30, (2, 9, 3), generator=g), 12)
        assert torch.equal(reference.rms_norm_rope(q, rms.gamma, ph), apply_rope(rms(q), ph))
        assert torch.equal(reference.rms_norm_rope(q, rms.gamma), rms(q))


def test_block_with_injected_casting_layernorm_matches_plain_block():
    """ComfyUI-style ops whose LayerNorm overrides forward: the block lets the module apply its own weights."""

    class CastLN(torch.nn.LayerNorm):
        def forward(self, x):
            return super().forward(x)

    ops = type("Ops", (), {"Linear": torch.nn.Linear, "Conv3d": torch.nn.Conv3d, "LayerNorm": CastLN})
    torch.manual_seed(0)
    plain = transformer.ModulatedTransformerCrossBlock(48, 16, 2, 2.0)
    cast = transformer.ModulatedTransformerCrossBlock(48, 16, 2, 2.0, ops=ops)
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_()
        cast.load_state_dict(plain.state_dict())
        ph = rope_phases(torch.randint(0, 9, (7, 3)), 24)
        x, mod, ctx = torch.randn(1, 7, 48), torch.randn(1, 6 * 48), torch.randn(1, 3, 16)
        assert torch.equal(cast(x, mod, ctx, ph), plain(x, mod, ctx, ph))


# ------------------------------------------------------------------------------------------------ dispatcher (CPU)
@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv(dit_norm.ENV_VAR, raising=False)
    monkeypatch.delenv(transformer.COMPILE_ENV_VAR, raising=False)
    return monkeypatch


def test_backend_order_argument_context_env(clean_env):
    assert dit_norm.ENV_VAR == "TRELLIS2_DIT_NORM_BACKEND"
    check_backend_order(dit_norm, clean_env)


def test_auto_on_cpu_runs_reference_and_explicit_triton_raises(clean_env):
    x = torch.randn(3, 5, 16, dtype=torch.bfloat16)
    shift, scale = _mod(3, 16, torch.bfloat16)[:2]
    assert torch.equal(dit_norm.residual_norm(x, shift=shift, scale=scale)[1],
                       reference.residual_norm(x, shift=shift, scale=scale)[1])  # fmt: skip
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        dit_norm.residual_norm(x, backend="triton")
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        dit_norm.rms_norm_rope(x.view(3, 5, 2, 8), torch.ones(2, 8), backend="triton")


def test_linear_gelu_on_cpu_is_the_mlp_modules_and_explicit_triton_raises(clean_env):
    g = torch.Generator().manual_seed(3)
    ff = transformer.FeedForward(16, 2.5, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in ff.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(2, 5, 16, generator=g).bfloat16()
    fc1 = ff.mlp[0]
    assert torch.equal(dit_norm.linear_gelu(x, fc1.weight, fc1.bias), reference.linear_gelu(x, fc1.weight, fc1.bias))
    assert torch.equal(ff(x), ff.mlp(x))  # the block's MLP: same modules, same rounding on CPU
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        dit_norm.linear_gelu(x, fc1.weight, fc1.bias, backend="triton")
    erf = transformer.FeedForward(16, 2.5)
    erf.mlp[1] = torch.nn.GELU()  # not the tanh GELU the fused path computes: the modules run as they are
    with torch.no_grad():
        for p in erf.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    assert torch.equal(erf(x.float()), erf.mlp(x.float()))


def test_compile_switch_is_read_at_call_time(clean_env):
    assert transformer._compile_mode() is None
    clean_env.setenv(transformer.COMPILE_ENV_VAR, "1")
    assert transformer._compile_mode() == "default"
    with transformer.compile_blocks(None):
        assert transformer._compile_mode() is None
    with transformer.compile_blocks("max-autotune-no-cudagraphs"):
        assert transformer._compile_mode() == "max-autotune-no-cudagraphs"
    clean_env.setenv(transformer.COMPILE_ENV_VAR, "0")
    assert transformer._compile_mode() is None


# ------------------------------------------------------------------------------------------------ parity (CUDA)
def _check(out, ref, dtype, what):
    assert out.shape == ref.shape and out.dtype == ref.dtype, what
    assert torch.isfinite(out).all(), f"{what}: non-finite output (unwritten?)"
    err = ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()
    frac = (out != ref).float().mean().item()
    assert err <= TOL[dtype] and frac <= MISMATCH[dtype], f"{what}: rel err {err:.2e}, {frac:.2%} values differ"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 48), (2, 37, 48), (1, 300, 1536), (3, 17, 1000), (0, 5, 64)])
def test_residual_norm_triton_matches_reference(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    b, n, c = shape
    x, y = (torch.randn(b, n, c, generator=g).cuda().to(dtype) for _ in range(2))
    shift, scale, gate = _mod(max(b, 1), c, dtype, "cuda", g)[:3]
    shift, scale, gate = shift[:b], scale[:b], gate[:b]
    w, bias = torch.randn(c, generator=g).cuda(), torch.randn(c, generator=g).cuda()
    cases = [dict(shift=shift, scale=scale), dict(weight=w, bias=bias), dict()]
    for kw in cases:
        for yy, gg in ((None, None), (y, None), (y, gate)):
            for norm in (True, False):
                want = reference.residual_norm(x, yy, gg, norm=norm, **kw)
                got = dit_norm.residual_norm(x, yy, gg, norm=norm, backend="triton", **kw)
                if b * n:
                    _check(got[0], want[0], dtype, f"x_new {kw.keys()} y={yy is not None} gate={gg is not None}")
                    if norm:
                        _check(got[1], want[1], dtype, f"h {kw.keys()} y={yy is not None} gate={gg is not None}")
    # packed tokens: per-token vectors [N, C] (strided views of [N, 6C])
    xv, yv = x.reshape(-1, c), y.reshape(-1, c)
    vec = torch.randn(xv.shape[0], 6 * c, generator=g).cuda().to(dtype).chunk(6, dim=-1)
    want = reference.residual_norm(xv, yv, vec[2], shift=vec[0], scale=vec[1])
    got = dit_norm.residual_norm(xv, yv, vec[2], shift=vec[0], scale=vec[1], backend="triton")
    if b * n:
        _check(got[1], want[1], dtype, "varlen h")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,n,h,d", [(1, 1, 2, 24), (2, 37, 2, 24), (1, 300, 12, 128), (2, 64, 16, 64), (1, 5, 3, 10)])
def test_rms_norm_rope_triton_matches_reference(dtype, b, n, h, d):
    g = torch.Generator().manual_seed(b * n + h + d)
    qkv = (torch.randn(b, n, 3, h, d, generator=g) * 3).cuda().to(dtype)
    q = qkv.unbind(-3)[0]
    gamma = (torch.rand(h, d, generator=g) + 0.5).cuda()
    ph = rope_phases(torch.randint(0, 64, (b, n, 3), generator=g), d).cuda()
    cases = ((q, None), (q, ph), (q, ph[0]), (q.reshape(b * n, h, d), ph.reshape(b * n, -1)))  # last: packed
    for x, phases in cases:  # ph[0]: [L, D/2] phases shared by the batch (the dense SS model)
        want = reference.rms_norm_rope(x, gamma, phases)
        got = dit_norm.rms_norm_rope(x, gamma, phases, backend="triton")
        assert got.is_contiguous()
        _check(got, want, dtype, f"phases {None if phases is None else tuple(phases.shape)}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k,n", [(1, 48, 192), (37, 48, 200), (0, 64, 256), (300, 1536, 8192), (2984, 96, 7)])
def test_linear_gelu_epilogue_is_at_least_as_close_to_float32_as_the_modules(dtype, m, k, n):
    """The fused GELU rounds once where the two modules round twice: its error against float32 must not exceed the
    modules' (a wrong approximation, a missing bias or an unwritten output would)."""
    g = torch.Generator().manual_seed(m + k + n)
    x = torch.randn(m, k, generator=g).cuda().to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).cuda().to(dtype)
    b = torch.randn(n, generator=g).cuda().to(dtype)
    got = dit_norm.linear_gelu(x.view(1, m, k), w, b).view(m, n)  # leading dims fold into rows
    assert got.shape == (m, n) and got.dtype == dtype
    if m == 0:
        return
    exact = reference.linear_gelu(x.double(), w.double(), b.double())
    err = lambda y: ((y.double() - exact).norm() / exact.norm()).item()  # noqa: E731
    assert torch.isfinite(got).all()
    assert err(got) <= 1.05 * err(reference.linear_gelu(x, w, b)) + 1e-4, (err(got), err(reference.linear_gelu(x, w, b)))


@pytest.mark.cuda
def test_linear_gelu_epilogue_is_the_tanh_gelu():
    """In float32 the epilogue must be the tanh approximation the DiT uses (the exact erf GELU differs by ~1e-4)."""
    from trellis2.kernels.dit_norm import cublaslt

    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g).cuda() for s in ((512, 256), (1024, 256), (1024,)))
    got = cublaslt.linear_gelu(x, w / 16, b)
    pre = torch.nn.functional.linear(x.double(), w.double() / 16, b.double())
    tanh, erf = (torch.nn.functional.gelu(pre, approximate=a) for a in ("tanh", "none"))
    rel = lambda y: ((got.double() - y).norm() / y.norm()).item()  # noqa: E731
    assert rel(tanh) < 2e-5 < 1e-4 < rel(erf), (rel(tanh), rel(erf))
    assert dit_norm.linear_gelu(x, w, b, backend="triton").shape == (512, 1024)  # explicit: fused in float32 too


@pytest.mark.cuda
def test_token_counts_do_not_recompile_the_kernels():
    """Every image has another token count L: no new compile for L = 2984, 2985, 2992, 3001 once one ran (the row
    and rows-per-item counts are not specialised; a specialised L cost ~1.7 s of compiles on the first run)."""
    from trellis2.kernels.dit_norm import triton as tk

    def compiled() -> int:
        caches = [getattr(k, "device_caches", None) for k in (tk._residual_norm_kernel, tk._rms_norm_rope_kernel)]
        if any(c is None for c in caches):
            pytest.skip("this triton keeps no device_caches to count compiles in")
        return sum(len(entry[0]) for c in caches for entry in c.values())

    g = torch.Generator().manual_seed(3)
    counts = []
    for n in (2984, 2985, 2992, 3001):
        x, y = (torch.randn(2, n, 64, generator=g).cuda().to(torch.bfloat16) for _ in range(2))
        shift, scale, gate = _mod(2, 64, torch.bfloat16, "cuda", g)[:3]
        dit_norm.residual_norm(x, y, gate, shift=shift, scale=scale, backend="triton")
        q = torch.randn(2, n, 3, 2, 32, generator=g).cuda().to(torch.bfloat16)[:, :, 0]
        phases = torch.polar(torch.ones(n, 16), torch.randn(n, 16, generator=g)).cuda()
        dit_norm.rms_norm_rope(q, torch.ones(2, 32, device="cuda"), phases, backend="triton")
        counts.append(compiled())
    assert counts[1:] == counts[:1] * 3, f"compiled kernels after each token count: {counts}"


@pytest.mark.cuda
def test_triton_rejects_layouts_it_does_not_take():
    x = torch.randn(4, 6, 16, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(BackendUnavailableError, match="does not take this layout"):
        dit_norm.residual_norm(x.transpose(1, 2), backend="triton")  # channels not contiguous
    auto = dit_norm.residual_norm(x.transpose(1, 2))[1]  # auto quietly runs the reference
    assert torch.equal(auto, reference.residual_norm(x.transpose(1, 2))[1])


# ------------------------------------------------------------------------------------- Triton interpreter (CPU)
_INTERP_SCRIPT = r"""
import itertools, sys
import torch
from trellis2.kernels.dit_norm import reference as R, triton as T
TOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}
MISMATCH = {torch.float32: 1.0, torch.float16: 0.02, torch.bfloat16: 0.02}
bad = []
def check(out, ref, what):
    err = ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()
    frac = (out != ref).float().mean().item()
    if out.shape != ref.shape or out.dtype != ref.dtype or err > TOL[ref.dtype] or frac > MISMATCH[ref.dtype]:
        bad.append(f"{what}: rel err {err:.2e}, {frac:.2%} differ")
g = torch.Generator().manual_seed(0)
n = 0
for dt, c, m in itertools.product((torch.float32, torch.bfloat16, torch.float16), (7, 64, 1536), (1, 3, 37)):
    x, y = (torch.randn(m, c, generator=g).to(dt) for _ in range(2))
    vec = torch.randn(m, 3 * c, generator=g).to(dt).chunk(3, -1)  # per-token vectors: strided views
    item = torch.randn(1, 3 * c, generator=g).to(dt).unsqueeze(1).chunk(3, -1)  # [1, 1, C] per item
    w, b = torch.randn(c, generator=g), torch.randn(c, generator=g)
    cases = [(x, None, None, True, dict(shift=vec[0], scale=vec[1]), None),  # (a) norm1 + modulation
             (x, y, vec[2], True, dict(weight=w, bias=b), None),  # (b) gated residual + norm2
             (x, y, vec[2], True, dict(weight=w, bias=b), 4),  # (b) with a 4-row tile crossing the end of x
             (x, y, None, True, dict(shift=vec[0], scale=vec[1]), None),  # (c) no gate
             (x, y, vec[2], False, {}, None),  # (d) residual only
             (x, y, None, True, dict(scale=vec[1]), 2),
             (x.view(1, m, c), y.view(1, m, c), item[2], True, dict(shift=item[0], scale=item[1]), None)]
    for xx, yy, gg, norm, kw, bm in cases:
        assert T.supported_residual_norm(xx, yy, gg, **kw)
        want = R.residual_norm(xx, yy, gg, norm=norm, **kw)
        bm = bm or (None if m < 8 else 16)  # the interpreter runs programs one by one: few, big ones at M=37
        got = T.residual_norm(xx, yy, gg, norm=norm, block_m=bm, **kw)
        what = f"residual {dt} C={c} M={m} {sorted(kw)} y={yy is not None} g={gg is not None} bm={bm}"
        check(got[0], want[0], what + " x_new")
        assert (got[1] is None) == (want[1] is None)
        if norm:
            check(got[1], want[1], what + " h")
        n += 1
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
for dt, h, d, m in itertools.product(DTYPES, (1, 3, 12), (8, 10, 128), (1, 3, 37)):
    q = (torch.randn(m, 3, h, d, generator=g) * 3).to(dt)[:, 0]  # strided rows out of a fused qkv
    gamma = torch.rand(h, d, generator=g) + 0.5
    ph = torch.polar(torch.ones(m, d // 2), torch.rand(m, d // 2, generator=g) * 6.283)
    both = torch.cat([q, q]).view(2, m, h, d)  # phases [L, D/2] broadcast over the batch
    for x, phases, br in ((q, None, None if m * h < 8 else 32), (q, ph, 16), (both, ph, 4 if m * h < 8 else 64)):
        assert T.supported_rms_norm_rope(x, gamma, phases)
        got = T.rms_norm_rope(x, gamma, phases, block_r=br)
        assert got.is_contiguous()
        what = f"rope {dt} H={h} D={d} M={m} ph={phases is not None} br={br}"
        check(got, R.rms_norm_rope(x, gamma, phases), what)
        n += 1
print("checked", n, "cases")
if bad:
    sys.exit("\n".join(bad[:20]))
"""


def test_triton_kernels_in_interpreter_match_reference(tmp_path):
    """The Triton kernels run on CPU in Triton's interpreter (TRITON_INTERPRET=1 must be set before triton is
    imported, hence a subprocess) against the reference, awkward sizes, every dtype, strided views."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _INTERP_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=900, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "checked" in proc.stdout
