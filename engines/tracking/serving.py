"""The training export as an MLflow pyfunc model, in place: a registered version with a signature.

The registry points a model version at the export folder (`train/final`), a diffusers or
transformers release layout. MLflow only treats a folder as a model when it holds an `MLmodel`
file, and only a model with a signature says what a client must send. `write_mlmodel` adds that
file (and the environment files MLflow writes beside it) to the export itself, using MLflow's
custom-loader pyfunc pattern (`loader_module` = this module, `data` = the folder), so nothing is
copied: gigabytes of weights stay where the trainer wrote them, and the folder still loads with
`from_pretrained` as before.

    write_mlmodel(final_dir, cfg)
    mlflow.models.get_model_info(str(final_dir)).signature  # == signature_for(cfg.model.family)
    mlflow.pyfunc.load_model("models:/name/1").predict(pd.DataFrame({"prompt": ["a red circle"]}))

What a predict takes and returns, per family:

- generation (text-to-video/image): `prompt` (+ optional `image`, a local path, for image-to-video
  families) -> `prompt`, `path`: one mp4 per prompt (a png for image families) in a fresh folder
  under the `output_dir` param (default: a new temporary folder, which the caller owns);
- understanding (VLMs): `prompt` + optional `image` (a local image, or a video for families that
  read video) -> `response`;
- speech: `audio` (a local path, any format ffmpeg decodes) -> `response` (the transcript).

Each prediction runs the family's own inference (`generate` / `respond`), with the defaults the
model was evaluated with, stored beside the MLmodel in `flowspeed_serving.json`; the optional
params of the signature override them per call.

A generating model whose eval ran on several ranks (`eval.nproc_per_node`, `eval.parallel`) serves with the same
layout: predict runs the generation as a torchrun job on this machine (engines/tracking/parallel_predict.py), where
prompts are split across dp groups and each video is made by its group's cfg x cp ranks. The files and the returned
DataFrame are those of one process; a settings file without `parallel` (written before it existed) means one process.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from flowspeed.configs import PipelineConfig
from flowspeed.configs.schema import DataConfig, EvalParallelConfig, ModelConfig
from flowspeed.datasets_prep.mp4 import write_sample
from flowspeed.engines.common.io import atomic_write, atomic_write_text
from flowspeed.engines.models import ModelFamily, get_family
from flowspeed.engines.models.registry import Capability
from flowspeed.engines.models.sequence import SequenceSample
from flowspeed.engines.torch_engine.sampling import SamplingLayout
from flowspeed.engines.tracking.environment import pip_requirements
from flowspeed.engines.tracking.parallel_predict import predict_parallel, read_rgb
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

MLMODEL = "MLmodel"
SETTINGS = "flowspeed_serving.json"
SETTINGS_VERSION = 1
LOADER_MODULE = "flowspeed.engines.tracking.serving"  # what MLflow imports to call `_load_pyfunc`: this module
#: the environment MLflow writes beside an MLmodel (what `mlflow models serve` and `load_model` check or build)
ENV_FILES = ("requirements.txt", "python_env.yaml", "conda.yaml", "constraints.txt")
SPEECH_SAMPLING_RATE = 16000  # what prep decodes audio at for every speech family (Whisper's rate)


def _generates(family: ModelFamily) -> bool:
    """Whether a predict generates media (else it answers or transcribes); a family that can do neither has
    nothing to serve."""
    if family.can(Capability.GENERATION):
        return True
    if family.can(Capability.ANSWERS) or family.can(Capability.TRANSCRIPTION):
        return False
    raise ValueError(f"model family {family.name!r} neither generates nor responds: there is nothing to serve")


def signature_for(family_name: str) -> ModelSignature:
    """The columns a client sends and gets back for this family; media travel as local paths.

    Paths rather than bytes or arrays keep the schema plain strings: videos and audio are large,
    and every caller of a local pyfunc already shares a filesystem with it. Every param defaults
    to None, meaning "what this export was evaluated with" (flowspeed_serving.json), because a
    signature is per family while the defaults are per trained model.
    """
    family = get_family(family_name)
    if _generates(family):
        inputs = [ColSpec("string", "prompt")]
        if family.conditioning == "image":  # image-to-video: the first frame, or the family's default one
            inputs.append(ColSpec("string", "image", required=False))
        params = [
            ParamSpec("num_inference_steps", "long", None),
            ParamSpec("guidance_scale", "double", None),
            ParamSpec("seed", "long", None),
            ParamSpec("output_dir", "string", None),
        ]
        return ModelSignature(
            inputs=Schema(inputs),
            outputs=Schema([ColSpec("string", "prompt"), ColSpec("string", "path")]),
            params=ParamSchema(params),
        )
    if family.can(Capability.TRANSCRIPTION):
        inputs = [ColSpec("string", "audio")]
    else:
        inputs = [ColSpec("string", "prompt"), ColSpec("string", "image", required=False)]
    return ModelSignature(
        inputs=Schema(inputs),
        outputs=Schema([ColSpec("string", "response")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", None)]),
    )


def serving_settings(cfg: PipelineConfig) -> dict[str, Any]:
    """The run's inference defaults, so a served model generates as its eval did.

    Media inputs are resized like training data (data.height/width/num_frames/decoder), which is
    what the model has seen; max_new_tokens is the eval stage's own choice.
    """
    d, e, m = cfg.data, cfg.eval, cfg.model
    return {
        "version": SETTINGS_VERSION,
        "family": m.family,
        "num_frames": d.num_frames,
        "height": d.height,
        "width": d.width,
        "decoder": d.decoder,
        "num_inference_steps": e.num_inference_steps,
        "guidance_scale": e.guidance_scale,
        "seed": e.seed,
        "fps": e.fps,
        "max_text_length": m.max_text_length,
        "max_new_tokens": m.max_text_length // 4
        or 16,  # as flowspeed.evaluation.sequence_eval answers held-out samples
        # the eval's ranks and how they shared each video: a generating model serves with the same layout
        "parallel": {**e.parallel.model_dump(mode="json"), "nproc": e.nproc_per_node},
    }


def serving_layout(settings: dict[str, Any], family: ModelFamily) -> SamplingLayout:
    """The ranks a predict generates on: the stored `parallel` block (the eval's layout), one process when the
    settings predate it. Only generation runs as a job: an answering model's eval ranks split items, which one
    request's few rows do not need, so it serves in process whatever its eval used."""
    stored = settings.get("parallel")
    if not stored or not _generates(family):
        return SamplingLayout()
    stored = dict(stored)
    nproc = stored.pop("nproc", 1)
    try:
        return SamplingLayout.of(EvalParallelConfig(**stored), nproc)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise ValueError(f"{SETTINGS}: `parallel` {settings['parallel']} is not a layout: {exc}; rewrite it with "
                         "flowspeed.engines.tracking.serving.write_mlmodel") from exc  # fmt: skip


def _serving_extras(family: ModelFamily, cfg: PipelineConfig) -> list[str]:
    """flowspeed's extras a prediction needs: a VLM's video inputs are decoded as prep did (`data.decoder`), and
    decord is the `video-decode` extra; generation reads at most an image (PIL), speech decodes with PyAV."""
    return ["video-decode"] if family.can(Capability.ANSWERS) and cfg.data.decoder == "decord" else []


def write_mlmodel(export_dir: Path, cfg: PipelineConfig) -> Path:
    """Make the export folder a pyfunc model in place; returns the MLmodel path.

    Beside the MLmodel go the environment files MLflow's `save_model` writes (requirements.txt with
    flowspeed and its dependencies pinned as installed, see engines/tracking/environment.py;
    python_env.yaml; conda.yaml), so `mlflow.pyfunc.load_model` and `mlflow models serve` work in a
    fresh virtualenv holding only flowspeed, and `--env-manager virtualenv|uv|conda` can build one.
    Every file is replaced atomically, so a registry or server reading the folder meanwhile sees
    the old description or the new one, never half of one; rerunning simply rewrites them. The
    MLmodel is written last: its presence is what makes the folder a model, so it only appears
    once the settings and environment it relies on are there.
    """
    export_dir = Path(export_dir)
    family = get_family(cfg.model.family)
    marker = family.export_files(export_dir)[0]
    if not marker.is_file():
        raise FileNotFoundError(
            f"no {cfg.model.family} export at {export_dir} ({marker.name} is missing): run `flowspeed train` first"
        )
    atomic_write_text(export_dir / SETTINGS, json.dumps(serving_settings(cfg), indent=2, sort_keys=True) + "\n")
    with tempfile.TemporaryDirectory(prefix="flowspeed-mlmodel-") as scratch, warnings.catch_warnings():
        # its advice to log an input example: running a prediction to check one would load the weights
        warnings.filterwarnings("ignore", message=".*An input example was not provided")
        # MLflow's own save_model writes the model description and its environment (requirements.txt,
        # python_env.yaml, conda.yaml) into an empty folder; no data is given, so nothing is copied there.
        saved = Path(scratch) / "model"
        mlflow.pyfunc.save_model(
            saved,
            loader_module=LOADER_MODULE,
            signature=signature_for(cfg.model.family),
            metadata={"flowspeed_family": cfg.model.family},
            pip_requirements=pip_requirements(_serving_extras(family, cfg)),
        )
        model = Model.load(str(saved / MLMODEL))
        for name in ENV_FILES:  # one that MLflow did not write this time must not linger from an earlier write
            if (saved / name).is_file():
                atomic_write_text(export_dir / name, (saved / name).read_text())
            else:
                (export_dir / name).unlink(missing_ok=True)
    # data="." : MLflow hands _load_pyfunc the folder itself, where from_pretrained finds the weights.
    model.flavors["python_function"]["data"] = "."
    model.model_size_bytes = sum(p.stat().st_size for p in export_dir.rglob("*") if p.is_file())
    return atomic_write(export_dir / MLMODEL, lambda tmp: model.save(str(tmp)))


# ---- loading and prediction (what MLflow calls) ---------------------------------------------------
def _records(model_input: Any) -> list[dict[str, Any]]:
    """Rows as dicts from what pyfunc callers send: a DataFrame, a list of dicts, or one dict."""
    if isinstance(model_input, pd.DataFrame):
        return model_input.to_dict("records")
    if isinstance(model_input, dict):  # columns of values, or a single row
        if any(isinstance(v, list | tuple | pd.Series | np.ndarray) for v in model_input.values()):
            return pd.DataFrame(model_input).to_dict("records")
        return [dict(model_input)]
    if isinstance(model_input, list) and all(isinstance(r, dict) for r in model_input):
        return [dict(r) for r in model_input]
    raise TypeError(f"predict takes a pandas DataFrame or a list of dicts, not {type(model_input).__name__}")


def _text(row: dict[str, Any], key: str) -> str | None:
    """A cell as text; missing, None or NaN (pandas' empty optional cell) is None."""
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value)


def _required(rows: list[dict[str, Any]], key: str) -> list[str]:
    values = [_text(r, key) for r in rows]
    missing = [i for i, v in enumerate(values) if v is None]
    if missing:
        raise ValueError(f"rows {missing} have no {key!r}: every row needs one")
    return values  # type: ignore[return-value]


def _media_path(value: str, column: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{column} file not found: {path}; pass a local path readable by the model server")
    return path


class FlowspeedPyfunc:
    """The pyfunc implementation over one export folder: the family's inference with stored defaults.

    Weights are loaded by the family on each predict (its `generate` / `respond` take the export
    folder), so an idle server holds no model in memory and always serves what is on disk.
    """

    def __init__(self, export_dir: Path, settings: dict[str, Any]) -> None:
        self.export_dir = export_dir
        self.settings = settings
        self.family = get_family(settings["family"])
        self.layout = serving_layout(settings, self.family)  # checked at load: a bad block fails load_model
        # load_sample reads only these fields: media are decoded and resized exactly as prep did.
        self.media_cfg = PipelineConfig(
            data=DataConfig(
                num_frames=settings["num_frames"],
                height=settings["height"],
                width=settings["width"],
                decoder=settings["decoder"],
            ),
            model=ModelConfig(family=settings["family"], max_text_length=settings["max_text_length"]),
        )

    def _param(self, params: dict[str, Any] | None, name: str) -> Any:
        value = (params or {}).get(name)
        return self.settings[name] if value is None else value

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from flowspeed.engines.common.device import resolve_device

        rows = _records(model_input)
        device = resolve_device("auto")
        if _generates(self.family):
            return self._generate(rows, params, device)
        return self._respond(rows, params, device)

    def _generate(
        self, rows: list[dict[str, Any]], params: dict[str, Any] | None, device: torch.device
    ) -> pd.DataFrame:
        prompts = _required(rows, "prompt")
        if not prompts:
            return pd.DataFrame({"prompt": pd.Series(dtype=str), "path": pd.Series(dtype=str)})
        s = self.settings
        images: list[Path] | None = None
        if self.family.conditioning == "image":
            given = [_text(r, "image") for r in rows]
            if any(given):
                if not all(given):
                    raise ValueError("some rows have an `image` and some do not: give every row one, or none")
                images = [_media_path(p, "image") for p in given]  # type: ignore[arg-type]
        sampling = {
            "num_frames": s["num_frames"],
            "height": s["height"],
            "width": s["width"],
            "steps": int(self._param(params, "num_inference_steps")),
            "guidance_scale": float(self._param(params, "guidance_scale")),
            "seed": int(self._param(params, "seed")),
        }
        if self.layout.world == 1:
            kwargs = {"images": [read_rgb(p) for p in images]} if images else {}
            videos = self.family.generate(self.export_dir, prompts, device=device, **sampling, **kwargs)
            folder = self._output_folder(params)
            paths = [str(write_sample(folder, i, v, s["fps"])) for i, v in enumerate(videos)]
        else:  # the stored layout's ranks, as a torchrun job that writes into the folder
            folder = self._output_folder(params)
            firsts = [str(p.resolve()) for p in images] if images else None  # absolute in the request the ranks read
            try:
                paths = predict_parallel(self.family.name, self.export_dir, prompts, firsts, sampling, s["fps"], folder,
                                         self.layout)  # fmt: skip
            except BaseException:  # a failed job's partial videos are no answer: the caller gets the error only
                shutil.rmtree(folder, ignore_errors=True)
                raise
        return pd.DataFrame({"prompt": prompts, "path": paths})

    @staticmethod
    def _output_folder(params: dict[str, Any] | None) -> Path:
        """A fresh folder per call under `output_dir` (or a new temporary one): two predicts into one output_dir
        never overwrite each other."""
        root = (params or {}).get("output_dir")
        if root:
            Path(root).mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="flowspeed-predict-", dir=root or None))

    def _samples(self, rows: list[dict[str, Any]]) -> list[SequenceSample]:
        family = self.family
        if family.can(Capability.TRANSCRIPTION):
            from flowspeed.datasets_prep.audio import load_audio

            rate = SPEECH_SAMPLING_RATE
            paths = [_media_path(p, "audio") for p in _required(rows, "audio")]
            return [SequenceSample(audio=load_audio(p, rate), sampling_rate=rate) for p in paths]
        from flowspeed.datasets_prep.manifest import Entry
        from flowspeed.datasets_prep.sequence_prep import load_sample

        samples = []
        for i, (prompt, row) in enumerate(zip(_required(rows, "prompt"), rows, strict=True)):
            turns = [{"role": "user", "content": prompt}]
            image = _text(row, "image")
            if image is None:
                samples.append(SequenceSample(messages=turns))
                continue
            # A one-turn conversation through prep's own loader: the media is probed (image or video),
            # decoded and resized as training data was, and refused as prep would refuse it.
            path = _media_path(image, "image")
            samples.append(load_sample(Entry(i + 1, path, None, (path,), {"messages": turns}), family, self.media_cfg))
        return samples

    def _respond(self, rows: list[dict[str, Any]], params: dict[str, Any] | None, device: torch.device) -> pd.DataFrame:
        family = self.family
        samples = self._samples(rows)
        if not samples:
            return pd.DataFrame({"response": pd.Series(dtype=str)})
        answers = family.respond(
            self.export_dir, samples, max_new_tokens=int(self._param(params, "max_new_tokens")), device=device
        )
        return pd.DataFrame({"response": answers})


def write_pointer_model(export_dir: Path, dst: Path) -> Path:
    """A copy of the export's model description without its weights, naming where they are.

    A tracking server registers a version only from its own artifact store, and copying a 10 GB
    export there doubles storage. This folder (MLmodel, settings with `weights_at`, a few KB) is
    what gets logged and registered instead; loading it reads the weights from `weights_at`, which
    must be on storage the readers share (the cluster filesystem the training wrote to).
    """
    export_dir, dst = Path(export_dir).resolve(), Path(dst)
    settings = json.loads((export_dir / SETTINGS).read_text())
    dst.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dst / SETTINGS, json.dumps({**settings, "weights_at": str(export_dir)}, indent=2,
                                                 sort_keys=True) + "\n")  # fmt: skip
    for name in ENV_FILES:  # the environment travels with the description: a registered version is servable
        if (export_dir / name).is_file():
            atomic_write_text(dst / name, (export_dir / name).read_text())
    atomic_write(dst / MLMODEL, lambda tmp: tmp.write_bytes((export_dir / MLMODEL).read_bytes()))
    return dst


def weights_dir(model_dir: Path) -> Path:
    """Where a model folder's weights are: the folder itself, or a pointer model's `weights_at`."""
    settings_file = Path(model_dir) / SETTINGS
    if settings_file.is_file():
        at = json.loads(settings_file.read_text()).get("weights_at")
        if at:
            if not Path(at).is_dir():
                raise FileNotFoundError(
                    f"{model_dir} points at weights in {at}, which this machine cannot see: "
                    "register with tracking.log_model=always, or share that filesystem"
                )
            return Path(at)
    return Path(model_dir)


def _load_pyfunc(data_path: str) -> FlowspeedPyfunc:
    """MLflow's entry point for `loader_module`: `data_path` is the export folder (data=".")
    or a pointer model (see `write_pointer_model`)."""
    export_dir = weights_dir(Path(data_path).resolve())
    settings_file = Path(data_path).resolve() / SETTINGS
    if not settings_file.is_file():
        raise FileNotFoundError(
            f"{settings_file} is missing: write the MLmodel with flowspeed.engines.tracking.serving.write_mlmodel"
        )
    settings = json.loads(settings_file.read_text())
    if settings.get("version") != SETTINGS_VERSION:
        raise ValueError(
            f"{settings_file} is format {settings.get('version')!r}, this flowspeed reads {SETTINGS_VERSION}: "
            "rewrite it with flowspeed.engines.tracking.serving.write_mlmodel"
        )
    return FlowspeedPyfunc(export_dir, settings)
