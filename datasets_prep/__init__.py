"""Data engineering: manifest ingest, probing, decoding and the latent cache. No Prefect here."""
