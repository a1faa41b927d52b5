"""Typed configuration for every stage, composed into one pipeline config.

Each stage reads only its own section, so a stage can be run (and cached) on its own; the
pipeline config only adds the shared workdir. Unknown keys are errors everywhere
(`extra="forbid"`): a misspelt `max_step` silently training forever is the failure we refuse.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ComponentConfig(Section):
    """One model component: a named tiny preset (random init) or `pretrained:` weights."""

    preset: str | None = Field("tiny", description="named random-init config of the family")
    pretrained: str | None = Field(None, description="local directory or hub id for from_pretrained")
    subfolder: str | None = None
    trust_remote_code: bool = Field(
        False, description="run modeling code shipped inside a LOCAL checkpoint directory (InternVL2 originals)"
    )

    @model_validator(mode="after")
    def _one_source(self) -> ComponentConfig:
        if self.pretrained is None and self.preset is None:
            raise ValueError("set either `preset` (random init) or `pretrained` (weights to load)")
        return self

    def identity(self) -> str:
        """What makes encoder outputs comparable: the weights' source, not the object."""
        if self.pretrained:
            return f"pretrained:{self.pretrained}" + (f"/{self.subfolder}" if self.subfolder else "")
        return f"preset:{self.preset}"


class ExpertsConfig(Section):
    """Wan2.2 A14B's two denoisers split by timestep (Wan-Video/Wan2.2 wan/configs/wan_t2v_A14B.py): the high-noise
    expert takes timesteps t >= boundary * 1000 (diffusers' `WanPipeline.transformer`), the low-noise one those below
    (`transformer_2`). `model.transformer` is the expert this run trains, `train` says which one it is, and it draws
    only its own timesteps (as DiffSynth-Studio trains Wan2.2 A14B); `other` is the expert it leaves as it is, which
    the export carries beside it, so every export is a whole two-expert pipeline. `train: both` trains the pair in one
    run: `model.transformer` is then the high-noise expert and `other` the low-noise one, each training call runs one
    of them on its own timesteps (engines/models/wan.py `WanExpertPair`), and the export holds both as trained."""

    train: Literal["high_noise", "low_noise", "both"] = Field(
        description="which expert model.transformer is and trains; both: model.transformer is the high-noise expert, "
        "experts.other the low-noise one, and both train (FSDP2/HSDP; tensor/context parallel take one expert)"
    )
    other: ComponentConfig = Field(
        description="the other expert's weights (e.g. a release's transformer/ or transformer_2/) or preset; with "
        "train: both the low-noise expert (a release's transformer_2/)"
    )
    boundary: float = Field(
        gt=0, lt=1, description="the switch as a fraction of the 1000 training timesteps; the authors' T2V-A14B: 0.875"
    )


#: the families whose denoiser is a pair of timestep experts (engines/models/wan.py: Wan2.2 T2V-A14B;
#: engines/models/wan_i2v.py: Wan2.2 I2V-A14B)
EXPERT_FAMILIES = ("wan", "wan_i2v")
#: the families whose denoiser also takes an image encoder's features of the first frame (engines/models/wan_i2v.py:
#: Wan2.1 I2V's CLIP ViT-H/14); prep caches those features beside the latents
IMAGE_ENCODER_FAMILIES = ("wan_i2v",)


class ModelConfig(Section):
    family: str = "cogvideox"
    vae: ComponentConfig = ComponentConfig()
    text_encoder: ComponentConfig = ComponentConfig()
    transformer: ComponentConfig = ComponentConfig()
    max_text_length: int = Field(226, ge=1, le=4096, description="text tokens; CogVideoX uses 226")
    seed: int = Field(0, description="seed of random-init presets, so every stage builds the same weights")
    freeze_vision_tower: bool | None = Field(
        None,
        description="vision-language families: keep the vision tower frozen in a full finetune (projector/merger "
        "and language model train). None = the family authors' default, which is True for qwen2_vl, llava and "
        "internvl; false trains the tower too. An error for families without a vision tower",
    )
    experts: ExpertsConfig | None = Field(
        None, description="Wan2.2 A14B: which timestep expert model.transformer is, the other one, the boundary"
    )
    image_encoder: ComponentConfig | None = Field(
        None,
        description="image-conditioned families (wan_i2v): the image encoder whose features of the first frame "
        "condition the denoiser (Wan2.1 I2V: CLIP ViT-H/14, a release's image_encoder/); unset there: preset tiny; "
        "null there: none, for a transformer without an image embedding (Wan2.2 I2V-A14B, conditioned on the first "
        "frame's latents alone). An error for the other families",
    )

    @model_validator(mode="after")
    def _experts_apply(self) -> ModelConfig:
        if self.experts is not None and self.family not in EXPERT_FAMILIES:
            raise ValueError(
                f"model.experts (two denoisers split by timestep, Wan2.2 A14B) applies to the families "
                f"{', '.join(EXPERT_FAMILIES)}; {self.family!r} has one denoiser: remove the block"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _image_encoder_default(cls, data: Any) -> Any:
        """An image-conditioned family's unset image encoder is `preset: tiny`, as its other components are; an
        explicit `image_encoder: null` stays None: no image encoder (Wan2.2 I2V-A14B)."""
        if isinstance(data, dict) and data.get("family") in IMAGE_ENCODER_FAMILIES:
            return data if "image_encoder" in data else {**data, "image_encoder": {}}
        return data

    @model_validator(mode="after")
    def _image_encoder_applies(self) -> ModelConfig:
        if self.image_encoder is not None and self.family not in IMAGE_ENCODER_FAMILIES:
            raise ValueError(
                f"model.image_encoder (image features conditioning the denoiser) applies to the families "
                f"{', '.join(IMAGE_ENCODER_FAMILIES)}; {self.family!r} takes no image encoder: remove the key"
            )
        return self


# Open-Sora's resolution names -> pixel area of their 16:9 base size; "<N>px" means N*N.
RESOLUTION_AREA = {
    "144p": 144 * 256,
    "240p": 240 * 426,
    "360p": 360 * 640,
    "480p": 480 * 854,
    "720p": 720 * 1280,
    "1080p": 1080 * 1920,
}


def resolution_area(name: str) -> int:
    if name in RESOLUTION_AREA:
        return RESOLUTION_AREA[name]
    if name.endswith("px") and name[:-2].isdigit():
        return int(name[:-2]) ** 2
    raise ValueError(f"unknown resolution {name!r}; use one of {', '.join(RESOLUTION_AREA)} or '<N>px'")


class BucketsConfig(Section):
    """How clips are shaped and grouped; see datasets_prep/buckets.py for the three modes."""

    mode: Literal["fixed", "opensora", "dynamic"] = "fixed"
    # Open-Sora style: {"240p": {17: [1.0, 4], 9: [0.5, 8]}} = resolution -> frames -> [keep_prob, batch_size]
    bucket_config: dict[str, dict[int, tuple[float, int]]] = Field(default_factory=dict)
    # Open-Sora-Plan style dynamic resolution
    max_hxw: int = Field(64 * 64, ge=64, description="most pixels per frame")
    max_frames: int = Field(17, ge=1)
    aspect_threshold: float = Field(2.0, ge=1.0, description="refuse clips more elongated than this")
    min_bucket_count: int = Field(1, ge=1, description="drop buckets with fewer clips (minority shapes)")
    cp_degree: int = Field(1, ge=1, description="latent frames must divide by the context-parallel degree")

    @model_validator(mode="after")
    def _check(self) -> BucketsConfig:
        if self.mode == "opensora" and not self.bucket_config:
            raise ValueError("buckets.mode=opensora needs buckets.bucket_config")
        for res in self.bucket_config:
            resolution_area(res)
        return self


class ClipConfig(Section):
    model: str = Field("flowspeed-tiny-clip", description="open_clip model name")
    pretrained: str | None = Field(None, description="open_clip tag or local checkpoint file")


class SceneSplitConfig(Section):
    enabled: bool = False
    threshold: float = Field(27.0, gt=0, description="PySceneDetect ContentDetector threshold")
    min_scene_frames: int = Field(8, ge=1)
    reencode: bool = Field(False, description="also write each scene as its own H.264 mp4 under `<prep>/clips`")


class AestheticConfig(Section):
    enabled: bool = False
    clip: ClipConfig = Field(default_factory=lambda: ClipConfig())
    head: str | None = Field(None, description="linear/MLP head weights (.safetensors/.pt); None: seeded random init")
    min_score: float | None = None


class MotionConfig(Section):
    enabled: bool = False
    method: Literal["farneback", "diff"] = "farneback"
    min_score: float | None = Field(None, description="drop near-static clips")
    max_score: float | None = Field(None, description="drop clips with chaotic motion or cuts")


class DedupConfig(Section):
    enabled: bool = False
    threshold: float = Field(0.98, gt=0, le=1, description="CLIP cosine above which a clip is a near duplicate")


class CurateConfig(Section):
    """Optional curation between probing and encoding; every drop is a recorded rejection."""

    scene_split: SceneSplitConfig = SceneSplitConfig()
    min_duration: float = Field(0.0, ge=0, description="seconds")
    max_aspect: float | None = Field(None, ge=1, description="drop clips more elongated than this")
    sample_frames: int = Field(4, ge=2, description="frames per clip the scorers look at")
    aesthetic: AestheticConfig = AestheticConfig()
    motion: MotionConfig = MotionConfig()
    dedup: DedupConfig = DedupConfig()

    def scoring(self) -> bool:
        return self.aesthetic.enabled or self.motion.enabled or self.dedup.enabled


class CaptionConfig(Section):
    """Captions written by a VLM (datasets_prep/caption.py) for records that have none."""

    enabled: bool = False
    model: str = Field("qwen2_vl", description="captioner registry name: qwen2_vl, llava, internvl")
    preset: str | None = Field("tiny", description="random-init config (tests: nonsense text, real pipeline)")
    pretrained: str | None = Field(None, description="local directory or hub id (AutoModelForImageTextToText)")
    prompt: str = "Describe this video in one sentence: the subjects, how they move, and the background."
    frames: int = Field(4, ge=1, description="frames per clip shown to the model")
    batch_size: int = Field(4, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    recaption: bool = Field(False, description="replace captions the manifest already has")

    def identity(self) -> str:
        return f"{self.model}:" + (f"pretrained:{self.pretrained}" if self.pretrained else f"preset:{self.preset}")


class DataConfig(Section):
    manifest: Path = Path("data.jsonl")
    incoming: Path | None = Field(
        None, description="a folder of new media (+ .txt captions) every run also ingests; cached ones are free"
    )
    manifest_format: str = Field("auto", description="auto, or one of flowspeed.datasets_prep.manifest.known_formats()")
    roots: list[Path] = Field(default_factory=list, description="extra folders media paths may resolve into")
    output_dir: Path | None = Field(None, description="prep output; default `<workdir>/prep/<family>-<digest>`")
    cache_dir: Path | None = Field(
        None, description="latent cache; default `<workdir>/prep/cache`. Runs and experiments may share one folder"
    )
    # PyAV is a core dependency; decord is the `video-decode` extra (no wheels for macOS or aarch64)
    decoder: Literal["decord", "pyav"] = Field("pyav", description="decord needs flowspeed[video-decode]")
    num_frames: int = Field(9, ge=1)
    target_fps: float | None = Field(8.0, gt=0, description="sample at this fps; None uses `stride`")
    stride: int = Field(1, ge=1, description="frame stride when target_fps is None")
    height: int = Field(64, ge=8)
    width: int = Field(64, ge=8)
    min_side: int = Field(32, ge=1, description="reject media whose shorter side is below this")
    max_decode_pixels: int = Field(
        2**27,
        ge=1,
        description="reject a sample whose decode needs more source pixels (width x height x decoded frames; an "
        "image decodes once) before decoding it: bounds prep memory at ~12 bytes a pixel. Default: 16 frames of 4K",
    )
    batch_size: int = Field(4, ge=1, description="clips per VAE/text-encoder call")
    num_workers: int = Field(2, ge=1, description="decode threads per rank")
    nproc_per_node: int = Field(1, ge=1, description="prep ranks (torchrun); each takes a slice of the manifest")
    slices: int = Field(1, ge=1, description="Prefect tasks the prep flow maps the manifest over")
    task_runner: Literal["thread", "process", "dask", "ray"] = Field(
        "thread", description="where the slice tasks run: threads, processes, a Dask or a Ray cluster"
    )
    cluster_address: str | None = Field(None, description="dask scheduler / ray address; None starts a local one")
    shard_size: int = Field(8, ge=1, description="samples per safetensors shard")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"
    max_samples: int | None = Field(None, ge=1)
    buckets: BucketsConfig = BucketsConfig()
    curate: CurateConfig = CurateConfig()
    caption: CaptionConfig = CaptionConfig()


class ParallelConfig(Section):
    """How ranks split the work. The degrees multiply to the world size (nnodes x nproc_per_node).

    dp_shard > 1 is FSDP2; dp_replicate > 1 alone is DDP; both is HSDP. -1 on dp_shard takes the rest.
    """

    dp_replicate: int = Field(1, ge=1, description="replicas of the model (DDP, or HSDP's outer dim)")
    dp_shard: int = Field(-1, ge=-1, description="FSDP2 shard group size; -1: whatever the other degrees leave")
    tp: int = Field(1, ge=1, description="tensor parallel degree (DTensor plans per model class)")
    sequence_parallel: bool = Field(False, description="with tp > 1: shard norm/dropout activations too")
    cp: int = Field(1, ge=1, description="context parallel degree: the token sequence split across ranks")
    cp_mode: Literal["ulysses", "ring", "dsp"] = Field(
        "ulysses",
        description="ulysses: all-to-all over attention heads (heads % cp == 0); ring: ring attention (any head "
        "count); dsp: Dynamic Sequence Parallel, STDiT3 only: split frames for spatial blocks and tokens per frame "
        "for temporal ones, 2 all-to-alls per layer (latent frames and tokens per frame % cp == 0)",
    )
    pp: int = Field(1, ge=1, description="pipeline stages (transformers language backbones)")
    pp_schedule: Literal["1f1b", "interleaved_1f1b"] = "1f1b"
    pp_virtual_stages: int = Field(1, ge=1, description="stages per rank; >= 2 with interleaved_1f1b")
    pp_microbatches: int | None = Field(None, ge=1, description="default: pp x virtual stages")


class FsdpConfig(Section):
    """FSDP2's MixedPrecisionPolicy: compute in param_dtype, reduce gradients in reduce_dtype."""

    param_dtype: Literal["float32", "bfloat16"] = "float32"
    reduce_dtype: Literal["float32", "bfloat16"] = "float32"
    reshard_after_forward: bool = Field(True, description="free gathered params after forward (ZeRO-3 style)")


class ProfileConfig(Section):
    """A torch.profiler (torch_npu.profiler on NPU) trace of a step window, logged to MLflow."""

    enabled: bool = False
    start_step: int = Field(2, ge=0, description="steps to skip before warm-up")
    warmup_steps: int = Field(1, ge=0)
    active_steps: int = Field(2, ge=1)
    record_shapes: bool = False
    profile_memory: bool = False


class ElasticConfig(Section):
    """torchrun's elastic agent around the training ranks: a c10d rendezvous and whole-group restarts.

    When a rank dies (SIGKILL, the OOM killer, a node gone), the agent stops the others and starts the group
    again, up to `max_restarts` times; every rank of the new attempt resumes from the newest published
    checkpoint (sampler position included), so the run continues on the step axis an uninterrupted run has.
    The parallel layout and the global batch are made for `train.nnodes`; min/max let the rendezvous form
    with fewer or more nodes (configs/validate.py says what that changes)."""

    max_restarts: int = Field(3, ge=0, description="group restarts after a failed rank before the job fails")
    min_nodes: int | None = Field(None, ge=1, description="fewest nodes the rendezvous starts with; default nnodes")
    max_nodes: int | None = Field(None, ge=1, description="most nodes the rendezvous admits; default nnodes")


class EmaConfig(Section):
    enabled: bool = False
    decay: float = Field(0.999, gt=0, lt=1)


class PackingConfig(Section):
    """Sequence packing for the token-loss families (VLMs, speech): micro-batches formed by a token budget
    instead of a sample count, their samples laid end to end in one row with attention kept inside each
    sample, and the loss a per-token mean over the whole global batch, so a packed step computes what
    the padded step computes, without the pad tokens."""

    max_tokens: int | None = Field(
        None,
        ge=16,
        description="token budget of one micro-batch (text + vision placeholder tokens); set it to pack. "
        "train.batch_size is then unused: a micro-batch holds as many samples as fit",
    )
    max_vision_tokens: int | None = Field(
        None,
        ge=1,
        description="budget on the vision encoder's input patches of one micro-batch (images and videos), which "
        "costs apart from the decoder's tokens; None: no separate limit",
    )


class LoraConfig(Section):
    """LoRA adapters (peft) on the denoiser's attention projections; the base weights stay frozen."""

    enabled: bool = False
    rank: int = Field(8, ge=1)
    alpha: float = Field(8.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, description="None: the family's default targets")
    init_from: str | None = Field(
        None,
        description="an adapter trained elsewhere to start from: a peft save_pretrained folder, a diffusers "
        "pytorch_lora_weights.safetensors (or its folder), or a flowspeed export's final/lora; rank, alpha and "
        "target_modules left unset are taken from it (configs/adapters.py), set ones must agree with it",
    )

    @model_validator(mode="before")
    @classmethod
    def _settings_of_init_from(cls, data: Any) -> Any:
        """The adapter's own rank/alpha/targets fill what the config leaves out, so its weights fit the model and
        the resolved config says what was trained; an unreadable adapter is left to configs/validate.py's message."""
        if not isinstance(data, dict) or not data.get("init_from"):
            return data
        from flowspeed.configs.adapters import adapter_settings

        try:
            found = adapter_settings(data["init_from"])
        except (OSError, ValueError):
            return data
        return {"rank": found.rank, "alpha": found.alpha, "target_modules": found.target_modules, **data}


class RewardConfig(Section):
    """One term of a reward (evaluation/rewards.py): GRPO's and flow GRPO's training signal and `eval/reward`.
    Terms are summed with their weights."""

    name: str = Field(
        description="exact_answer | format | brightness | clip_score, or `package.module:function` (a callable "
        "taking the same arguments as the built-in of its kind, see evaluation/rewards.py)"
    )
    weight: float = Field(1.0, description="its share of the summed reward")
    pattern: str | None = Field(None, description="format: the regex a whole answer must match")
    clip: ClipConfig | None = Field(
        None, description="clip_score: the open_clip model and its local weight file (default: eval.clip)"
    )


class MethodConfig(Section):
    """What the train stage optimises: supervised finetuning, or a preference / reward post-training method
    (engines/methods/). Each method's knobs are ignored by the others; unset ones take the authors' defaults."""

    name: Literal["sft", "dpo", "diffusion_dpo", "grpo", "flow_grpo"] = Field(
        "sft",
        description="sft: the family's own objective; dpo / grpo: vision-language families; diffusion_dpo: "
        "latent (diffusion and flow) families; flow_grpo: flow-matching image families",
    )
    beta: float | None = Field(
        None, gt=0, description="DPO temperature (dpo: 0.1, TRL's default) or Diffusion-DPO's beta (5000, the authors')"
    )
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="dpo: conservative DPO's label noise")
    sft_weight: float = Field(0.0, ge=0, description="dpo: weight of an added NLL term on the chosen answers")
    reference: Literal["model", "precomputed"] = Field(
        "model",
        description="model: a frozen copy of the starting model scores each batch (with LoRA: the base, adapters "
        "off); precomputed (dpo): the reference log-probabilities are computed once before the first step",
    )
    rewards: list[RewardConfig] = Field(default_factory=list, description="grpo / flow_grpo: the reward terms")
    group_size: int = Field(4, ge=2, description="grpo / flow_grpo: samples drawn per prompt")
    kl_coef: float = Field(0.04, ge=0, description="grpo / flow_grpo: weight of the KL penalty to the reference")
    clip_range: float = Field(0.2, gt=0, description="grpo / flow_grpo: PPO ratio clipping")
    max_new_tokens: int = Field(32, ge=1, description="grpo: tokens generated per answer")
    temperature: float = Field(1.0, gt=0, description="grpo: sampling temperature of the rollouts")
    sampling_steps: int = Field(10, ge=2, description="flow_grpo: SDE sampling steps per rollout")
    noise_level: float = Field(0.7, gt=0, description="flow_grpo: the SDE's noise scale (Flow-GRPO's `a`)")


class GpuSlotsConfig(Section):
    """A Prefect global concurrency limit that training runs take slots of, so two scheduled finetunes
    on one node (or GPU pool) queue instead of fighting over the same devices."""

    enabled: bool = True
    name: str | None = Field(None, description="the limit's name; default `gpu-<hostname>`, one per node")
    size: int | None = Field(
        None,
        ge=1,
        description="slots in the limit; default when flowspeed creates it: the node's accelerator count (1 on "
        "CPU). Unset, an existing limit keeps the size an operator gave it (UI or `prefect gcl update`)",
    )
    occupy: int | None = Field(None, ge=1, description="slots one training run holds; default train.nproc_per_node")
    timeout_s: float | None = Field(
        None,
        gt=0,
        description="give up waiting for slots after this long; default: wait while the holder lives (a run may "
        "queue behind a days-long finetune), reporting the holder every poll_s; a dead holder's slots are freed",
    )
    poll_s: float = Field(
        30.0, gt=0, description="how often a waiting run checks for dead holders and prints who it waits for"
    )
    lease_s: float = Field(
        300.0,
        ge=60,
        le=86400,
        description="Prefect lease on the slots, renewed while training lives; a Prefect server frees a dead "
        "holder's slots once it expires (the ephemeral API has no expiry: flowspeed checks the holder's pid)",
    )


class MegatronConfig(Section):
    """megatron-core engine settings beyond the layout (train.parallel: tp, pp, sequence_parallel, cp,
    pp_virtual_stages, pp_microbatches; train.activation_checkpointing: recomputation)."""

    distributed_optimizer: bool = Field(
        False, description="shard the optimizer state (and fp32 main weights) across the data-parallel ranks"
    )


class SlurmConfig(Section):
    """`train.launcher: slurm`: the training stage as one `sbatch` allocation of `train.nnodes` nodes, one `srun`
    task per node running torchrun with `train.nproc_per_node` ranks (engines/common/slurm.py renders the script).
    Unset options are left to the cluster's defaults, so a site's partition policy is never second-guessed."""

    partition: str | None = Field(None, description="sbatch --partition")
    account: str | None = Field(None, description="sbatch --account")
    qos: str | None = Field(None, description="sbatch --qos")
    time: str | None = Field(None, description="sbatch --time limit (MM, HH:MM:SS, D-HH:MM:SS, ...)")
    gpus_per_node: int | None = Field(
        None, ge=0, description="sbatch --gpus-per-node; default train.nproc_per_node (one GPU per rank); 0: left out"
    )
    cpus_per_task: int | None = Field(
        None, ge=1, description="sbatch --cpus-per-task (the one task per node runs every rank of that node)"
    )
    mem: str | None = Field(None, description="sbatch --mem per node (e.g. 480G, 0 for all of it)")
    job_name: str | None = Field(None, description="sbatch --job-name; default `flowspeed-train-<family>`")
    port: int = Field(29500, ge=1024, le=65535, description="c10d rendezvous port on the allocation's first node")
    sbatch_args: list[str] = Field(
        default_factory=list,
        description="further `#SBATCH` options as given (e.g. --gres=npu:8, --reservation=x, --exclusive)",
    )
    setup: list[str] = Field(
        default_factory=list, description="shell lines run before srun on the first node (module load, exports)"
    )
    python: str | None = Field(
        None, description="the compute nodes' Python with flowspeed installed; default the submitting interpreter"
    )
    poll_s: float = Field(30.0, gt=0, description="seconds between squeue polls while the flow waits on the job")

    @field_validator("time", mode="before")
    @classmethod
    def _time_as_written(cls, value: Any) -> Any:
        """YAML reads an unquoted 12:00:00 as 43200 and 90 as an int: neither can be told back into what was meant
        (Slurm reads a bare number as minutes), so only the quoted form is taken."""
        if isinstance(value, int | float) and not isinstance(value, bool):
            raise ValueError(f'write the time limit quoted, e.g. time: "12:00:00" (YAML read it as the number {value})')
        return value


class TrainConfig(Section):
    engine: Literal["torch", "megatron"] = Field(
        "torch",
        description="torch: FSDP2/DTensor TP/CP/pipelining (every family); megatron: megatron-core TP/SP/PP/VPP and "
        "distributed optimizer (qwen2_vl, qwen2_5_vl, llava)",
    )
    megatron: MegatronConfig = MegatronConfig()
    output_dir: Path | None = Field(None, description="checkpoints; default `<workdir>/train/<family>-<digest>`")
    max_steps: int = Field(30, ge=1)
    batch_size: int = Field(2, ge=1, description="micro-batch per rank")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(3, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    mixed_precision: Literal["no", "bf16"] = "no"
    seed: int = 42
    checkpoint_every: int = Field(10, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    resume: str = Field("auto", description="auto | never | path to a checkpoint directory")
    stop_after_steps: int | None = Field(
        None, ge=1, description="checkpoint and stop after this many steps of this invocation (time-sliced jobs)"
    )
    nproc_per_node: int = Field(1, ge=1)
    device: str = "auto"
    log_every: int = Field(1, ge=1)
    metrics_flush_every: int = Field(20, ge=1, description="steps per MLflow log_batch")
    val_fraction: float = Field(0.125, ge=0, lt=1, description="cached samples held out for eval")
    lora: LoraConfig = LoraConfig()
    packing: PackingConfig = PackingConfig()
    init_from: Literal["config", "champion"] = Field(
        "config",
        description="champion: start from the registry's champion version (tracking.registry), the configured "
        "model when there is none yet; config: the model section as written",
    )
    method: MethodConfig = Field(
        default_factory=MethodConfig, description="sft, or preference / reward post-training (dpo, grpo, ...)"
    )
    parallel: ParallelConfig = ParallelConfig()
    gpu_slots: GpuSlotsConfig = GpuSlotsConfig()
    fsdp: FsdpConfig = FsdpConfig()
    activation_checkpointing: Literal["none", "full", "selective"] = Field(
        "none", description="recompute each block's activations in backward: all of them, or all but matmuls/attention"
    )
    compile: bool = Field(False, description="torch.compile each transformer block (regional compile)")
    compile_cache_dir: Path | None = Field(
        None, description="persistent inductor cache; default `<workdir>/.cache/inductor`"
    )
    async_checkpoint: bool = Field(
        False, description="write checkpoint shards in the background (DCP async_save) while training continues"
    )
    ema: EmaConfig = EmaConfig()
    profile: ProfileConfig = ProfileConfig()
    peak_tflops: float | None = Field(
        None, gt=0, description="device peak dense TFLOPS for MFU; default: looked up from the device name"
    )
    collective_timeout_s: int = Field(600, ge=10, description="a rank stuck this long in a collective fails the job")
    nnodes: int = Field(1, ge=1)
    node_rank: int = Field(0, ge=0)
    rdzv_endpoint: str | None = Field(None, description="host:port of the c10d rendezvous (multi-node)")
    rdzv_id: str = "flowspeed"
    elastic: ElasticConfig | None = Field(
        None,
        description="torchrun elastic: c10d rendezvous over min_nodes:max_nodes and max_restarts group restarts, "
        "each resuming from the newest checkpoint; unset: a fixed group, a failed rank fails the job",
    )
    launcher: Literal["local", "slurm"] = Field(
        "local",
        description="local: train here (torchrun for several ranks); slurm: submit the training as one sbatch "
        "allocation (train.slurm) and wait on it",
    )
    slurm: SlurmConfig = SlurmConfig()


class BenchmarkConfig(Section):
    """An understanding benchmark in VLMEvalKit's TSV layout (evaluation/benchmarks.py)."""

    name: str = Field(description="mmmu | ai2d | chartqa | docvqa | infovqa")
    tsv: Path = Field(description="the benchmark's TSV file (base64 images, question, options, answer, category)")
    limit: int | None = Field(None, ge=1, description="score only the first N items (a quick check)")
    template: str | None = Field(None, description="prompt template; default: the family's, else `default`")


class GenerationMetricsConfig(Section):
    """FID/FVD against a reference set and the VBench-style video dimensions (evaluation/generation_metrics.py).

    Without weight files the Inception / I3D extractors are seeded random init: their distances rank
    models within one setup but are no published FID/FVD, and the eval says so (tag `features`).
    """

    reference: str | None = Field(
        None,
        description="real media to compare against: held_out (the prepared held-out clips) or a folder of "
        "videos/images; unset: no FID/FVD",
    )
    fid: bool = Field(True, description="FID on frames (images, or every frame of a video) when a reference is set")
    fvd: bool = Field(True, description="FVD on clips (video families) when a reference is set")
    inception_weights: Path | None = Field(None, description="torchvision Inception-v3 state dict; unset: random init")
    i3d_weights: Path | None = Field(None, description="Kinetics-400 RGB I3D state dict; unset: random init")
    fid_size: int = Field(299, ge=75, description="Inception input size (299 is the standard)")
    fvd_size: int = Field(224, ge=32, description="I3D input size (224 is the standard)")
    fvd_layer: Literal["pool", "logits"] = Field(
        "logits", description="logits: the original FVD's 400-d features (the default); pool: I3D's 1024-d features"
    )
    vbench: bool = Field(True, description="temporal flickering, motion smoothness, background consistency (CLIP)")
    dino: str | None = Field(
        None, description="a local transformers DINO/ViT folder: subject consistency on its features (VBench)"
    )


class EvalParallelConfig(Section):
    """How the eval's ranks share the generation of samples: `dp` groups take different prompts, and inside a group
    one video is made by `cfg` x `cp` ranks together. dp x cfg x cp = eval.nproc_per_node (checked at load).

    cfg = 2 runs the conditional and unconditional halves of a guided denoiser call on two ranks (any call whose
    batch splits in two; a family without a doubled batch, e.g. Flux's embedded guidance, gains nothing). cp > 1 splits
    each denoiser call's token sequence with the training engine's context-parallel plans (Ulysses, ring, or STDiT3's
    DSP). Every rank of a group makes the same video; its first rank writes and scores it."""

    dp: int | None = Field(None, ge=1, description="prompt-splitting groups; default: eval.nproc_per_node / (cfg x cp)")
    cfg: Literal[1, 2] = Field(1, description="2: the guided call's two halves on two ranks")
    cp: int = Field(1, ge=1, description="context parallel degree of one video's denoiser calls")
    cp_mode: Literal["ulysses", "ring", "dsp"] = Field(
        "ulysses", description="ulysses (heads % cp == 0), ring (any head count) or dsp (STDiT3 only)"
    )

    def layout(self, world: int) -> tuple[int, int, int]:
        """(dp, cfg, cp) for `world` ranks, or a ValueError naming what does not fit."""
        inner = self.cfg * self.cp
        dp = self.dp if self.dp is not None else world // inner
        if dp * inner != world:
            given = f"dp={self.dp}" if self.dp is not None else "dp (the rest)"
            raise ValueError(
                f"eval.parallel: {given} x cfg={self.cfg} x cp={self.cp} must equal the eval's world size "
                f"eval.nproc_per_node={world}; change the degrees or nproc_per_node"
            )
        return dp, self.cfg, self.cp


#: each step-cache method's knobs (fields of EvalCacheConfig), in the order its tag lists them
CACHE_KNOBS: dict[str, tuple[str, ...]] = {
    "none": (),
    "first_block": ("threshold",),
    "taylorseer": ("cache_interval", "warmup_steps", "cooldown_step", "max_order", "factors_dtype"),
}


class EvalCacheConfig(Section):
    """Step caching of the denoiser while sampling (`eval.cache`, engines/torch_engine/step_cache.py): diffusers'
    cache hooks reuse work from earlier denoising steps, trading quality for speed. The eval measures that trade
    itself: its first `compare_samples` samples are also made without the cache (same seeds) and it reports
    eval/cache_psnr, eval/cache_max_abs_diff and eval/cache_speedup. Only diffusers denoisers with `enable_cache`
    (CogVideoX, Flux, HunyuanVideo (1.5), LTX, Wan) take it; the others are refused when the eval loads them.

    Knobs and their diffusers defaults: first_block (FirstBlockCacheConfig): `threshold` 0.05, the relative change of
    the first block's residual under which the remaining blocks are skipped (0: never skip). taylorseer
    (TaylorSeerCacheConfig): `cache_interval` 5 (steps between full computations), `warmup_steps` 3
    (disable_cache_before_step: full steps first), `cooldown_step` None (disable_cache_after_step: full steps from
    here on), `max_order` 1 (Taylor expansion order), `factors_dtype` bfloat16."""

    method: Literal["none", "first_block", "taylorseer"] = Field(
        "none", description="none | first_block (First Block Cache) | taylorseer (TaylorSeer)"
    )
    threshold: float = Field(0.05, ge=0, description="first_block: skip the rest when the residual changes less")
    cache_interval: int = Field(5, ge=1, description="taylorseer: steps between full computations")
    warmup_steps: int = Field(3, ge=0, description="taylorseer: first steps always computed in full")
    cooldown_step: int | None = Field(None, ge=0, description="taylorseer: steps from this one computed in full")
    max_order: int = Field(1, ge=0, description="taylorseer: order of the Taylor expansion")
    factors_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="taylorseer: dtype the Taylor factors are kept in"
    )
    compare_samples: int = Field(
        1, ge=0, description="first samples also made without the cache to measure its cost (0: no measurement)"
    )

    @property
    def on(self) -> bool:
        return self.method != "none"

    def describe(self) -> str:
        """The method and its knobs, as the run's `flowspeed.eval.step_cache` tag names them."""
        knobs = ", ".join(f"{k}={getattr(self, k)}" for k in CACHE_KNOBS[self.method])
        return self.method + (f"({knobs})" if knobs else "")

    @model_validator(mode="after")
    def _knobs_of_the_method(self) -> EvalCacheConfig:
        """A knob of another method set away from its default is a config mistake (it would silently do nothing):
        refused. At its default it passes, so a saved config (every field written out) loads again."""
        others = {k for knobs in CACHE_KNOBS.values() for k in knobs} - set(CACHE_KNOBS[self.method])
        stray = sorted(k for k in others if getattr(self, k) != type(self).model_fields[k].default)
        if stray:
            raise ValueError(
                f"eval.cache: {', '.join(stray)} do not apply to method {self.method!r} "
                f"(its knobs: {', '.join(CACHE_KNOBS[self.method]) or 'none'}): remove them or change the method"
            )
        return self


class EvalConfig(Section):
    output_dir: Path | None = Field(None, description="eval outputs; default `<workdir>/eval/<family>-<digest>`")
    model: str | None = Field(
        None,
        description="what to evaluate: models:/NAME/VERSION or models:/NAME@ALIAS (the registry), a training "
        "checkpoint folder (step-N), or an export folder; default: this config's training export",
    )
    benchmarks: list[BenchmarkConfig] = Field(
        default_factory=list, description="understanding families: benchmarks scored on the exported model"
    )
    prompts: list[str] = Field(default_factory=lambda: ["a red circle moving from left to right on a black background"])
    num_inference_steps: int = Field(4, ge=1)
    guidance_scale: float = Field(6.0, ge=0)
    fps: int = Field(8, ge=1)
    seed: int = 1234
    val_batches: int = Field(4, ge=1, description="fixed-noise passes over the held-out set")
    clip: ClipConfig = ClipConfig()
    generation: GenerationMetricsConfig = GenerationMetricsConfig()
    samples_per_prompt: int = Field(1, ge=1, description="generated samples per prompt (seeds seed, seed+1, ...)")
    batch_size: int = Field(4, ge=1, description="samples generated or items answered per model call")
    split: Literal["held_out", "all"] = Field(
        "held_out", description="prepared samples to score: the held-out split, or all (a test-set workdir)"
    )
    max_answers: int | None = Field(
        8, ge=1, description="text families: prepared samples answered (exact match, WER); null: every one"
    )
    max_new_tokens: int | None = Field(None, ge=1, description="text answers: new tokens; default max_text_length/4")
    rewards: list[RewardConfig] | None = Field(
        None,
        description="`eval/reward` of the held-out answers or the prompts' samples; default: train.method.rewards "
        "(none: no reward metric)",
    )
    nproc_per_node: int = Field(1, ge=1, description="eval ranks (torchrun): samples and items split across them")
    parallel: EvalParallelConfig = Field(
        default_factory=EvalParallelConfig, description="generation: ranks per video (cfg, cp) and prompt groups (dp)"
    )
    cache: EvalCacheConfig = Field(
        default_factory=EvalCacheConfig, description="generation: step caching of the denoiser, its cost measured"
    )

    @model_validator(mode="after")
    def _layout_fits(self) -> EvalConfig:
        self.parallel.layout(self.nproc_per_node)
        return self


class GateConfig(Section):
    """A candidate must beat the champion on `metric` by `min_improvement` (0: not worse)."""

    metric: str = Field(description="an eval metric of the pipeline run, e.g. eval/val_loss")
    direction: Literal["lower", "higher"] | None = Field(
        None, description="which way is better; default: the metric's declared direction (evaluation/directions.py)"
    )
    min_improvement: float = Field(0.0, description="absolute margin over the champion's value")

    @model_validator(mode="after")
    def _known_direction(self) -> GateConfig:
        if self.direction is None:
            from flowspeed.evaluation.directions import DIRECTIONS, direction_of

            found = direction_of(self.metric)
            if found is None:
                raise ValueError(
                    f"gate on {self.metric}: no declared direction for this metric; add direction: lower|higher "
                    f"(declared: {', '.join(sorted(DIRECTIONS))})"
                )
            self.direction = found  # type: ignore[assignment]
        return self


class RegistryConfig(Section):
    """MLflow model registry: every pipeline run registers a version; the gates decide its alias."""

    enabled: bool = False
    model_name: str | None = Field(None, description="registered model name; default: `<experiment>-<family>`")
    gates: list[GateConfig] = Field(
        default_factory=lambda: [GateConfig(metric="eval/val_loss", direction="lower")],
        description="all must pass for the new version to become `champion`; otherwise `challenger`",
    )


class SamplesConfig(Section):
    """Samples logged to MLflow at checkpoints (engines/tracking/samples.py), so the run page shows the model
    improving: a frame grid (and the clips) for generating families, a table of answers for the others."""

    enabled: bool = Field(
        default_factory=lambda: os.environ.get("FLOWSPEED_SAMPLES", "1") != "0",
        description="log samples at checkpoints (an export and a short generation each); default on, off where "
        "the environment has FLOWSPEED_SAMPLES=0 (a test suite, a benchmark)",
    )
    prompts: list[str] | None = Field(
        None, description="generating families' prompts; default: the first `count` of eval.prompts"
    )
    count: int = Field(
        1, ge=1, description="prompts (generating) or held-out samples (answering, transcribing) per checkpoint"
    )
    num_inference_steps: int | None = Field(None, ge=1, description="default: eval.num_inference_steps")
    every: int = Field(1, ge=1, description="sample at every N-th checkpoint, and at the last step of the run")


class TrackingConfig(Section):
    tracking_uri: str | None = Field(None, description="default: MLFLOW_TRACKING_URI or sqlite under workdir")
    experiment: str | None = Field(
        None, description="MLflow experiment; default `flowspeed-<workdir name>`: one per workdir, every family in it"
    )
    recipe: str | None = Field(
        None, description="tagged flowspeed.recipe (with family, variant): default the config file's name"
    )
    run_name: str | None = None
    log_model: Literal["auto", "always", "never"] = Field(
        "auto", description="copy the exported model into MLflow artifacts; auto: only below 512 MiB"
    )
    registry: RegistryConfig = RegistryConfig()
    samples: SamplesConfig = Field(default_factory=SamplesConfig)
    outage_grace_s: float = Field(
        300.0,
        ge=0,
        description="at the end of training, how long to wait for an unreachable MLflow server before the "
        "buffered metrics go to `<train_dir>/mlflow-undelivered/` (`flowspeed sync-metrics` sends them)",
    )
    server_wait_s: float = Field(
        0.0,
        ge=0,
        description="before a stage, how long to wait (saying so every few seconds) for an MLflow server that "
        "does not answer; 0: fail at once with what to do",
    )
    system_metrics: bool = Field(
        False, description="CPU, memory, disk, network (psutil) and GPU (nvidia-ml-py) as system/* metrics"
    )
    system_metrics_interval_s: float = Field(10.0, gt=0, description="seconds between system metric samples")


# How prep's work is spread and where it goes: not part of the prep folder's key.
_PREP_RUNTIME = {
    "output_dir", "cache_dir", "batch_size", "num_workers", "nproc_per_node", "slices", "task_runner",
    "cluster_address", "shard_size", "device",
}  # fmt: skip
# What a resume may change (see `PipelineConfig.train_key`): not part of the training folder's key.
_TRAIN_RESUMABLE = {
    "output_dir", "resume", "max_steps", "stop_after_steps", "lr", "min_lr_ratio", "warmup_steps", "weight_decay",
    "max_grad_norm", "mixed_precision", "fsdp", "nproc_per_node", "nnodes", "node_rank", "rdzv_endpoint", "rdzv_id",
    "parallel", "device", "log_every", "metrics_flush_every", "checkpoint_every", "keep_checkpoints", "gpu_slots",
    "activation_checkpointing", "compile", "compile_cache_dir", "async_checkpoint", "profile", "peak_tflops",
    "collective_timeout_s", "elastic", "launcher", "slurm",
}  # fmt: skip


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class PipelineConfig(Section):
    workdir: Path = Path("runs/quickstart")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()

    # Derived locations: every output lives under the workdir unless a section says otherwise. Each
    # stage's folder is named by the family and a digest of what decides its content
    # (`prep/cogvideox-1a2b3c4d`), so any recipes can share one workdir: a second recipe gets folders of
    # its own instead of resuming the first one's checkpoint. An explicit `output_dir` is used as given.
    @property
    def prep_dir(self) -> Path:
        return self.data.output_dir or self.workdir / "prep" / self.folder_name(self.prep_key())

    @property
    def cache_dir(self) -> Path:
        """Content-addressed, so every prep folder of the workdir (and any number of workdirs) can share
        one: `<workdir>/prep/cache`, or `<data.output_dir>/cache` beside an explicit prep folder."""
        if self.data.cache_dir is not None:
            return self.data.cache_dir
        return self.data.output_dir / "cache" if self.data.output_dir else self.workdir / "prep" / "cache"

    @property
    def curation_dir(self) -> Path:
        """Curation's scores and scene cuts, keyed inside by content and scorer: shared by the workdir's
        prep folders like the latent cache, so a new threshold (hence a new prep folder) rescores nothing."""
        return self.data.output_dir / "curation" if self.data.output_dir else self.workdir / "prep" / "curation"

    @property
    def train_dir(self) -> Path:
        return self.train.output_dir or self.workdir / "train" / self.folder_name(self.train_key())

    @property
    def eval_dir(self) -> Path:
        return self.eval.output_dir or self.workdir / "eval" / self.folder_name(self.eval_key())

    @property
    def experiment(self) -> str:
        """The MLflow experiment: `tracking.experiment`, else one per workdir (`flowspeed-<workdir name>`),
        whatever the family, so every recipe run into a workdir lands in one experiment (told apart by
        the tags `flowspeed.family`, `flowspeed.variant`, `flowspeed.recipe`)."""
        return self.tracking.experiment or f"flowspeed-{Path(os.path.abspath(self.workdir)).name}"

    @property
    def registered_model(self) -> str:
        """`tracking.registry.model_name`, else `<experiment>-<family>`: families sharing an experiment
        never compete for one `champion`."""
        return self.tracking.registry.model_name or f"{self.experiment}-{self.model.family}"

    def folder_name(self, key: str) -> str:
        return f"{self.model.family}-{key[:8]}"

    def prep_key(self) -> str:
        """Digest of what decides prep's output: the data section but for how the work is spread (ranks,
        slices, batch sizes, where it goes) and the model section (its encoders, text length, processor)."""
        data = self.data.model_dump(mode="json", exclude=_PREP_RUNTIME)
        return _digest({"data": data, "model": self.model.model_dump(mode="json")})

    def train_key(self) -> str:
        """Digest of what decides which checkpoints a training folder holds: its data (the prep key), the
        model, and the train settings a resume cannot change. Left out are those a resume may change:
        the layout (checkpoints reshard), the length of the run (`max_steps`, to extend it), the
        optimiser's knobs the divergence advice names (lr, warmup, clipping, precision) and cadence."""
        train = self.train.model_dump(mode="json", exclude=_TRAIN_RESUMABLE)
        return _digest({"prep": self.prep_key(), "model": self.model.model_dump(mode="json"), "train": train})

    def eval_key(self) -> str:
        """Digest of what an eval folder scores (the training it reads, or `eval.model`) and how; not
        `nproc_per_node`/`batch_size`/`parallel`, so a killed eval resumes on any number or layout of ranks."""
        # an eval without a step cache keeps the key it had before `eval.cache` existed (its folder resumes)
        off = set() if self.eval.cache.on else {"cache"}
        ev = self.eval.model_dump(mode="json", exclude={"output_dir", "nproc_per_node", "batch_size", "parallel", *off})
        return _digest({"train": self.train_key(), "eval": ev})

    def config_hash(self) -> str:
        """The whole resolved config (paths included): runs with the same hash trained the same recipe,
        whatever their names. The MLflow tag `flowspeed.config_hash` and the exports' model cards carry it."""
        return _digest(self.model_dump(mode="json"))[:16]

    def prep_hash(self) -> str:
        """Hash of everything that changes what prep writes for a sample (not where it goes)."""
        keys = ("decoder", "num_frames", "target_fps", "stride", "height", "width", "dtype")
        payload: dict[str, Any] = {k: getattr(self.data, k) for k in keys}
        if self.data.buckets.mode != "fixed":
            payload["buckets"] = self.data.buckets.model_dump(mode="json")
        if self.data.curate.scene_split.enabled:  # changes which frame ranges exist
            payload["scene_split"] = self.data.curate.scene_split.model_dump(mode="json")
        payload["max_text_length"] = self.model.max_text_length
        # decord and PyAV agree on indices but not bit-for-bit on pixels: keep them apart.
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def encoder_identity(self) -> str:
        m = self.model
        parts = [m.vae, m.text_encoder] + ([m.image_encoder] if m.image_encoder is not None else [])
        seed = f"seed={m.seed}" if any(c.pretrained is None for c in parts) else ""
        image = f"|image={m.image_encoder.identity()}" if m.image_encoder is not None else ""  # cached features too
        return f"{m.family}|vae={m.vae.identity()}|text={m.text_encoder.identity()}{image}|{seed}"
