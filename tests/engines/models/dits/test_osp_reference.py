"""OpenSoraPlan's own-defined modules against numbers computed once with the authors' code.

The authors' OpenSoraT2V (v1.2.0), OpenSoraT2V_v1_3 / OpenSoraInpaint_v1_3 (v1.3.0), WFVAEModel (v1.3.1) and
CausalVAEModel (v1.2.0) were built with the tiny configs below, given `tests.fidelity.seeded_weights` under their own
state-dict names (seed 0) and run once on `seeded_tensor` inputs by docs/fidelity/ref_osp.py (`forward`); the sums,
sums of squares and values at fixed flat indices it printed are pasted here. Our modules get the same weights
through `from_published` and must reproduce them. CI never runs the authors' code.

.venv/bin/pytest tests/engines/models/dits/test_osp_reference.py -q
"""

from __future__ import annotations

import json

import pytest
import torch
from flowspeed.configs.schema import ComponentConfig, ModelConfig
from flowspeed.engines.models import get_family
from flowspeed.engines.models.dits import causalvae, opensoraplan, wfvae
from safetensors.torch import save_file

from tests.fidelity import released_shapes, seeded_tensor, seeded_weights

# docs/fidelity/ref_osp.py: TINY_DIT, TINY_WF, TINY_CAUSAL (ours spell the same configs with our argument names)
TINY_DIT = dict(num_attention_heads=2, attention_head_dim=12, num_layers=4, cross_attention_dim=24,
                caption_channels=16, patch_size=2, patch_size_t=1, in_channels=4, out_channels=4)  # fmt: skip
SPARSE = dict(sparse1d=True, sparse_n=4)  # the authors' forward precomputes masks for sparse_n 1 and 4 only
DITS = {
    "t2v12": lambda: opensoraplan.OpenSoraT2V(**TINY_DIT),
    "t2v13": lambda: opensoraplan.OpenSoraT2V_v1_3(**TINY_DIT, **SPARSE),
    "i2v13": lambda: opensoraplan.OpenSoraInpaint_v1_3(**TINY_DIT, **SPARSE, vae_scale_factor_t=4),
}
VAES = {
    "wfvae": lambda: wfvae.WFVAEModel(**wfvae.PRESETS["tiny"], norm_type="layernorm", t_interpolation="trilinear"),
    "causalvae": lambda: causalvae.CausalVAEModel(hidden_size=32, hidden_size_mult=(1, 1, 2, 2), num_res_blocks=1),
}
CLIP = (1, 3, 9, 32, 32)

# Printed by `ref_osp.py forward` (PKU-YuanGroup/Open-Sora-Plan v1.2.0 adb2a20a / v1.3.0 11246218 / v1.3.1 c41050ae).
REFERENCE = {
    "t2v12": {
        "2x3x8x8": (-85.75583296082914, 1743.4653608999088, {0: -0.47545239329338074, 7: -0.4573096036911011,
                    101: 0.14610306918621063, 555: 0.5642680525779724, 1234: -0.12138394266366959}),
        "2x3x6x8": (-42.48280186485499, 1274.7951062554357, {0: 0.182210773229599, 7: -0.028009969741106033,
                    101: 0.2804446816444397, 555: 0.0687635987997055}),
    },
    "t2v13": {
        "2x3x8x8": (-83.19822923047468, 1737.105742698261, {0: -0.4168125092983246, 7: -0.43859773874282837,
                    101: 0.19582782685756683, 555: 0.4503951072692871, 1234: -0.14720898866653442}),
        "2x3x6x8": (-32.853899873793125, 1324.397843252882, {0: 0.13519448041915894, 7: 0.3935782313346863,
                    101: -0.25542759895324707, 555: -0.07835779339075089}),
    },
    "i2v13": {
        "2x3x8x8": (-87.67512136045843, 1994.5041940083584, {0: -0.36045706272125244, 7: 0.22258444130420685,
                    101: -2.0408945083618164, 555: 1.2962443828582764, 1234: -1.2278445959091187}),
        "2x3x6x8": (-141.6372587410733, 1434.5569512341667, {0: -0.580256462097168, 7: 0.4869006872177124,
                    101: -0.7578327059745789, 555: 0.3371267020702362}),
    },
    "wfvae": {
        "encode": (-51.902220603078604, 125.62120581575249, {0: 0.10446824878454208, 7: -0.552491307258606,
                   101: 0.39117515087127686}),
        "decode": (680.2660318075214, 13620.767244278995, {0: -0.0008950680494308472, 7: 0.6261984705924988,
                   101: -1.4942134618759155, 555: 0.4595690965652466, 1234: 0.7554076910018921}),
    },
    "causalvae": {
        "encode": (30.180693368427455, 107.31378166991112, {0: -0.349697470664978, 7: 0.11251378059387207,
                   101: -0.38966843485832214}),
        "decode": (-4320.4075031764805, 7648.998076329106, {0: 0.24655559659004211, 7: 0.3141877055168152,
                   101: 0.15086205303668976, 555: -0.8820450901985168, 1234: 0.012346416711807251}),
    },
}  # fmt: skip


def _seeded(model: torch.nn.Module, module) -> torch.nn.Module:  # noqa: ANN001
    """The reference weights, made under the authors' (= published) names, loaded through `from_published`."""
    weights = seeded_weights(released_shapes(model), 0)
    model.load_state_dict(module.from_published(weights), strict=True)
    return model.eval()


def _check(out: torch.Tensor, expected: tuple, scale: float) -> None:
    """float32 through a few dozen layers: element errors of ~1e-6 x the activations' size; the sums add ~1e3
    such errors, so they get a looser absolute bound than single values."""
    total, sumsq, values = expected
    flat = out.double().flatten()
    for i, v in values.items():
        assert flat[i].item() == pytest.approx(v, abs=2e-5 * scale), i
    assert flat.sum().item() == pytest.approx(total, rel=1e-5, abs=2e-3 * scale)
    assert (flat**2).sum().item() == pytest.approx(sumsq, rel=1e-5)


@pytest.mark.parametrize("what", list(DITS))
def test_dit_forward_matches_the_authors(what: str) -> None:
    torch.manual_seed(0)
    model = _seeded(DITS[what](), opensoraplan)
    channels = 12 if what == "i2v13" else 4
    for shape, expected in REFERENCE[what].items():
        b, t, h, w = map(int, shape.split("x"))
        x = seeded_tensor("osp.x", (b, channels, t, h, w), 1, scale=1.0)
        text = seeded_tensor("osp.text", (b, 5, 16), 1, scale=1.0)
        mask = torch.ones(b, 5)
        mask[0, 3:] = 0
        with torch.no_grad():
            out = model(x, torch.tensor([37.0, 811.0]), encoder_hidden_states=text, encoder_attention_mask=mask)
        _check(out, expected, scale=out.abs().max().item())


@pytest.mark.parametrize("what", list(VAES))
def test_vae_encode_decode_match_the_authors(what: str) -> None:
    torch.manual_seed(0)
    model = _seeded(VAES[what](), wfvae if what == "wfvae" else causalvae)
    x = seeded_tensor("osp.clip", CLIP, 1, scale=0.5).clamp(-1, 1)
    with torch.no_grad():
        moments = model.encode(x)  # mean ++ logvar, the authors' posterior `.parameters`
        z = seeded_tensor("osp.z", (1, moments.shape[1] // 2, *moments.shape[2:]), 1, scale=1.0)
        decoded = model.decode(z)
    _check(moments, REFERENCE[what]["encode"], scale=moments.abs().max().item())
    _check(decoded, REFERENCE[what]["decode"], scale=decoded.abs().max().item())


# What the authors' `save_pretrained` writes into config.json besides our arguments (their __init__ arguments, read
# off the config.json their tiny modules saved in the ref_osp.py trees): a released folder carries these keys.
_V13_EXTRA = {"double_self_attention": False, "dropout": 0.0, "only_cross_attention": False, "sample_size_h": None,
              "sample_size_t": None, "sample_size_w": None, "upcast_attention": False}  # fmt: skip
THEIR_EXTRA_CONFIG = {
    "t2v12": {"attention_mode": "xformers", "attention_type": "default", "double_self_attention": False,
              "downsampler": None, "dropout": 0.0, "norm_num_groups": 32, "num_embeds_ada_norm": 1000,
              "num_vector_embeds": None, "only_cross_attention": False, "sample_size": [60, 80], "sample_size_t": 8,
              "upcast_attention": False, "use_additional_conditions": None, "use_linear_projection": False,
              "use_stable_fp32": False},
    "t2v13": _V13_EXTRA,
    "i2v13": _V13_EXTRA,
}  # fmt: skip
FAMILY_PRESET = {"t2v12": ("opensoraplan", "tiny-v1.2"), "t2v13": ("opensoraplan", "tiny"),
                 "i2v13": ("opensoraplan_i2v", "tiny")}  # fmt: skip


@pytest.mark.parametrize("what", list(DITS))
def test_a_folder_saved_by_the_authors_loads_through_the_family(what: str, tmp_path) -> None:
    """A diffusers folder as the authors' ModelMixin writes it (config.json naming their class, which is ours, with
    their extra arguments; weights under their names) loads through `load_transformer` and computes their output."""
    ours = DITS[what]()
    config = {k: v for k, v in ours.config.items() if not k.startswith("_")}
    config = {"_class_name": type(ours).__name__, **config, **THEIR_EXTRA_CONFIG[what]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(seeded_weights(released_shapes(ours), 0), str(tmp_path / "diffusion_pytorch_model.safetensors"))
    family, preset = FAMILY_PRESET[what]
    cfg = ModelConfig(family=family, transformer=ComponentConfig(preset=preset, pretrained=str(tmp_path)))
    model = get_family(family).load_transformer(cfg, 16, 4).eval()
    b, t, h, w = 2, 3, 8, 8
    x = seeded_tensor("osp.x", (b, 12 if what == "i2v13" else 4, t, h, w), 1, scale=1.0)
    text = seeded_tensor("osp.text", (b, 5, 16), 1, scale=1.0)
    mask = torch.ones(b, 5)
    mask[0, 3:] = 0
    with torch.no_grad():
        out = model(x, torch.tensor([37.0, 811.0]), encoder_hidden_states=text, encoder_attention_mask=mask)
    _check(out, REFERENCE[what]["2x3x8x8"], scale=out.abs().max().item())
