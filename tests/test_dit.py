"""The two TRELLIS.2 flow DiTs and their building blocks: goldens, RoPE, token layouts, precision, configs."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import MANIFESTS, assert_close_rel, random_model, random_sparse
from trellis2.trellis2_core.errors import ConfigError, InputError
from trellis2.trellis2_core.models import from_config
from trellis2.trellis2_core.nn.attention import VarLen, attention_backend
from trellis2.trellis2_core.nn.norm import MultiHeadRMSNorm
from trellis2.trellis2_core.nn.rope import apply_rope, rope_phases
from trellis2.trellis2_core.nn.timestep import timestep_embedding
from trellis2.trellis2_core.sparse import SparseTensor

TINY = {
    "resolution": 4, "in_channels": 8, "out_channels": 8, "model_channels": 48, "cond_channels": 16,
    "num_blocks": 2, "num_heads": 2, "mlp_ratio": 5.3334, "pe_mode": "rope", "share_mod": True,
    "initialization": "scaled", "qk_rms_norm": True, "qk_rms_norm_cross": True, "dtype": "float32",
}  # fmt: skip


def _model(name: str, seed: int = 0, **args) -> torch.nn.Module:
    return random_model(name, TINY, seed=seed, **args)


def _golden_model(golden):
    cfg = {"name": golden.config["name"], "args": golden.config["args"]}
    m = from_config(cfg, device="cpu").eval()
    m.load_state_dict(golden.weights, strict=True)
    return m


def _capture(model, names):
    """Forward hooks recording the outputs of submodules (by attribute path)."""
    out = {}
    for name in names:
        model.get_submodule(name).register_forward_hook(lambda mod, i, o, name=name: out.__setitem__(name, o))
    return out


def _sparse(lengths, channels, res=40, seed=1):
    """A SparseTensor with len(lengths) items of distinct random voxels (coords < res)."""
    return random_sparse(lengths, channels, res=res, seed=seed)


# ------------------------------------------------------------------------------------------------ goldens
def test_ss_flow_golden_every_intermediate(golden):
    g = golden("ss_flow_forward")
    m = _golden_model(g)
    cap = _capture(m, ["t_embedder", "adaLN_modulation", "input_layer", "blocks.0"])
    with torch.no_grad():
        out = m(g.inputs["x"], g.inputs["t"], g.inputs["cond"])
    o = g.outputs
    assert_close_rel(cap["t_embedder"], o["t_emb"], what="t_emb")
    assert_close_rel(cap["adaLN_modulation"], o["mod"], what="mod")
    assert_close_rel(cap["input_layer"], o["h_in"], what="h_in")
    assert_close_rel(cap["blocks.0"], o["block0_out"], what="block0_out")
    phases = m.rope_phases()
    assert_close_rel(phases.real, o["rope_phases_real"], what="rope real")
    assert_close_rel(phases.imag, o["rope_phases_imag"], what="rope imag")
    assert_close_rel(out, o["out"], what="out")


@pytest.mark.parametrize("name", ["slat_flow_shape_forward", "slat_flow_tex_forward"])
def test_slat_flow_golden(golden, name):
    g = golden(name)
    m = _golden_model(g)
    cap = _capture(m, ["blocks.0"])
    i = g.inputs
    x = SparseTensor(i["feats"], i["coords"])
    cc = SparseTensor(i["concat_cond_feats"], i["coords"]) if "concat_cond_feats" in i else None
    with torch.no_grad():
        out = m(x, i["t"], i["cond"], cc)
    assert torch.equal(out.coords, x.coords)
    assert_close_rel(cap["blocks.0"], g.outputs["block0_out"], what="block0_out")
    assert_close_rel(out.feats, g.outputs["out_feats"], what="out_feats")


def test_rope_phases_buffer_in_a_file_is_dropped(golden):
    g = golden("ss_flow_forward")
    m = from_config({"name": g.config["name"], "args": g.config["args"]}, device="cpu")
    sd = dict(g.weights, rope_phases=torch.zeros(64, 16, dtype=torch.complex64))
    m.load_state_dict(sd, strict=True)  # would raise 'unexpected key' without the pre-hook
    assert "rope_phases" not in m.state_dict()


# ------------------------------------------------------------------------------------------------ pieces
def test_rope_per_axis_structure_and_identity_pair():
    d = 128  # 21 frequencies per axis, 63 rotated pairs + 1 identity pair
    coords = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 2, 0], [0, 0, 3], [5, 7, 11]])
    ph = rope_phases(coords, d)
    assert ph.shape == (5, 64) and ph.dtype == torch.complex64
    assert torch.equal(ph[:, 63], torch.ones(5, dtype=torch.complex64))  # identity pair
    assert torch.equal(ph[0], torch.ones(64, dtype=torch.complex64))  # origin: no rotation
    freqs = 1.0 / 10000.0 ** (torch.arange(21, dtype=torch.float64) / 21)
    angles = torch.angle(ph).double()
    for axis, row, c in ((0, 1, 1), (1, 2, 2), (2, 3, 3)):
        block = slice(axis * 21, axis * 21 + 21)
        ref = torch.remainder(c * freqs + torch.pi, 2 * torch.pi) - torch.pi
        torch.testing.assert_close(angles[row, block], ref, atol=1e-5, rtol=0)
        others = [a for a in range(63) if not (axis * 21 <= a < axis * 21 + 21)]
        assert torch.equal(angles[row, others], torch.zeros(len(others), dtype=torch.float64))


def test_rope_rotates_interleaved_pairs():
    x = torch.zeros(1, 1, 6)  # [L, H, D=6]: one frequency per axis, pairs (0,1) (2,3) (4,5)
    x[0, 0, 0] = 1.0  # pair 0 = x axis, frequency 1
    y = apply_rope(x, rope_phases(torch.tensor([[torch.pi / 2, 0, 0]]), 6))
    torch.testing.assert_close(y[0, 0], torch.tensor([0.0, 1.0, 0, 0, 0, 0]), atol=1e-6, rtol=0)


def test_timestep_embedding_is_cos_first():
    e = timestep_embedding(torch.tensor([0.0, 1000.0]), 256)
    assert torch.equal(e[0, :128], torch.ones(128)) and torch.equal(e[0, 128:], torch.zeros(128))
    torch.testing.assert_close(e[1, 0], torch.cos(torch.tensor(1000.0)))


def test_qk_rms_norm_is_f_normalize_times_gamma_sqrt_d():
    n = MultiHeadRMSNorm(4, 2)
    with torch.no_grad():
        n.gamma.copy_(torch.tensor([[1.0, 2, 3, 4], [1, 1, 1, 1]]))
    x = torch.full((3, 2, 4), 1e-4)  # tiny vectors: an RMSNorm with a real eps would shrink them
    y = n(x)
    torch.testing.assert_close(y[:, 0], torch.tensor([1.0, 2, 3, 4]).expand(3, 4))
    torch.testing.assert_close(y[:, 1], torch.ones(3, 4))


# ------------------------------------------------------------------------------------------------ layouts
def test_block_dense_path_equals_varlen_path():
    m = _model("SLatFlowModel")
    block, c = m.blocks[0], TINY["model_channels"]
    x = _sparse([20, 20], c)
    h, mod, cond = x.feats, torch.randn(2, 6 * c), torch.randn(2, 5, TINY["cond_channels"])
    ph = m.token_phases(x)
    with torch.no_grad():
        dense = block(h.view(2, 20, c), mod, cond, ph.view(2, 20, -1)).reshape(40, c)
        varlen = block(h, mod, cond, ph, VarLen.from_offsets(x.batch_offsets(), x.device))
    assert_close_rel(varlen, dense, rtol=1e-5, what="varlen vs dense")


def test_sparse_batch_equals_items_run_alone():
    m = _model("SLatFlowModel")
    t, cond = torch.tensor([900.0, 250.0]), torch.randn(2, 5, TINY["cond_channels"])
    for lengths, packed in (([31, 31], False), ([37, 23], True)):  # dense-batched path, varlen path
        x = _sparse(lengths, TINY["in_channels"])
        off = x.batch_offsets()
        with torch.no_grad():
            both = m(x, t, cond).feats
            assert (x.get_cache("trellis2.varlen_layout") is not None) == packed, "wrong attention path taken"
            for b in range(2):
                item = x.batch_item(b)
                item = SparseTensor(item.feats, torch.cat([torch.zeros_like(item.coords[:, :1]), item.coords[:, 1:]], 1))
                alone = m(item, t[b : b + 1], cond[b : b + 1]).feats
                assert_close_rel(both[off[b] : off[b + 1]], alone, rtol=1e-5, what=f"{lengths} item {b}")


def test_varlen_items_are_isolated():
    m = _model("SLatFlowModel")
    x = _sparse([37, 23], TINY["in_channels"])
    t, cond = torch.tensor([900.0, 250.0]), torch.randn(2, 5, TINY["cond_channels"])
    with torch.no_grad():
        a = m(x, t, cond).feats
        feats2 = x.feats.clone()
        feats2[37:] += 1.0
        cond2, t2 = cond.clone(), torch.tensor([900.0, 600.0])
        cond2[1] += 1.0
        b = m(SparseTensor(feats2, x.coords), t2, cond2).feats
    assert torch.equal(a[:37], b[:37])
    assert not torch.allclose(a[37:], b[37:])


def test_ss_flow_batch_items_are_independent():
    m = _model("SparseStructureFlowModel")
    x, t, cond = torch.randn(2, 8, 4, 4, 4), torch.tensor([1000.0, 437.5]), torch.randn(2, 3, 16)
    with torch.no_grad():
        both = m(x, t, cond)
        alone = m(x[1:], t[1:], cond[1:])
    assert_close_rel(both[1:], alone, rtol=1e-5)


def _q_rows(model):
    """Rows seen by every cross-attention query projection (forward hooks)."""
    rows = []
    for block in model.blocks:
        block.cross_attn.to_q.register_forward_hook(lambda m, i, o: rows.append(i[0].numel() // i[0].shape[-1]))
    return rows


@pytest.mark.parametrize("lengths", [None, [31, 31], [37, 23], [0, 19]])  # SS dense; SLat dense view, varlen, empty item
def test_zero_condition_items_skip_cross_attention_with_the_same_result(lengths):
    """Items whose condition is all zeros (the sampler's negative condition) get the constant cross-attention output
    instead of attending: same velocity up to rounding, and their tokens never reach to_q."""
    dense = lengths is None
    m = _model("SparseStructureFlowModel" if dense else "SLatFlowModel")
    assert type(m).accepts_zero_cond_from
    cond = torch.cat([torch.randn(1, 5, 16), torch.zeros(1, 5, 16)])
    t = torch.tensor([900.0, 900.0])
    x = torch.randn(2, 8, 4, 4, 4) if dense else _sparse(lengths, TINY["in_channels"])
    tokens = [64, 64] if dense else lengths
    rows = _q_rows(m)
    with torch.no_grad():
        full = m(x, t, cond)
        assert rows == [sum(tokens)] * 2
        rows.clear()
        fast = m(x, t, cond, zero_cond_from=1)
        assert rows == [tokens[0]] * 2  # only the conditioned item's tokens are projected and attended
        rows.clear()
        none = m(x, t, torch.zeros_like(cond), zero_cond_from=0)
        assert rows == []
        ref_none = m(x, t, torch.zeros_like(cond))
    f = (lambda v: v) if dense else (lambda v: v.feats)
    split = 1 if dense else tokens[0]
    for part, what in ((slice(None, split), "conditioned item"), (slice(split, None), "zero-condition item")):
        if f(full)[part].numel():
            assert_close_rel(f(fast)[part], f(full)[part], rtol=1e-6, what=f"zero_cond_from=1, {what}")
    assert_close_rel(f(none), f(ref_none), rtol=1e-6, what="zero_cond_from=0")
    with pytest.raises(ValueError, match="zero_from must be in"):
        with torch.no_grad():
            m(x, t, cond, zero_cond_from=3)


def test_attention_backend_is_read_at_call_time(monkeypatch):
    m = _model("SparseStructureFlowModel")
    x, t, cond = torch.randn(1, 8, 4, 4, 4), torch.tensor([500.0]), torch.randn(1, 3, 16)
    with torch.no_grad():
        ref = m(x, t, cond)
        with attention_backend("math"):
            assert_close_rel(m(x, t, cond), ref, rtol=1e-5)
        monkeypatch.setenv("TRELLIS2_ATTENTION_BACKEND", "no-such-kernel")
        with pytest.raises(ConfigError, match="TRELLIS2_ATTENTION_BACKEND"):
            m(x, t, cond)


# ------------------------------------------------------------------------------------------------ precision
def test_bf16_layout_matches_manifest_and_runs_on_cpu():
    manifest = json.loads((MANIFESTS / "ss_flow_img_dit_1_3B_64_bf16.json").read_text())
    want = {k[len("blocks.0.") :]: v["dtype"] for k, v in manifest["params"].items() if k.startswith("blocks.0.")}
    top = {k: v["dtype"] for k, v in manifest["params"].items() if not k.startswith("blocks.")}
    dt = {"BF16": torch.bfloat16, "F32": torch.float32}
    for name in ("SparseStructureFlowModel", "SLatFlowModel"):
        m32 = _model(name)
        m = from_config({"name": name, "args": {**TINY, "dtype": "bfloat16"}}, device="cpu").eval()
        m.load_state_dict(m32.state_dict())  # load_state_dict casts to each parameter's dtype
        for k, p in m.state_dict().items():
            if k.startswith("blocks."):
                expected = dt[want[k.split(".", 2)[2]]]
            else:
                expected = dt[top[k]]
            assert p.dtype == expected, (k, p.dtype, expected)
        with torch.no_grad():
            if name == "SparseStructureFlowModel":
                args = (torch.randn(2, 8, 4, 4, 4), torch.tensor([900.0, 250.0]), torch.randn(2, 3, 16))
                out, ref = m(*args), m32(*args)
                assert out.dtype == torch.float32
            else:
                for lengths in ([16, 16], [19, 12]):
                    x = _sparse(lengths, 8)
                    args = (x, torch.tensor([900.0, 250.0]), torch.randn(2, 3, 16))
                    out, ref = m(*args).feats, m32(*args).feats
                    assert out.dtype == torch.float32
        assert_close_rel(out, ref, rtol=0.1, what=f"{name} bf16 vs fp32")


def test_dtype_override_builds_float32_blocks():
    manifest = json.loads((MANIFESTS / "slat_flow_img2shape_dit_1_3B_512_bf16.json").read_text())
    m = from_config(manifest["config"], device="meta", dtype=torch.float32)
    assert {p.dtype for p in m.parameters()} == {torch.float32}


# ------------------------------------------------------------------------------------------------ errors
def test_config_errors_are_clear():
    base = {"name": "SLatFlowModel", "args": dict(TINY)}
    with pytest.raises(ConfigError, match="unknown argument.*'num_layers'"):
        from_config({**base, "args": {**TINY, "num_layers": 3}})
    with pytest.raises(ConfigError, match="model_channels 48 must be divisible by num_heads 5"):
        from_config({**base, "args": {**TINY, "num_heads": 5}})
    with pytest.raises(ConfigError, match="not divisible by num_head_channels 20"):
        from_config({**base, "args": {**{k: v for k, v in TINY.items() if k != "num_heads"}, "num_head_channels": 20}})
    with pytest.raises(ConfigError, match="pe_mode 'ape' is not supported"):
        from_config({**base, "args": {**TINY, "pe_mode": "ape"}})
    with pytest.raises(ConfigError, match="share_mod false"):
        from_config({"name": "SparseStructureFlowModel", "args": {**TINY, "share_mod": False}})
    with pytest.raises(ConfigError, match="dtype"):
        from_config({**base, "args": {**TINY, "dtype": "float8"}})


def test_input_errors_name_the_argument():
    ss, sl = _model("SparseStructureFlowModel"), _model("SLatFlowModel", in_channels=16)
    with pytest.raises(InputError, match=r"x: expected a latent \[B, 8, 4, 4, 4\]"):
        ss(torch.randn(1, 8, 5, 5, 5), torch.tensor([1.0]), torch.randn(1, 3, 16))
    with pytest.raises(InputError, match="cond: expected"):
        ss(torch.randn(2, 8, 4, 4, 4), torch.tensor([1.0, 2.0]), torch.randn(1, 3, 16))
    with pytest.raises(InputError, match="concat_cond"):
        sl(_sparse([5], 8), torch.tensor([1.0]), torch.randn(1, 3, 16))


@pytest.mark.cuda
def test_cuda_bf16_matches_cpu_fp32_without_host_syncs():
    for name in ("SparseStructureFlowModel", "SLatFlowModel"):
        m32 = _model(name)
        m = from_config({"name": name, "args": {**TINY, "dtype": "bfloat16"}}, device="cuda").eval()
        m.load_state_dict(m32.state_dict())
        cases = (
            [(torch.randn(2, 8, 4, 4, 4), torch.tensor([900.0, 250.0]), torch.randn(2, 3, 16))]
            if name == "SparseStructureFlowModel"
            else [(_sparse(n, 8), torch.tensor([900.0, 250.0]), torch.randn(2, 3, 16)) for n in ([16, 16], [19, 12])]
        )
        for x, t, cond in cases:
            xc = x.to("cuda") if isinstance(x, SparseTensor) else x.cuda()
            tc, cc = t.cuda(), cond.cuda()
            with torch.no_grad():
                out = m(xc, tc, cc)  # first call fills the coordinate caches
                torch.cuda.set_sync_debug_mode("error")
                try:
                    again = m(xc.replace(xc.feats) if isinstance(xc, SparseTensor) else xc, tc, cc)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
                ref = m32(x, t, cond)
            out, again, ref = (v.feats if isinstance(v, SparseTensor) else v for v in (out, again, ref))
            assert torch.equal(out, again)
            assert_close_rel(out.cpu(), ref, rtol=0.05, what=f"{name} cuda bf16 vs cpu fp32")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_auto_attention_matches_fp32_on_awkward_shapes(dtype):
    """'auto' (cuDNN first on Hopper) on the DiTs' real layouts: q/k/v strided views of one fused projection,
    odd lengths, a 1029-token context, batch 1 and 2; error vs fp32 math no worse than the flash kernel's."""
    from trellis2.trellis2_core.nn.attention import scaled_dot_product_attention

    g = torch.Generator().manual_seed(0)
    for b, lq, lk, self_attn in [(1, 1, 1, True), (2, 37, 37, True), (1, 2985, 2985, True), (2, 4096, 1029, False)]:
        qkv = torch.randn(b, lq, 3, 12, 64, generator=g).cuda().to(dtype)
        q = qkv[:, :, 0]
        if self_attn:
            k, v = qkv[:, :, 1], qkv[:, :, 2]
        else:
            kv = torch.randn(b, lk, 2, 12, 64, generator=g).cuda().to(dtype)
            k, v = kv[:, :, 0], kv[:, :, 1]
        ref = scaled_dot_product_attention(q.float(), k.float(), v.float(), backend="math")
        errs = {}
        for name in ("auto", "flash", "math"):
            out = scaled_dot_product_attention(q, k, v, backend=name)
            assert out.shape == q.shape and out.dtype == dtype
            errs[name] = ((out.float() - ref).norm() / ref.norm()).item()
        assert errs["auto"] <= max(2 * errs["flash"], 2 * errs["math"], 1e-3), (b, lq, lk, errs)
        again = scaled_dot_product_attention(q, k, v, backend="auto")
        assert torch.equal(again, scaled_dot_product_attention(q, k, v, backend="auto")), "auto is not deterministic"


@pytest.mark.cuda
def test_cuda_auto_attention_runs_cudnn_on_hopper():
    from trellis2.trellis2_core.nn.attention import scaled_dot_product_attention

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the cuDNN preference applies to Hopper (compute capability 9.x) only")
    q, k, v = (torch.randn(2, 4096, 12, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    scaled_dot_product_attention(q, k, v)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        scaled_dot_product_attention(q, k, v)
        torch.cuda.synchronize()
    names = [e.name.lower() for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert any("cudnn" in n for n in names), names  # e.g. cudnn_generated_fort_native_sdpa_sm90_flash_fprop_...
    assert not any(n.startswith("void pytorch_flash") or "flash_fwd_kernel" in n for n in names), names
