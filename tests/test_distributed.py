"""Data-parallel Long Exposure on the CPU: torchrun, gloo, 2 processes against 1, same global batch."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")
WORKER = Path(__file__).with_name("distributed_worker.py")


def run(tmp_path, processes: int, *args: str) -> dict:
    out = tmp_path / f"run-{processes}-{'-'.join(args)}.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--standalone", str(WORKER), str(out), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("wrapper,mode", [("ddp", "full"), ("ddp", "sparse"), ("fsdp", "sparse")])
def test_two_processes_give_the_single_process_losses(tmp_path, wrapper, mode):
    single = run(tmp_path, 1, wrapper, mode, "off")
    double = run(tmp_path, 2, wrapper, mode, "off")
    assert double["losses"] == pytest.approx(single["losses"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("action", ["dense", "retrain"])
def test_drift_decisions_agree_across_ranks(tmp_path, action):
    result = run(tmp_path, 2, "ddp", "sparse", action)
    assert (2, 1, "mlp", "dense" if action == "dense" else "retrained") in [tuple(e) for e in result["events"]]
    assert result["predictors_agree"]
