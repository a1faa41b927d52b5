"""Video DiTs and VAEs that no library defines: OpenSora 1.0 (STDiT), OpenSora 1.2 (STDiT3 and its VAE),
OpenSoraPlan 1.2/1.3 (sparse-attention DiT, CausalVAE, WF-VAE) and Qihoo-T2X (PT-DiT).

Each model file is pure `nn.Module` code (no torch.distributed, no device moves, no trackers), a diffusers
`ModelMixin` + `ConfigMixin` so our own exports are ordinary `save_pretrained` folders, and attention goes through
diffusers' `dispatch_attention_fn` so the torch engine's context parallelism hooks it from outside.

The contract every denoiser here keeps, so the families (engines/models/opensora*.py ...) and the engine treat them
alike:

    forward(hidden_states (B, C_in, T, H, W), timestep (B,) float in [0, 1000), encoder_hidden_states (B, L, D),
            encoder_attention_mask (B, L) 1 = real token | None, **documented extras) -> (B, C_out, T, H, W)

Each model module also exposes
- `PRESETS: dict[str, dict]`: config kwargs by name, "tiny" (seconds per step on a CPU) and the published variants;
- `PUBLISHED: dict[str, tuple[int, str]]`: variant -> (parameter count, where that figure is stated);
- `from_published(state_dict) -> state_dict` and `to_published(state_dict) -> state_dict`: the authors' released
  key layout <-> ours, documented at the top of the module; `checkpoint.load_published` applies them.
"""
