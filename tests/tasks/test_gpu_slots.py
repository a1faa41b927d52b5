"""Training takes slots of a per-node Prefect global concurrency limit: runs on one node queue."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from flowspeed.tasks.gpu_slots import gpu_slots, slot_name
from prefect.client.orchestration import get_client

from tests.conftest import QUICKSTART, REPO, make_config


def _limit(name: str) -> int:
    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name).limit


def test_two_trainings_on_one_node_do_not_overlap(tmp_path: Path, demo_manifest: Path) -> None:
    cfg = make_config(tmp_path, demo_manifest, "train.gpu_slots.name=gpu-test-node-a")
    spans: list[tuple[float, float]] = []

    def train_like() -> None:
        with gpu_slots(cfg):
            start = time.monotonic()
            time.sleep(1.0)
            spans.append((start, time.monotonic()))

    with get_client(sync_client=True) as client:  # the ephemeral API starts once, as inside a flow run
        client.hello()
    threads = [threading.Thread(target=train_like) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(spans) == 2
    (a0, a1), (b0, b1) = sorted(spans)
    assert b0 >= a1, f"both held the node's only slot at once: {spans}"
    assert _limit("gpu-test-node-a") == 1  # created on first use, one slot on a CPU node


def test_size_comes_from_config_and_an_impossible_request_says_so(tmp_path: Path, demo_manifest: Path) -> None:
    cfg = make_config(tmp_path, demo_manifest, "train.gpu_slots.name=gpu-test-pool-b", "train.gpu_slots.size=2",
                      "train.gpu_slots.occupy=2")  # fmt: skip
    with gpu_slots(cfg) as name:
        assert name == "gpu-test-pool-b" and _limit(name) == 2
    too_many = make_config(tmp_path, demo_manifest, "train.gpu_slots.name=gpu-test-pool-b", "train.gpu_slots.occupy=3")
    with pytest.raises(ValueError, match=r"needs 3 slot\(s\).*which has 2.*train.gpu_slots.size"):
        with gpu_slots(too_many):
            pass
    assert slot_name(make_config(tmp_path, demo_manifest)).startswith("gpu-")
    off = make_config(tmp_path, demo_manifest, "train.gpu_slots.enabled=false")
    with gpu_slots(off) as name:
        assert name is None


_HOLDER = """
import sys, time
from flowspeed.configs import load_config
from flowspeed.tasks.gpu_slots import gpu_slots
cfg = load_config(sys.argv[1], sys.argv[2:])
with gpu_slots(cfg):
    print("holding", flush=True)
    time.sleep(600)
"""


@pytest.mark.slow
def test_a_sigkilled_holder_does_not_keep_its_slot(
    tmp_path: Path, demo_manifest: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The resume of a SIGKILLed training used to wait forever, silently, for the slot the dead run held."""
    from prefect.server.api.server import SubprocessASGIServer

    overrides = [f"data.manifest={demo_manifest}", "train.gpu_slots.name=gpu-test-node-killed"]
    api = SubprocessASGIServer()  # this process's ephemeral API, which the holder uses too (no server of its own)
    api.start(timeout=120)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(QUICKSTART), *overrides], cwd=REPO,
                              env=os.environ | {"PREFECT_API_URL": api.api_url},
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    helpers: list[psutil.Process] = []
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        helpers = psutil.Process(holder.pid).children(recursive=True)  # anything it started
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        cfg = make_config(tmp_path, demo_manifest, "train.gpu_slots.name=gpu-test-node-killed",
                          "train.gpu_slots.poll_s=0.5", "train.gpu_slots.timeout_s=30")  # fmt: skip
        start = time.monotonic()
        with gpu_slots(cfg) as name:
            waited = time.monotonic() - start
            assert name == "gpu-test-node-killed"
    finally:
        for proc in [holder, *helpers]:
            with contextlib.suppress(ProcessLookupError, psutil.NoSuchProcess):
                proc.kill()
    assert waited < 15, f"the dead holder's slot came back only after {waited:.0f} s"
    err = capsys.readouterr().err
    assert f"released 1 slot(s) of gpu-test-node-killed kept by a dead process: pid {holder.pid} on " in err, err
    assert "flow run" in err and "since" in err


def test_a_waiting_run_names_the_live_holder_and_gives_up_at_its_timeout(
    tmp_path: Path, demo_manifest: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["train.gpu_slots.name=gpu-test-node-busy", "train.gpu_slots.poll_s=0.3"]
    with gpu_slots(make_config(tmp_path, demo_manifest, *base)):
        queued = make_config(tmp_path, demo_manifest, *base, "train.gpu_slots.timeout_s=1.5")
        with pytest.raises(TimeoutError, match=rf"gave up after .* held by pid {os.getpid()} on "):
            with gpu_slots(queued):
                pass
    err = capsys.readouterr().err
    assert "waiting" in err and f"held by pid {os.getpid()} on {socket.gethostname()}" in err, err
    with gpu_slots(queued):  # the record went with the slot: nobody is named any more
        pass
