"""Reference values for OpenSoraPlan from the authors' own modules (run once by hand; CI never runs this).

    PYTHONPATH=/tmp/osp/pkgs:. .venv/bin/python docs/fidelity/ref_osp.py tables    # writes tests/facts/osp-*.json
    PYTHONPATH=/tmp/osp/pkgs:. .venv/bin/python docs/fidelity/ref_osp.py forward   # prints the tiny-forward numbers
    PYTHONPATH=. .venv/bin/python docs/fidelity/ref_osp.py loss                     # prints the objective losses

Trees (docs/fidelity/ref_osp_authors.py says how they were made and what is stubbed): PKU-YuanGroup/Open-Sora-Plan
v1.2.0 (OpenSoraT2V, CausalVAEModel), v1.3.0 (OpenSoraT2V_v1_3, OpenSoraInpaint_v1_3) and v1.3.1 (WFVAEModel: the
v1.3.0 tree lacks its folder). Each tree defines the package `opensora`, so every (tree, module) runs in a child
process of its own.

`tables`: each released variant built on the meta device with the config the authors' train/sample scripts build it
with (model registry function + the kwargs of train_t2v_diffusers.py / train_inpaint.py) and, for the VAEs, the
released config values (WF-VAE: MindSpeed-MM's loading test of the released checkpoint, tests/ut/.../test_ae.py;
CausalVAE D4 4x8x8: the v1.2 vae config.json as quoted in third-party notes, identical to the class defaults of
our causalvae.py): key -> shape of the authors' `state_dict()`.

`forward`: the tiny configs of tests/engines/models/dits/test_osp_reference.py, weights from
`tests.fidelity.seeded_weights`
(seed 0) over the authors' own state-dict names, inputs from `seeded_tensor`; prints for each output its sum, sum of
squares and the values at fixed flat indices, which the test holds ours to.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
TREES = {"v1.2.0": "/tmp/osp/v1.2.0", "v1.3.0": "/tmp/osp/v1.3.0", "v1.3.1": "/tmp/osp/v1.3.1"}
REPO = "PKU-YuanGroup/Open-Sora-Plan"
T2V12 = "opensora.models.diffusion.opensora.modeling_opensora"
T2V13 = "opensora.models.diffusion.opensora_v1_3.modeling_opensora"
I2V13 = "opensora.models.diffusion.opensora_v1_3.modeling_inpaint"
WFVAE = "opensora.models.causalvideovae.model.vae.modeling_wfvae"
CAUSAL = "opensora.models.causalvideovae.model.causal_vae.modeling_causalvae"

# The kwargs train_t2v_diffusers.py (v1.2.0) passes besides the registry function's own (in/out = CausalVAE D4's 4;
# sample_size from train_t2v.sh's 29x480x640, used only by the absolute position embedding use_rope turns off).
V12_KW = dict(in_channels=4, out_channels=4, sample_size=(60, 80), sample_size_t=8, attention_bias=True,
              activation_fn="gelu-approximate",
              num_embeds_ada_norm=1000, use_linear_projection=False, only_cross_attention=False,
              double_self_attention=False, upcast_attention=False, norm_elementwise_affine=False, norm_eps=1e-6,
              attention_type="default", attention_mode="math", interpolation_scale_h=1.0, interpolation_scale_w=1.0,
              interpolation_scale_t=1.0, use_rope=True)  # fmt: skip
V13_KW = dict(in_channels=8, out_channels=8, interpolation_scale_h=1.0, interpolation_scale_w=1.0,
              interpolation_scale_t=1.0, sparse1d=True, sparse_n=4)  # fmt: skip
WF_RELEASED = dict(latent_dim=8, base_channels=128, encoder_num_resblocks=2, encoder_energy_flow_hidden_size=64,
                   decoder_num_resblocks=2, decoder_energy_flow_hidden_size=128, use_attention=True, dropout=0.0,
                   norm_type="layernorm", t_interpolation="trilinear", connect_res_layer_num=2)  # fmt: skip
CAUSAL_RELEASED = dict(
    hidden_size=128, z_channels=4, hidden_size_mult=[1, 2, 4, 4], attn_resolutions=[], dropout=0.0, resolution=256,
    double_z=True, embed_dim=4, num_res_blocks=2, q_conv="CausalConv3d", encoder_conv_in="Conv2d",
    encoder_conv_out="CausalConv3d", encoder_attention="AttnBlock3DFix",
    encoder_resnet_blocks=["ResnetBlock2D", "ResnetBlock2D", "ResnetBlock3D", "ResnetBlock3D"],
    encoder_spatial_downsample=["Downsample", "Spatial2xTime2x3DDownsample", "Spatial2xTime2x3DDownsample", ""],
    encoder_temporal_downsample=["", "", "", ""], encoder_mid_resnet="ResnetBlock3D", decoder_conv_in="CausalConv3d",
    decoder_conv_out="CausalConv3d", decoder_attention="AttnBlock3DFix",
    decoder_resnet_blocks=["ResnetBlock3D"] * 4,
    decoder_spatial_upsample=["", "SpatialUpsample2x", "Spatial2xTime2x3DUpsample", "Spatial2xTime2x3DUpsample"],
    decoder_temporal_upsample=["", "", "", ""], decoder_mid_resnet="ResnetBlock3D", use_quant_layer=True,
)  # fmt: skip

# tiny configs (the test builds ours with the same numbers)
TINY_DIT = dict(num_attention_heads=2, attention_head_dim=12, num_layers=4, cross_attention_dim=24,
                caption_channels=16, patch_size=2, patch_size_t=1)  # fmt: skip
TINY_WF = dict(WF_RELEASED, latent_dim=4, base_channels=32, encoder_num_resblocks=1,
               encoder_energy_flow_hidden_size=32, decoder_num_resblocks=1, decoder_energy_flow_hidden_size=32,
               connect_res_layer_num=1)  # fmt: skip
TINY_CAUSAL = dict(CAUSAL_RELEASED, hidden_size=32, hidden_size_mult=[1, 1, 2, 2], num_res_blocks=1)
#: (B, C, T, H, W) latent shapes of the DiT checks: 48 tokens (a multiple of sparse_n^2 = 16) and 36 (padded)
DIT_SHAPES = ((2, 3, 8, 8), (2, 3, 6, 8))
CLIP = (1, 3, 9, 32, 32)
INDICES = (0, 7, 101, 555, 1234)


def _child(tree: str, what: str) -> dict:
    """Run `what` against one tree in a fresh interpreter (each tree is its own `opensora` package)."""
    out = subprocess.run([sys.executable, __file__, "_child", tree, what], check=True, capture_output=True,
                         text=True, cwd=ROOT)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def _load(tree: str, module: str):
    sys.path.insert(0, str(ROOT / "docs" / "fidelity"))
    from ref_osp_authors import authors

    return authors(TREES[tree], module)


def _build(what: str, tiny: bool) -> tuple[torch.nn.Module, str]:
    """The authors' module for `what`, and the tree it came from."""
    if what == "t2v12":
        m = _load("v1.2.0", T2V12)
        if tiny:
            cfg = {k: v for k, v in TINY_DIT.items()}
            return m.OpenSoraT2V(norm_type="ada_norm_single", **cfg, **V12_KW), "v1.2.0"
        return m.OpenSoraT2V_ROPE_L_122(**V12_KW), "v1.2.0"
    if what in ("t2v13", "i2v13"):
        m = _load("v1.3.0", T2V13 if what == "t2v13" else I2V13)
        cls = m.OpenSoraT2V_v1_3 if what == "t2v13" else m.OpenSoraInpaint_v1_3
        extra = {} if what == "t2v13" else {"vae_scale_factor_t": 4}
        if tiny:
            kw = dict(V13_KW, in_channels=4, out_channels=4, activation_fn="gelu-approximate", **extra)
            return cls(**TINY_DIT, **kw), "v1.3.0"
        fn = m.OpenSoraT2V_v1_3_2B_122 if what == "t2v13" else m.OpenSoraInpaint_v1_3_2B_122
        return fn(**V13_KW, **extra), "v1.3.0"
    if what == "wfvae":
        return _load("v1.3.1", WFVAE).WFVAEModel(**(TINY_WF if tiny else WF_RELEASED)), "v1.3.1"
    if what == "causalvae":
        return _load("v1.2.0", CAUSAL).CausalVAEModel(**(TINY_CAUSAL if tiny else CAUSAL_RELEASED)), "v1.2.0"
    raise ValueError(what)


def _summary(x: torch.Tensor) -> dict:
    flat = x.detach().double().flatten()
    return {"shape": list(x.shape), "sum": flat.sum().item(), "sumsq": (flat**2).sum().item(),
            "at": {str(i): flat[i].item() for i in INDICES if i < flat.numel()}}  # fmt: skip


def _dit_inputs(shape: tuple[int, ...], channels: int) -> dict[str, torch.Tensor]:
    from tests.fidelity import seeded_tensor

    b, t, h, w = shape
    mask = torch.ones(b, 1, 5)
    mask[0, 0, 3:] = 0  # the first caption has 3 real tokens, the second 5
    return {"x": seeded_tensor("osp.x", (b, channels, t, h, w), 1, scale=1.0),
            "timestep": torch.tensor([37.0, 811.0]),
            "text": seeded_tensor("osp.text", (b, 5, 16), 1, scale=1.0), "text_mask": mask}  # fmt: skip


def _forward(what: str) -> dict:
    from tests.fidelity import seeded_tensor, seeded_weights

    # v1.3.0's attention pins the CUDA memory-efficient SDPA kernel (`torch.backends.cuda.sdp_kernel(enable_math=
    # False, ...)`), which leaves a CPU no kernel; the kernel choice does not change the function, so it is lifted.
    torch.backends.cuda.sdp_kernel = lambda **_: contextlib.nullcontext()
    torch.manual_seed(0)
    model, _ = _build(what, tiny=True)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(seeded_weights(shapes, 0), strict=True)
    model.eval()
    out = {}
    with torch.no_grad():
        if what.startswith(("t2v", "i2v")):
            channels = 4 + 4 + 4 if what == "i2v13" else 4
            for shape in DIT_SHAPES:
                inp = _dit_inputs(shape, channels)
                b, _, t, h, w = inp["x"].shape
                y = model(inp["x"], inp["timestep"], encoder_hidden_states=inp["text"][:, None],
                          attention_mask=torch.ones(b, t, h, w), encoder_attention_mask=inp["text_mask"],
                          return_dict=False)[0]  # fmt: skip
                out["x".join(map(str, shape))] = _summary(y)
        else:
            x = seeded_tensor("osp.clip", CLIP, 1, scale=0.5).clamp(-1, 1)
            moments = model.encode(x).parameters  # mean ++ logvar, as the encoder outputs it
            out["encode"] = _summary(moments)
            z = seeded_tensor("osp.z", (1, moments.shape[1] // 2, *moments.shape[2:]), 1, scale=1.0)
            out["decode"] = _summary(model.decode(z))
    return out


# (latent C, T, H, W) of each variant's buckets: v1.2.0 train_t2v.sh 29x480x640, the released 93x720p and 1x480p
# (CausalVAE 4x8x8, 4 channels); v1.3.0 train_t2v_v1_3.sh 93x352x640, the 93x480x480 bucket of max_hxw 236544 and
# images at 352x640 (WF-VAE 4x8x8, 8 channels).
LOSS_SHAPES = {
    "epsilon": ((4, 8, 60, 80), (4, 24, 90, 160), (4, 1, 60, 80)),
    "v_prediction": ((8, 24, 44, 80), (8, 24, 60, 60), (8, 1, 44, 80)),
}
LOSS_T = (0, 999, 500, 37)  # a batch of 4 fixed timesteps, both ends included


def _stand_in(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed "model": any function of x_t and t does, as long as both sides use the same one."""
    return 0.7 * torch.tanh(x_t) + 1e-3 * t.float().view(-1, 1, 1, 1, 1)


def loss_inputs(shape: tuple[int, ...], offset: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x0, the noise (with the authors' per-(sample, channel) offset added) and t for a batch of len(LOSS_T)."""
    from tests.fidelity import seeded_tensor

    b, (c, t, h, w) = len(LOSS_T), shape
    x0 = seeded_tensor("osp.loss.x0", (b, c, t, h, w), 2, scale=1.0)
    noise = seeded_tensor("osp.loss.noise", (b, c, t, h, w), 2, scale=1.0)
    noise = noise + offset * seeded_tensor("osp.loss.offset", (b, c, 1, 1, 1), 2, scale=1.0)
    return x0, noise, torch.tensor(LOSS_T)


def _authors_loss(prediction_type: str) -> dict[str, float]:
    """train_t2v_diffusers.py `run` (v1.2.0 lines 590-669; v1.3.0 lines 668-775) with the draws fixed: the scheduler
    as their parser/script builds it, `add_noise`, the target of its prediction type, compute_snr's min-SNR weights
    (/ snr for eps, / (snr + 1) for v), `F.mse_loss(reduction="none").reshape(b, -1) * w.reshape(b, 1)`, `.mean()`."""
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    if prediction_type == "epsilon":  # v1.2.0: DDPMScheduler() ; --snr_gamma 5.0 --noise_offset 0.02
        scheduler, gamma, offset = DDPMScheduler(), 5.0, 0.02
    else:  # v1.3.0: DDPMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True) ; --snr_gamma 5.0
        scheduler, gamma, offset = DDPMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True), 5.0, 0.0
    out = {}
    for shape in LOSS_SHAPES[prediction_type]:
        model_input, noise, timesteps = loss_inputs(shape, offset)
        noisy = scheduler.add_noise(model_input, noise, timesteps)
        model_pred = _stand_in(noisy, timesteps)
        target = noise if prediction_type == "epsilon" else scheduler.get_velocity(model_input, noise, timesteps)
        snr = compute_snr(scheduler, timesteps)
        w = torch.stack([snr, gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
        w = w / snr if prediction_type == "epsilon" else w / (snr + 1)
        b = model_pred.shape[0]
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="none").reshape(b, -1)
        out["x".join(map(str, shape))] = (loss * w.reshape(b, 1)).mean().item()
    return out


def _tables() -> None:
    variants = {
        "t2v12": ("osp-v1.2-transformer.json", T2V12, [["opensoraplan", "opensoraplan-v1.2", "transformer"]],
                  "OpenSoraT2V_ROPE_L_122 (OpenSoraT2V-ROPE-L/122) with train_t2v_diffusers.py's kwargs"),
        "t2v13": ("osp-v1.3-transformer.json", T2V13, [["opensoraplan", "opensoraplan-v1.3", "transformer"]],
                  "OpenSoraT2V_v1_3_2B_122 (OpenSoraT2V_v1_3-2B/122), in/out 8, sparse1d, sparse_n 4"),
        "i2v13": ("osp-v1.3-i2v-transformer.json", I2V13, [["opensoraplan_i2v", "opensoraplan-v1.3-i2v",
                  "transformer"]], "OpenSoraInpaint_v1_3_2B_122 (OpenSoraInpaint_v1_3-2B/122), in/out 8, "
                  "sparse1d, sparse_n 4, vae_scale_factor_t 4"),
        "wfvae": ("osp-wfvae-v1.3.json", WFVAE, [["opensoraplan", "opensoraplan-v1.3", "vae"],
                  ["opensoraplan_i2v", "opensoraplan-v1.3-i2v", "vae"]],
                  "WFVAEModel with the released WFVAEModel_D8_4x8x8 config (MindSpeed-MM's loading test of the "
                  "released checkpoint: base 128, energy flow 64/128, connect_res_layer_num 2, layernorm, trilinear)"),
        "causalvae": ("osp-causalvae-v1.2.json", CAUSAL, [["opensoraplan", "opensoraplan-v1.2", "vae"],
                      ["qihoo_t2x", "qihoo-t2x-1.1b", "vae"]],
                      "CausalVAEModel with the released CausalVAEModel_D4_4x8x8 config.json values"),
    }  # fmt: skip
    for what, (file, module, used_by, how) in variants.items():
        result = _child("-", f"table:{what}")
        source = (
            f"{REPO}@{result['tree']}: {module.replace('.', '/')}.py {how}, built on meta (docs/fidelity/ref_osp.py)"
        )
        table = {"source": source, "used_by": used_by, "keys": result["keys"]}
        (ROOT / "tests" / "facts" / file).write_text(json.dumps(table, indent=1) + "\n")
        print(file, len(result["keys"]), "keys")


def main() -> None:
    if sys.argv[1] == "_child":
        what = sys.argv[3]
        sys.path.insert(0, str(ROOT))
        if what.startswith("table:"):
            with torch.device("meta"):
                model, tree = _build(what.split(":")[1], tiny=False)
            keys = {k: list(v.shape) for k, v in model.state_dict().items()}
            print(json.dumps({"tree": tree, "keys": keys}))
        else:
            print(json.dumps(_forward(what)))
        return
    if sys.argv[1] == "tables":
        _tables()
    elif sys.argv[1] == "loss":
        sys.path.insert(0, str(ROOT))
        for prediction_type in LOSS_SHAPES:
            print(prediction_type, "=", json.dumps(_authors_loss(prediction_type)))
    elif sys.argv[1] == "forward":
        for what in ("t2v12", "t2v13", "i2v13", "wfvae", "causalvae"):
            print(what, "=", json.dumps(_child("-", what)))


if __name__ == "__main__":
    main()
