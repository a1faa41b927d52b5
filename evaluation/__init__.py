"""Evaluation: validation loss on held-out latents, sample generation, CLIP score. No Prefect here."""
