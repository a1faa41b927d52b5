"""Utilities every stage shares, with no model or Prefect import: atomic writes and digests (`io`),
progress reporting (`progress`), devices and process groups (`device`), torchrun launching
(`torchrun`), child-process lifetime (`lifetime`) and liveness of recorded processes (`processes`)."""
