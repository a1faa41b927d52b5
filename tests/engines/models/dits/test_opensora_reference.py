"""STDiT, STDiT3 and the OpenSora 1.2 VAE against numbers the authors' own modules produced on the same tiny seeded
configs (hpcaitech/Open-Sora v1.0.0 / v1.2.0, run once by docs/fidelity/ref_opensora_forward.py; CI never imports
their code). Both sides load `seeded_weights` by the released key names, so a wrong layer order, norm, modulation,
mask or table shows up as a different number here.

Tolerance: the authors' float32 graph and ours differ in summation order (fused qkv splits, attention kernels, the
sin-cos tables they build in float64), which moves float32 results by a few ulps per op: about 1e-6 relative
through these shallow nets. Elements are held to 2e-5 absolute on outputs of order 1, sums to 1e-5 of the abs-sum.
"""

from __future__ import annotations

import pytest
import torch
from flowspeed.engines.models.dits import opensora_vae, stdit, stdit3

from tests.fidelity import seeded_tensor, seeded_weights

# docs/fidelity/ref_opensora_forward.py output (torch 2.14.1 CPU float32): name -> (sum, abs_sum, picks)
REFERENCE = {
    "stdit": (75.35082659451291, 4271.902287125122, {
        (0, 0, 0, 0, 0): 0.5994100570678711, (0, 3, 1, 4, 7): 0.257425457239151, (1, 2, 2, 7, 11): 1.017891526222229,
        (1, 5, 0, 3, 2): -0.5546889901161194, (1, 7, 2, 5, 9): 1.6925127506256104}),
    "stdit3": (50.61781620292459, 3974.684264753363, {
        (0, 0, 0, 0, 0): 1.7976715564727783, (0, 3, 1, 4, 7): -0.3534300923347473,
        (1, 2, 2, 7, 11): 0.003179311752319336, (1, 5, 0, 3, 2): -0.4165991246700287,
        (1, 7, 2, 5, 9): 2.6688008308410645}),
    "stdit3_xmask": (108.72250916296616, 4158.7151654833, {
        (0, 0, 0, 0, 0): 1.5506993532180786, (0, 3, 1, 4, 7): -0.31511425971984863,
        (1, 2, 2, 7, 11): 0.003179311752319336, (1, 5, 0, 3, 2): -0.4165991246700287,
        (1, 7, 2, 5, 9): 2.6688008308410645}),
    "vae_encode": (-9.812776804668829, 15.723171363351867, {
        (0, 0, 0, 0, 0): 0.03757249563932419, (0, 1, 3, 1, 0): 0.21172864735126495,
        (0, 3, 5, 1, 1): -0.21191389858722687}),
    "vae_logvar": (1.6550170907285064, 29.962089399108663, {
        (0, 0, 0, 0, 0): -0.015852028504014015, (0, 1, 3, 1, 0): 0.3006567358970642,
        (0, 3, 5, 1, 1): 0.4666857421398163}),
    "vae_decode": (1830.8253953829408, 6763.003197543323, {
        (0, 0, 0, 0, 0): -0.13942250609397888, (0, 1, 7, 5, 9): 1.0477051734924316,
        (0, 2, 19, 15, 15): 0.143001526594162, (0, 0, 17, 8, 3): -0.4094015955924988}),
}  # fmt: skip
LATENT = (2, 4, 3, 8, 12)


def _check(name: str, out: torch.Tensor) -> None:
    total, abs_total, picks = REFERENCE[name]
    out = out.double()
    assert out.sum().item() == pytest.approx(total, abs=1e-5 * abs_total), name
    assert out.abs().sum().item() == pytest.approx(abs_total, rel=1e-5), name
    for idx, value in picks.items():
        assert out[idx].item() == pytest.approx(value, abs=2e-5), (name, idx)


def _load(model: torch.nn.Module, skip: set[str]) -> torch.nn.Module:
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in skip}
    missing, unexpected = model.load_state_dict(seeded_weights(shapes), strict=False)
    assert set(missing) == skip and not unexpected
    return model.eval()


def _dit_inputs() -> dict[str, torch.Tensor]:
    mask = torch.ones(2, 8)
    mask[1, 5:] = 0
    return dict(
        hidden_states=seeded_tensor("x", LATENT, scale=1.0),
        timestep=torch.tensor([10.0, 700.0]),
        encoder_hidden_states=seeded_tensor("y", (2, 8, 16), scale=1.0),
        encoder_attention_mask=mask,
    )


def _tiny(module, cls: type, **extra) -> torch.nn.Module:  # noqa: ANN001
    return cls(**{**module.PRESETS["tiny"], "caption_channels": 16, "model_max_length": 8, **extra})


def test_stdit_matches_the_authors_module() -> None:
    model = _load(
        _tiny(stdit, stdit.STDiT, input_size=LATENT[2:], space_scale=0.5), {"pos_embed", "pos_embed_temporal"}
    )
    with torch.no_grad():
        _check("stdit", model(**_dit_inputs()))


def test_stdit3_matches_the_authors_module() -> None:
    model = _load(_tiny(stdit3, stdit3.STDiT3), {"rope.freqs"})
    extras = dict(fps=torch.tensor([24.0, 120.0]), height=torch.tensor([64.0, 64.0]), width=torch.tensor([96.0, 96.0]))
    x_mask = torch.tensor([[False, True, True], [True, True, True]])
    with torch.no_grad():
        _check("stdit3", model(**_dit_inputs(), **extras))
        _check("stdit3_xmask", model(**_dit_inputs(), **extras, x_mask=x_mask))


def test_opensora_vae_matches_the_authors_pipeline() -> None:
    vae = _load(opensora_vae.OpenSoraVAE(**opensora_vae.PRESETS["tiny"]), {"scale", "shift"})
    video = seeded_tensor("video", (1, 3, 20, 16, 16), scale=0.5)  # a 17-frame chunk and a 3-frame rest
    z = seeded_tensor("z", (1, 4, 6, 2, 2), scale=1.0)
    with torch.no_grad():
        moments = vae.encode(video, sample_spatial=False)  # the posteriors' means, as the reference read them
        _check("vae_encode", vae.normalize_latents(moments[:, :4]))
        _check("vae_logvar", moments[:, 4:])
        _check("vae_decode", vae.decode(vae.denormalize_latents(z), 20))
