"""MLflow model registry with evaluation gates: a new version becomes `champion` only when it is better.

    decision = register_and_promote(uri, "flowspeed-nightly", source, run_id, metrics, gates)
    decision.alias  # "champion" (every gate passed, or there was none) or "challenger"

Each version carries its eval metrics as tags (`metric.eval/val_loss`), so a gate compares against
the champion without reading its run. The champion alias never moves on a failed gate: a nightly
finetune that got worse leaves production where it was, with the reasons on the version.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowspeed.configs.schema import GateConfig
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

CHAMPION, CHALLENGER = "champion", "challenger"


@dataclass
class Decision:
    name: str
    version: str
    alias: str
    reasons: list[str] = field(default_factory=list)
    champion_before: str | None = None

    @property
    def promoted(self) -> bool:
        return self.alias == CHAMPION

    def markdown(self) -> str:
        head = f"**{self.name}** version {self.version} -> `{self.alias}`"
        before = f" (champion before: version {self.champion_before})" if self.champion_before else ""
        return head + before + "\n\n" + "\n".join(f"- {r}" for r in self.reasons)


def check_gates(candidate: dict[str, float], champion: dict[str, float] | None, gates: list[GateConfig]) -> tuple:
    """(all passed, one reason per gate)."""
    if champion is None:
        return True, ["no champion yet: the first version becomes champion"]
    ok, reasons = True, []
    for g in gates:
        new, old = candidate.get(g.metric), champion.get(g.metric)
        if new is None or (isinstance(new, float) and math.isnan(new)):
            ok = False
            reasons.append(f"{g.metric}: the candidate has no value; cannot show it is better")
            continue
        if old is None:
            reasons.append(f"{g.metric}: the champion has no value; passes ({new:.6g})")
            continue
        gain = (old - new) if g.direction == "lower" else (new - old)
        passed = gain >= g.min_improvement
        ok &= passed
        verdict = "passes" if passed else "fails"
        reasons.append(f"{g.metric} ({g.direction} is better): {new:.6g} vs champion {old:.6g}, improvement "
                       f"{gain:.6g} {'>=' if passed else '<'} required {g.min_improvement:g}: {verdict}")  # fmt: skip
    return ok, reasons


def version_metrics(client: MlflowClient, name: str, version: str) -> dict[str, float]:
    tags = client.get_model_version(name, version).tags
    return {k[len("metric.") :]: float(v) for k, v in tags.items() if k.startswith("metric.")}


def champion_version(client: MlflowClient, name: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:  # no such model, or no champion yet
        return None


def register_and_promote(
    uri: str, name: str, source: str, run_id: str | None, metrics: dict[str, float], gates: list[GateConfig]
) -> Decision:
    client = MlflowClient(uri)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="registered by flowspeed pipeline runs")
    before = champion_version(client, name)  # a str, like every version this module hands out
    champ = version_metrics(client, name, before) if before else None
    tags: dict[str, Any] = {f"metric.{k}": repr(float(v)) for k, v in metrics.items()}
    mv = client.create_model_version(name, source, run_id=run_id, tags=tags)
    passed, reasons = check_gates(metrics, champ, gates)
    alias = CHAMPION if passed else CHALLENGER
    client.set_registered_model_alias(name, alias, mv.version)
    client.set_model_version_tag(name, mv.version, "flowspeed.gate", "passed" if passed else "failed")
    client.set_model_version_tag(name, mv.version, "flowspeed.gate_reasons", "; ".join(reasons)[:4900])
    return Decision(name, str(mv.version), alias, reasons, before)


def resolve_version(uri: str, model_uri: str) -> tuple[str, str]:
    """`models:/NAME/VERSION` or `models:/NAME@ALIAS` -> (name, version): an alias is pinned to the
    version it points at now, so a result (and a cache key) names what was actually read."""
    if not model_uri.startswith("models:/"):
        raise ValueError(f"{model_uri!r} is not a registry URI: use models:/NAME/VERSION or models:/NAME@ALIAS")
    ref = model_uri[len("models:/") :]
    client = MlflowClient(uri)
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return name, str(client.get_model_version_by_alias(name, alias).version)
        name, _, version = ref.rpartition("/")
        if not name or not version.isdigit():
            raise ValueError(f"{model_uri!r}: use models:/NAME/VERSION or models:/NAME@ALIAS")
        return name, str(client.get_model_version(name, version).version)
    except MlflowException as exc:
        raise ValueError(f"{model_uri}: not in the registry at {uri} ({exc.message})") from exc


def fetch_version(uri: str, name: str, version: str, dst: Path) -> Path:
    """A version's files, copied under `dst/v<version>` once (a workdir's `final/` is replaced by every
    run, so a registered model must not be read in place)."""
    import mlflow.artifacts

    local = dst / f"v{version}"
    if not (local / ".complete").is_file():
        source = MlflowClient(uri).get_model_version(name, version).source
        tmp = dst / f".v{version}.tmp"
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp), tracking_uri=uri))
        shutil.rmtree(local, ignore_errors=True)
        os.replace(got, local)
        shutil.rmtree(tmp, ignore_errors=True)
        (local / ".complete").write_text(source)
    return local


def fetch_champion(uri: str, name: str, dst: Path) -> tuple[str, Path] | None:
    """(version, local folder) of the champion; None if there is none yet."""
    version = champion_version(MlflowClient(uri), name)
    if version is None:
        return None
    return version, fetch_version(uri, name, version, dst)
