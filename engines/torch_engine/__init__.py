"""The PyTorch distributed engine: torchrun + DDP today; FSDP2/TP/CP are functions applied on top."""
