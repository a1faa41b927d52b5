"""The megatron-core engine: GPT decoders from HF configs, HF <-> megatron conversion, parallel setup."""
