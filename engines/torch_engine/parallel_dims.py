"""The parallel layout: how the world's ranks split into pipeline, data, context and tensor groups.

    dims = ParallelDims(dp_replicate=1, dp_shard=-1, cp=1, tp=2, pp=1, world_size=8)  # dp_shard -> 4
    mesh = dims.build_mesh("cuda")        # one DeviceMesh, dims ("pp", "dp_replicate", "dp_shard", "cp", "tp")
    mesh["tp"], mesh["dp"], mesh["dp_shard"]  # sub-meshes; "dp" is dp_replicate x dp_shard flattened

Validated at construction, before any model is built: a layout that does not multiply to the world
size fails in milliseconds with every factor in the message, not minutes later inside a collective.
The mesh keeps size-1 dims so code can always ask for mesh["tp"] without checking whether TP is on.
Order (outermost first) follows where the traffic is heaviest: TP innermost (inside a node), then CP,
then the FSDP shard group, then the replicate group, then PP across nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    pp: int
    world_size: int

    def __post_init__(self) -> None:
        named = {"dp_replicate": self.dp_replicate, "cp": self.cp, "tp": self.tp, "pp": self.pp}
        bad = {k: v for k, v in named.items() if v < 1}
        if bad or self.dp_shard == 0 or self.dp_shard < -1:
            raise ValueError(
                f"parallel degrees must be >= 1 (dp_shard may be -1 for 'the rest'); got {self._factors()}"
            )
        fixed = self.dp_replicate * self.cp * self.tp * self.pp
        if self.dp_shard == -1:
            if self.world_size % fixed:
                raise ValueError(
                    f"impossible parallel layout: world size {self.world_size} is not divisible by "
                    f"dp_replicate*cp*tp*pp = {self._factors(dp_shard='?')} = {fixed}; change train.parallel "
                    "or the number of ranks (nnodes x nproc_per_node)"
                )
            object.__setattr__(self, "dp_shard", self.world_size // fixed)
        if fixed * self.dp_shard != self.world_size:
            raise ValueError(
                f"impossible parallel layout: dp_replicate*dp_shard*cp*tp*pp = {self._factors()} = "
                f"{fixed * self.dp_shard}, but the world size is {self.world_size}; the degrees must multiply "
                "to the number of ranks (set one of them to fit, or dp_shard: -1 to take the rest)"
            )

    def _factors(self, **override: object) -> str:
        vals = {"dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard, "cp": self.cp, "tp": self.tp}
        vals |= {"pp": self.pp, **override}
        return " x ".join(f"{k}={v}" for k, v in vals.items())

    @property
    def dp(self) -> int:
        """Ranks that see different data: the replicate and shard groups together."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp(self) -> bool:
        return self.dp_shard > 1

    @property
    def ddp(self) -> bool:
        """Pure replication: DDP. With dp_shard > 1 as well, replication is HSDP's outer dim instead."""
        return self.dp_replicate > 1 and self.dp_shard == 1

    def describe(self) -> str:
        return self._factors()

    def build_mesh(self, device_type: str) -> Meshes:
        sizes = (self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp)
        root = init_device_mesh(device_type, sizes, mesh_dim_names=MESH_DIMS)
        # Flattened views, kept here (torch wants flattened meshes bookkept, not re-sliced from the
        # root): the data-parallel group (sampler, loss averaging) and data x context ranks.
        flat = {
            "dp": root["dp_replicate", "dp_shard"]._flatten("dp"),
            "dp_cp": root["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp"),
        }
        return Meshes(root, flat)


class Meshes:
    """The root mesh plus its flattened views: meshes["tp"], meshes["dp"], meshes["dp_replicate", "dp_shard"]."""

    def __init__(self, root: DeviceMesh, flat: dict[str, DeviceMesh]) -> None:
        self.root, self.flat = root, flat

    def __getitem__(self, names: str | tuple[str, ...]) -> DeviceMesh:
        if isinstance(names, str) and names in self.flat:
            return self.flat[names]
        return self.root[names]


def dp_coordinates(mesh: Meshes) -> tuple[int, int]:
    """(this rank's index among the data-parallel ranks, their number)."""
    dp = mesh["dp"]
    return dp.get_local_rank(), dp.size()
