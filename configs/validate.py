"""Every config mistake that can be known before work starts, found in milliseconds.

Two kinds of checks, split by what they depend on:

- `config_problems` (run by `load_config`, always): the config against itself and the registries:
  the parallel layout against the world size, the engine against the family, LoRA against the
  layout, every registry name (family, component presets, manifest format, captioner, CLIP model,
  benchmark, template, gate metric) and literal-like value, frame counts and sizes against the
  family's rule. Machine-independent, so a recipe loads the same on a laptop, in CI and on the cluster.
  (The schema's Literal fields, e.g. `data.decoder` and `data.task_runner`, are pydantic's.)
- `stage_problems` (run at the start of a stage, before anything is written): what depends on this
  machine: the manifest and media roots exist (prep), local `pretrained:` folders exist, a resume
  checkpoint or an evaluated model folder exists, an optional task runner or stack (a pip extra: decord,
  megatron-core, PySceneDetect/OpenCV, jiwer) the config uses is installed. A recipe whose
  data lives on the cluster still loads elsewhere.

Nothing here imports torch or a model library: names and rules come from `flowspeed.configs.catalog`, which a
test holds to the real registries, or from registries that are cheap to import. The one exception is a
family the catalog does not list yet: the real registry is asked (`catalog.family_facts`). The layout rules are
the ones both engines' launchers call (`engines/torch_engine/launch.py:validate_layout`,
`engines/megatron/trainer.py:validate`), so a layout is refused by the same words at load and at launch.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, get_args

from flowspeed.configs.adapters import adapter_settings
from flowspeed.configs.catalog import (
    BENCHMARKS,
    CAPTIONERS,
    FAMILIES,
    FLOW_GRPO_FAMILIES,
    GATE_METRIC_PREFIXES,
    MEGATRON_FAMILIES,
    PROMPT_TEMPLATES,
    REWARDS,
    TASK_RUNNERS,
    clip_models,
    family_facts,
)
from flowspeed.configs.resume import resume_problems
from flowspeed.configs.schema import ParallelConfig, PipelineConfig


class ConfigError(ValueError):
    """A config the user must fix; the message says what to change."""


Stage = Literal["run", "prep", "train", "eval"]
STAGES: tuple[Stage, ...] = get_args(Stage)
_DEVICE = re.compile(r"^(auto|cpu|cuda|npu|mps|xpu)(:\d+)?$")


def _names(names: Iterable[object]) -> str:
    return ", ".join(str(n) for n in names)


def _did_you_mean(value: str, names: Iterable[str]) -> str:
    close = difflib.get_close_matches(value, list(names), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def world_size(cfg: PipelineConfig) -> int:
    return cfg.train.nnodes * cfg.train.nproc_per_node


# ---- the parallel layout: both engines' launchers call this ------------------------------------------
def _factors(p: ParallelConfig, dp_shard: int | str) -> str:
    return f"dp_replicate={p.dp_replicate} x dp_shard={dp_shard} x cp={p.cp} x tp={p.tp} x pp={p.pp}"


def torch_layout_problems(cfg: PipelineConfig) -> list[str]:
    """The torch engine's rules: FSDP2/DDP/HSDP x CP x TP x PP must multiply to the ranks."""
    t, p = cfg.train, cfg.train.parallel
    out = []
    if p.pp_schedule == "interleaved_1f1b" and p.pp_virtual_stages < 2:
        out.append(
            f"train.parallel.pp_schedule=interleaved_1f1b needs pp_virtual_stages >= 2 (got {p.pp_virtual_stages}); "
            "set train.parallel.pp_virtual_stages: 2 or more, or pp_schedule: 1f1b"
        )
    if t.lora.enabled and p.tp > 1:
        out.append(
            f"train.lora with train.parallel.tp > 1 is not supported (tp={p.tp}): the TP plans shard the very "
            "projections LoRA wraps; shard a LoRA run with FSDP (parallel.dp_shard) instead"
        )
    if p.pp > 1:
        out.append(
            f"train.parallel.pp={p.pp}: the torch engine does not train with pipeline parallel (it is available for "
            f"transformers language backbones on train.engine=megatron: {', '.join(MEGATRON_FAMILIES)}); the diffusion "
            "denoisers train with fsdp/tp/cp instead: set train.parallel.pp: 1"
        )
    world = world_size(cfg)
    fixed = p.dp_replicate * p.cp * p.tp * p.pp
    ranks = f"train.nnodes={t.nnodes} x train.nproc_per_node={t.nproc_per_node}"
    dp_shard = p.dp_shard if p.dp_shard != -1 else world // fixed
    if p.dp_replicate > 1 and dp_shard == 1 and (p.tp > 1 or p.cp > 1):
        out.append(
            f"train.parallel: tensor/context parallel (tp={p.tp}, cp={p.cp}) with pure replication (dp_replicate="
            f"{p.dp_replicate}, dp_shard=1) is not supported: DDP cannot wrap DTensor parameters; set dp_shard > 1 "
            "(FSDP2/HSDP) for the data-parallel ranks"
        )
    out += _plan_problems(cfg)
    if p.dp_shard == -1:
        if world % fixed:
            out.append(
                f"train.parallel: impossible parallel layout: world size {world} ({ranks}) is not divisible by "
                f"dp_replicate*cp*tp*pp = {_factors(p, '?')} = {fixed}; change train.parallel or the number of "
                "ranks (nnodes x nproc_per_node)"
            )
    elif fixed * p.dp_shard != world:
        out.append(
            f"train.parallel: impossible parallel layout: dp_replicate*dp_shard*cp*tp*pp = {_factors(p, p.dp_shard)} = "
            f"{fixed * p.dp_shard}, but the world size is {world} ({ranks}); the degrees must multiply to the number "
            "of ranks (set one of them to fit, or dp_shard: -1 to take the rest)"
        )
    return out


def _plan_problems(cfg: PipelineConfig) -> list[str]:
    """The torch engine splits a model with TP/CP only where a plan for its class is registered."""
    p, name = cfg.train.parallel, cfg.model.family
    facts = family_facts(name)
    if facts is None or facts.parallel is None:
        return []
    have = facts.parallel
    out = []
    if p.tp > 1 and "tp" not in have:
        with_tp = ", ".join(n for n, f in FAMILIES.items() if f.parallel and "tp" in f.parallel)
        out.append(
            f"train.parallel.tp={p.tp}: the torch engine has no tensor-parallel plan for {name}'s model (it has for "
            f"{with_tp}); shard it with FSDP (train.parallel.dp_shard) and set tp: 1"
            + (", or use train.engine=megatron" if name in MEGATRON_FAMILIES else "")
        )
    return out + _cp_plan_problems(cfg, "train.parallel")


def _cp_plan_problems(cfg: PipelineConfig, key: str) -> list[str]:
    """Training and eval sampling split a model's sequence with the same context-parallel plans."""
    section, name = (cfg.train.parallel if key == "train.parallel" else cfg.eval.parallel), cfg.model.family
    facts = family_facts(name)
    if facts is None or facts.parallel is None or section.cp == 1:
        return []
    have = facts.parallel
    mode = "dsp" if section.cp_mode == "dsp" else "cp"
    if mode in have:
        return []
    what = "DSP (cp_mode=dsp) splits STDiT3 only" if mode == "dsp" else "there is no context-parallel plan"
    fix = "cp_mode: ulysses or ring" if "cp" in have else "cp: 1"
    return [f"{key}.cp={section.cp} with cp_mode={section.cp_mode}: {what} for {name}'s model; set {fix}"]


def megatron_layout_problems(cfg: PipelineConfig) -> list[str]:
    """The megatron engine's rules: its families, no LoRA, no torch-only settings, TP x PP x CP divide the
    ranks (data parallel is the rest). The layer split and CP's need for CUDA are checked at launch."""
    t, p = cfg.train, cfg.train.parallel
    out = []
    if cfg.model.family not in MEGATRON_FAMILIES:
        out.append(
            f"train.engine=megatron trains {', '.join(MEGATRON_FAMILIES)}; {cfg.model.family!r} trains on the torch "
            "engine (train.engine=torch)"
        )
    from flowspeed.engines.megatron.packing import packing_problems  # no torch import: config checks stay light

    out += packing_problems(cfg)
    if t.lora.enabled:
        out.append(
            "train.lora is not supported on the megatron engine: megatron-core's tensor-parallel linears have no "
            "peft adapters here. Use train.engine=torch for LoRA (FSDP2 shards it), or train the full model"
        )
    unsupported = {
        "train.parallel.dp_replicate": p.dp_replicate != 1,
        "train.parallel.dp_shard": p.dp_shard != -1,
        "train.ema.enabled": t.ema.enabled,
        "train.compile": t.compile,
        "train.async_checkpoint": t.async_checkpoint,
        "train.profile.enabled": t.profile.enabled,
        "train.fsdp.param_dtype=bfloat16 (use train.mixed_precision=bf16)": t.fsdp.param_dtype != "float32",
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        out.append(
            f"{', '.join(bad)}: not available on the megatron engine (data parallel is what tp x pp x cp leave "
            "of the ranks; set train.megatron.distributed_optimizer to shard optimizer state)"
        )
    world, model_parallel = world_size(cfg), p.tp * p.pp * p.cp
    if world % model_parallel:
        out.append(
            f"train.parallel: tp={p.tp} x pp={p.pp} x cp={p.cp} = {model_parallel} does not divide the {world} ranks "
            f"(train.nnodes={t.nnodes} x train.nproc_per_node={t.nproc_per_node}); change the degrees or the ranks"
        )
    if p.sequence_parallel and p.tp == 1:
        out.append(
            "train.parallel.sequence_parallel=true needs tp > 1: it splits the sequence across the TP group; "
            "set train.parallel.tp or sequence_parallel: false"
        )
    vpp = p.pp_virtual_stages
    if vpp > 1:
        micro = p.pp_microbatches or t.grad_accum
        if p.pp < 2:
            out.append(f"train.parallel.pp_virtual_stages={vpp}: virtual pipeline stages (vpp > 1) need pp > 1")
        elif micro % p.pp:
            out.append(
                f"interleaved 1F1B needs the micro-batches per step ({micro}) to be a multiple of pp={p.pp}: set "
                "train.grad_accum (or train.parallel.pp_microbatches) accordingly"
            )
    return out


def layout_problems(cfg: PipelineConfig) -> list[str]:
    """What the launchers refuse before any process starts, for the configured engine."""
    t = cfg.train
    out = []
    if t.nnodes > 1 and not t.rdzv_endpoint and t.launcher != "slurm":  # slurm: the allocation's first node
        out.append(f"train.nnodes={t.nnodes} needs train.rdzv_endpoint (host:port reachable from every node)")
    if t.node_rank >= t.nnodes:
        out.append(f"train.node_rank={t.node_rank} must be below train.nnodes={t.nnodes}")
    out += megatron_layout_problems(cfg) if t.engine == "megatron" else torch_layout_problems(cfg)
    out += _cp_plan_problems(cfg, "eval.parallel")
    facts = family_facts(cfg.model.family)
    if facts is not None and not facts.vision_tower and cfg.model.freeze_vision_tower is not None:
        out.append(
            f"model.freeze_vision_tower applies to vision-language families; {cfg.model.family!r} has no vision "
            "tower: remove the key"
        )
    return out


def check_layout(cfg: PipelineConfig) -> None:
    """Raise ConfigError (a ValueError) listing what the launcher refuses: the launchers' checks that need no
    process, no device and no model, so load_config and both engines refuse a layout in the same words."""
    if problems := layout_problems(cfg):
        raise ConfigError("\n".join(problems))


# ---- everything else that does not depend on the machine ---------------------------------------------
def _family_problems(cfg: PipelineConfig) -> list[str]:
    name = cfg.model.family
    facts = family_facts(name)
    if facts is None:
        return [
            f"model.family={name!r} is not a known model family{_did_you_mean(name, FAMILIES)}; known families: "
            f"{_names(sorted(FAMILIES))} (`flowspeed models list` describes them)"
        ]
    d = cfg.data
    out = []
    for comp_name, presets in (facts.presets or {}).items():
        comp = getattr(cfg.model, comp_name)
        if comp is None:  # a component the config leaves out (wan_i2v's `image_encoder: null`, Wan2.2 I2V-A14B)
            continue
        if comp.pretrained is None and comp.preset not in presets:  # the preset alone decides what is built
            out.append(
                f"model.{comp_name}.preset={comp.preset!r} is not a {comp_name} preset of {name}"
                f"{_did_you_mean(str(comp.preset), presets)}; its presets: {_names(presets)} (random init), or set "
                f"model.{comp_name}.pretrained to the weights to load"
            )
    if d.buckets.mode == "fixed":
        if err := facts.frame_error(name, d.num_frames):
            out.append(f"data.num_frames={d.num_frames}: {err}; set data.num_frames accordingly")
        multiple = facts.size_multiple_for(cfg.model)
        for side, key in ((d.height, "height"), (d.width, "width")):
            if side % multiple:
                out.append(
                    f"data.{key}={side} must be a multiple of {multiple} for {name} (e.g. "
                    f"{max(side // multiple, 1) * multiple})"
                )
    for res, frames in d.buckets.bucket_config.items():
        for n in frames:
            if err := facts.frame_error(name, int(n)):
                out.append(f"data.buckets.bucket_config[{res}][{n}]: {err}")
    if cfg.train.packing.max_tokens is not None and not facts.vision_tower:
        packable = sorted(n for n, f in FAMILIES.items() if f.vision_tower)
        out.append(
            f"train.packing.max_tokens is set, but {name} does not train on token sequences that pack: packing lays "
            f"decoder-only token-loss samples end to end (the VLMs: {_names(packable)}); remove train.packing"
        )
    return out


def _registry_problems(cfg: PipelineConfig) -> list[str]:
    from flowspeed.datasets_prep.manifest import known_formats  # stdlib only: the registry itself

    out = []
    fmt = cfg.data.manifest_format
    if fmt != "auto" and fmt not in known_formats():
        out.append(
            f"data.manifest_format={fmt!r} is not a manifest format; use auto (detect from the file) or one of: "
            f"{_names(known_formats())}"
        )
    cap, cap_clip = cfg.data.caption, cfg.data.curate.aesthetic.clip
    if cap.model not in CAPTIONERS:
        out.append(f"data.caption.model={cap.model!r} is not a captioner; known captioners: {_names(CAPTIONERS)}")
    elif cap.enabled and not cap.pretrained and cap.preset not in CAPTIONERS[cap.model]:
        presets = CAPTIONERS[cap.model]
        fix = f"use preset: {' or '.join(presets)}, or" if presets else "it has no random-init preset:"
        out.append(
            f"data.caption.preset={cap.preset!r} is not a preset of captioner {cap.model}; {fix} set "
            "data.caption.pretrained to its checkpoint"
        )
    known_clip = clip_models()
    clips = [("eval.clip.model", cfg.eval.clip.model), ("data.curate.aesthetic.clip.model", cap_clip.model)]
    for key, model in clips if known_clip is not None else ():
        if model not in known_clip:
            out.append(
                f"{key}={model!r} is not an open_clip model{_did_you_mean(model, known_clip)}; use flowspeed-tiny-clip "
                "(random init) or a name from open_clip.list_models(), e.g. ViT-B-32"
            )
    for i, gate in enumerate(cfg.tracking.registry.gates):
        if not gate.metric.startswith(GATE_METRIC_PREFIXES):
            out.append(
                f"tracking.registry.gates[{i}].metric={gate.metric!r} is not a metric a pipeline run logs: the gates "
                f"compare its eval/... metrics and train/final_loss (e.g. eval/{gate.metric.rsplit('/', 1)[-1]})"
            )
    for i, b in enumerate(cfg.eval.benchmarks):
        if b.name not in BENCHMARKS:
            out.append(f"eval.benchmarks[{i}].name={b.name!r} is not a benchmark; known: {_names(BENCHMARKS)}")
        if b.template is not None and b.template not in PROMPT_TEMPLATES:
            out.append(
                f"eval.benchmarks[{i}].template={b.template!r} is not a prompt template; known: "
                f"{_names(PROMPT_TEMPLATES)} (or leave it unset for the family's)"
            )
    return out


def _value_problems(cfg: PipelineConfig) -> list[str]:
    out = []
    resume = cfg.train.resume
    if resume not in ("auto", "never") and not _looks_like_path(resume):
        out.append(
            f"train.resume={resume!r}: use auto (the newest checkpoint in the output folder), never, or the path "
            f"of a checkpoint directory (write ./{resume} for a folder of that name here)"
        )
    for key, value in (("data.device", cfg.data.device), ("train.device", cfg.train.device)):
        if not _DEVICE.match(value):
            out.append(f"{key}={value!r} is not a device; use auto, cpu, cuda, npu (optionally :N, e.g. cuda:1)")
    return out


# Slurm's --time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS (and UNLIMITED / INFINITE)
_SLURM_TIME = re.compile(r"^(\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}|UNLIMITED|INFINITE)$")


def _slurm_problems(cfg: PipelineConfig) -> list[str]:
    """`train.launcher: slurm`: what sbatch would refuse minutes later in a queue (or, worse, accept and run wrong),
    refused at load: a malformed time limit, fewer GPUs than ranks, options that would break the batch script."""
    t, s = cfg.train, cfg.train.slurm
    if t.launcher != "slurm":
        return []
    out = []
    if s.time is not None and not _SLURM_TIME.match(s.time):
        out.append(f"train.slurm.time={s.time!r} is not a Slurm time limit; use MM, HH:MM:SS or D-HH:MM:SS")
    if s.gpus_per_node and s.gpus_per_node < t.nproc_per_node and not t.device.startswith("cpu"):
        out.append(
            f"train.slurm.gpus_per_node={s.gpus_per_node} is below train.nproc_per_node={t.nproc_per_node}: each rank "
            "needs a device of its own; raise gpus_per_node or lower nproc_per_node"
        )
    if t.node_rank != 0 or t.rdzv_endpoint:
        out.append(
            "train.node_rank and train.rdzv_endpoint come from the Slurm allocation (SLURM_NODEID, its first node) "
            "under train.launcher: slurm: remove them"
        )
    for key, value in (("partition", s.partition), ("account", s.account), ("qos", s.qos), ("mem", s.mem),
                       ("job_name", s.job_name), ("python", s.python)):  # fmt: skip
        if value is not None and (not value.strip() or any(c.isspace() for c in value)):
            out.append(f"train.slurm.{key}={value!r} must be one word (no spaces or line breaks)")
    for i, arg in enumerate(s.sbatch_args):
        if not arg.startswith("-") or "\n" in arg:
            out.append(f"train.slurm.sbatch_args[{i}]={arg!r}: give one sbatch option per item, e.g. --gres=npu:8")
    for i, line in enumerate(s.setup):
        if "\n" in line:
            out.append(f"train.slurm.setup[{i}]: one shell line per item (split {line!r} at its line breaks)")
    return out


def _elastic_problems(cfg: PipelineConfig) -> list[str]:
    """`train.elastic`: a node range the rendezvous can form, and a layout every group in it can take.

    The layout and the global batch (batch_size x grad_accum x data-parallel ranks) are made for `train.nnodes`;
    a group formed with another node count re-derives the layout from its world size, so each count in
    min_nodes..max_nodes must fit the parallel degrees, or the restart would fail on every rank at once. Such a
    group also trains with its own global batch, so only min_nodes = max_nodes (the default) keeps a restarted run
    bit-identical to an uninterrupted one."""
    t, e = cfg.train, cfg.train.elastic
    if e is None:
        return []
    if e.min_nodes and e.max_nodes and e.min_nodes > e.max_nodes:
        return [
            f"train.elastic.min_nodes={e.min_nodes} is above train.elastic.max_nodes={e.max_nodes}: the rendezvous "
            "could never form"
        ]
    lo, hi = e.min_nodes or t.nnodes, e.max_nodes or t.nnodes
    if not lo <= t.nnodes <= hi:
        return [
            f"train.nnodes={t.nnodes} is outside train.elastic.min_nodes..max_nodes={lo}..{hi} (unset: nnodes): nnodes "
            "is the group the layout and the global batch are made for; set it within the range"
        ]
    out = []
    if hi > 1 and not t.rdzv_endpoint and getattr(t, "launcher", "local") != "slurm":
        out.append(
            f"train.elastic.max_nodes={hi} needs train.rdzv_endpoint (host:port of the c10d rendezvous that every "
            "node reaches, e.g. node0:29400)"
        )
    for n in range(lo, hi + 1):
        if n == t.nnodes:
            continue  # layout_problems checks the nominal group
        other = cfg.model_copy(update={"train": t.model_copy(update={"nnodes": n})})
        rules = megatron_layout_problems if t.engine == "megatron" else torch_layout_problems
        out += [f"with {n} nodes (train.elastic.min_nodes..max_nodes={lo}..{hi}): {p}" for p in rules(other)]
    return out


def _lora_init_problems(cfg: PipelineConfig) -> list[str]:
    """`train.lora.init_from`: the adapter is there, is plain LoRA for this family's denoiser, and the LoRA
    settings the config gives agree with it (those it leaves out were taken from it by the schema). Checked at
    load, not stage start: the settings the config resolves to are read from the adapter."""
    lora = cfg.train.lora
    if not lora.init_from:
        return []
    key = f"train.lora.init_from={lora.init_from}"
    if not lora.enabled:
        return [f"{key} needs train.lora.enabled: true (or remove init_from)"]
    try:
        found = adapter_settings(lora.init_from)
    except FileNotFoundError as exc:
        return [f"{key}: {exc}; point it at a peft adapter folder or a diffusers pytorch_lora_weights.safetensors"]
    except ValueError as exc:
        return [f"{key}: {exc}"]
    out = []
    facts = family_facts(cfg.model.family)
    if found.component and facts and found.component != facts.denoiser_subfolder:
        out.append(f"{key} adapts a pipeline's {found.component}; {cfg.model.family} trains its "
                   f"{facts.denoiser_subfolder or 'model'}: use an adapter made for {cfg.model.family}")  # fmt: skip
    given = {"rank": (lora.rank, found.rank), "alpha": (lora.alpha, found.alpha)}
    if lora.target_modules is not None:
        given["target_modules"] = (sorted(lora.target_modules), found.target_modules)
    for name, (ours, theirs) in given.items():
        if ours != theirs:
            out.append(f"train.lora.{name}={ours} but the adapter {lora.init_from} was trained with {theirs}: "
                       f"remove train.lora.{name} (it is taken from the adapter) or set it to {theirs}")  # fmt: skip
    return out


def _reward_problems(key: str, rewards: list, kind: str | None) -> list[str]:
    """Each reward term a known built-in (of the kind the method scores: "text" answers or "media" samples) or a
    `module:function` callable."""
    out = []
    for i, r in enumerate(rewards):
        if ":" in r.name:
            continue
        if r.name not in REWARDS:
            out.append(f"{key}[{i}].name={r.name!r} is not a reward; use one of {_names(REWARDS)} or a "
                       "`package.module:function` callable")  # fmt: skip
        elif kind is not None and REWARDS[r.name] != kind:
            fits = [n for n, k in REWARDS.items() if k == kind]
            out.append(f"{key}[{i}].name={r.name} scores {REWARDS[r.name]}, but this model's outputs are {kind}: "
                       f"use {_names(fits)} or a callable")  # fmt: skip
        if r.name == "format" and not r.pattern:
            out.append(f"{key}[{i}]: the format reward needs `pattern`, the regex a whole answer must match")
    return out


def _method_problems(cfg: PipelineConfig) -> list[str]:
    """`train.method` against the family, the engine and its own knobs (engines/methods/)."""
    m, name = cfg.train.method, cfg.model.family
    facts = family_facts(name)
    kind = None if facts is None else ("text" if facts.export == "transformers" else "media")
    out = _reward_problems("eval.rewards", cfg.eval.rewards or [], kind)
    if m.name == "sft":
        return out
    out += _reward_problems("train.method.rewards", m.rewards, kind)
    if cfg.train.engine != "torch":
        out.append(f"train.method.name={m.name} runs on the torch engine; set train.engine: torch")
    if facts is not None:
        fits = {
            "dpo": (facts.vision_tower, "vision-language families"),
            "grpo": (facts.vision_tower, "vision-language families"),
            "diffusion_dpo": (facts.export == "diffusers", "diffusion and flow (latent) families"),
            "flow_grpo": (name in FLOW_GRPO_FAMILIES, f"flow-matching image families ({_names(FLOW_GRPO_FAMILIES)})"),
        }
        ok, which = fits[m.name]
        if not ok:
            out.append(f"train.method.name={m.name} trains {which}; model.family={name} is not one")
    if m.name in ("grpo", "flow_grpo") and not m.rewards:
        out.append(f"train.method.name={m.name} needs train.method.rewards (e.g. [{{name: exact_answer}}])")
    if m.name in ("dpo", "grpo") and cfg.train.packing.max_tokens is not None:
        out.append(f"train.method.name={m.name} batches whole conversations (one row per answer), not packed rows: "
                   "set train.packing.max_tokens: null")  # fmt: skip
    if m.reference == "precomputed" and m.name != "dpo":
        out.append(f"train.method.reference=precomputed applies to dpo (log-probabilities of fixed answers); "
                   f"{m.name} scores fresh samples every step: use reference: model")  # fmt: skip
    return out


def config_problems(cfg: PipelineConfig) -> list[str]:
    """Every mistake `load_config` refuses: each a paragraph naming the key, the value and the fix."""
    return (_family_problems(cfg) + layout_problems(cfg) + _registry_problems(cfg) + _value_problems(cfg)
            + _lora_init_problems(cfg) + _elastic_problems(cfg) + _slurm_problems(cfg)
            + _method_problems(cfg))  # fmt: skip


# ---- what depends on this machine: checked when a stage starts, before it writes anything ------------
def _looks_like_path(value: str) -> bool:
    """A local path rather than a hub id (`org/name`) or a registry URI (`models:/...`)."""
    return value.startswith(("/", "./", "../", "~", ".\\")) or value in (".", "..") or "\\" in value


def _missing(key: str, value: str | Path, what: str, fix: str, folder: bool) -> str | None:
    path = Path(value).expanduser()
    if folder and path.is_dir() or not folder and path.exists():
        return None
    return f"{key}={value}: {what} does not exist on this machine ({path.resolve()}); {fix}"


def stage_problems(cfg: PipelineConfig, stage: str) -> list[str]:
    """Paths `stage` ("prep", "train", "eval" or "run": all three) will read, checked before any file is
    written. Not part of `load_config`: a recipe names data that exists where it runs, not everywhere."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    prep, train, ev = (stage in ("run", s) for s in ("prep", "train", "eval"))
    d, e = cfg.data, cfg.eval
    # (key, value, what it is, how to fix it, must be a folder); a None value is not checked
    wanted: list[tuple[str, str | Path | None, str, str, bool]] = []
    for comp_name in ("vae", "text_encoder", "transformer"):
        comp = getattr(cfg.model, comp_name)
        fix = "point it at a local checkpoint folder, or set `preset: tiny` and remove `pretrained`"
        wanted.append((f"model.{comp_name}.pretrained", _local(comp.pretrained), "the weights folder", fix, False))
        if _local(comp.pretrained) and comp.subfolder and Path(comp.pretrained).expanduser().is_dir():
            inside = Path(comp.pretrained) / comp.subfolder
            wanted.append((f"model.{comp_name}.subfolder", inside, "the subfolder", "name a folder inside it", True))
    if prep:
        aes, cap = d.curate.aesthetic, d.caption
        wanted += [(f"data.roots[{i}]", root, "the media root", "create it or remove it from data.roots", True)
                   for i, root in enumerate(d.roots)]  # fmt: skip
        wanted += [
            ("data.manifest", d.manifest, "the manifest", "set data.manifest, or write a demo dataset with "
             "`flowspeed demo-data DIR`", False),
            ("data.incoming", d.incoming, "the folder", "create it or unset data.incoming", True),
            ("data.caption.pretrained", _local(cap.pretrained) if cap.enabled else None, "the captioner checkpoint",
             "point it at a local folder", False),
            ("data.curate.aesthetic.head", aes.head if aes.enabled else None, "the head weights file",
             "unset it for a seeded random head", False),
            ("data.curate.aesthetic.clip.pretrained", _clip_file(aes.clip.pretrained) if aes.enabled else None,
             "the CLIP checkpoint", "point it at the file, or use an open_clip tag", False),
        ]  # fmt: skip
    if train and cfg.train.resume not in ("auto", "never"):
        fix = "use auto, never, or an existing step-N folder"
        wanted.append(("train.resume", cfg.train.resume, "the checkpoint directory", fix, True))
    resumes = resume_problems(cfg) if train else []  # a checkpoint of another model: refused before prep
    if ev:
        # a path this very run writes (its own export or checkpoint) need not exist before it starts
        model = e.model if e.model and not e.model.startswith("models:/") else None
        if stage == "run" and _under(model, cfg.train_dir):
            model = None
        fix = "use models:/NAME/VERSION, a step-N checkpoint or an export folder"
        wanted.append(("eval.model", model, "the model folder", fix, False))
        wanted.append(("eval.clip.pretrained", _clip_file(e.clip.pretrained), "the CLIP checkpoint",
                       "point it at the file, or use an open_clip tag", False))  # fmt: skip
        for i, b in enumerate(e.benchmarks):
            wanted.append((f"eval.benchmarks[{i}].tsv", b.tsv, "the benchmark TSV", "point it at the file", False))
        g = e.generation
        reference = g.reference if g.reference != "held_out" else None
        wanted.append(("eval.generation.reference", reference, "the reference folder",
                       "use held_out or a folder of videos/images", True))  # fmt: skip
        for key in ("inception_weights", "i3d_weights", "dino"):
            wanted.append((f"eval.generation.{key}", getattr(g, key), "the file", "unset it for a random init", False))
    found = (_missing(key, value, what, fix, folder) for key, value, what, fix, folder in wanted if value)
    out = [f for f in found if f] + resumes
    package = TASK_RUNNERS.get(d.task_runner)
    if prep and d.slices > 1 and d.nproc_per_node == 1 and package and importlib.util.find_spec(package) is None:
        extra = d.task_runner
        out.append(
            f"data.task_runner={extra} needs {package.replace('_', '-')}, which is not installed here: "
            f"pip install 'flowspeed[{extra}]', or use data.task_runner: process"
        )
    return out + _extra_problems(cfg, prep, train, ev)


def _extra_problems(cfg: PipelineConfig, prep: bool, train: bool, ev: bool) -> list[str]:
    """The optional stacks (pip extras) this config needs and this machine lacks, each with its install line;
    found without importing them (engines/common/extras.py, the same words the code's own guards use)."""
    from flowspeed.engines.common.extras import missing

    d, cur = cfg.data, cfg.data.curate
    needs = [
        (prep or ev) and d.decoder == "decord" and ("decord", "data.decoder: decord", "use data.decoder: pyav"),
        prep and cur.scene_split.enabled and ("scenedetect", "data.curate.scene_split"),
        prep and cur.motion.enabled and ("cv2", "data.curate.motion"),
        train and cfg.train.engine == "megatron" and ("megatron.core", "train.engine: megatron"),
        # WER/CER of the transcription family (evaluation/sequence_eval.py), scored after every transcript is made
        ev and cfg.model.family == "whisper" and ("jiwer", "the whisper eval (WER/CER)"),
    ]
    return [problem for need in needs if need and (problem := missing(*need))]


def _clip_file(value: str | None) -> str | None:
    """A CLIP `pretrained:` that names a checkpoint file (the loader's rule), not an open_clip tag."""
    return value if value and Path(value).suffix in {".pt", ".bin", ".safetensors"} else None


def _local(value: str | None) -> str | None:
    """`value` when it names a local path (checked), None for a hub id (the hub decides)."""
    return value if value and _looks_like_path(value) else None


def _under(value: str | None, folder: Path) -> bool:
    if not value:
        return False
    try:
        Path(value).expanduser().resolve().relative_to(Path(folder).resolve())
    except ValueError:
        return False
    return True


def explain(problems: list[str], source: str) -> str:
    """Problems as the error `load_config` and the CLI show: one paragraph each, under the config's name."""
    return f"invalid config {source}:\n  " + "\n  ".join(problems)


def check_stage(cfg: PipelineConfig, stage: str, source: str = "<config>") -> None:
    """Raise ConfigError when `stage` would read a path that is not there; call before writing anything."""
    if problems := stage_problems(cfg, stage):
        raise ConfigError(explain(problems, source))
