"""A cycle under `torchrun`: every rank trains, selection, the gate and promotion happen once.

Two launches of the same SFT cycle (`distributed_cycle.py`) on the tiny model, on CPU over gloo:
`torchrun --nproc_per_node 2` with 2 rows per device, and one process with 4. Same rows, same
global batch, same seed: the losses must agree, and the store must show one cycle's worth of
records whatever the number of processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import honed
from tiny_model import _ROOT, tool_model_path

NAME = "adder"
SCRIPT = Path(__file__).parent / "distributed_cycle.py"
TORCHRUN = Path(sys.executable).parent / "torchrun"


def launch(command: list[str], batch: int, tmp_path: Path, name: str) -> dict[int, dict[str, Any]]:
    """A store with a blank live version, the cycle run by `command`, each rank's result."""
    tool_model_path()  # builds the blank sibling `tool-base` too
    url = f"sqlite:///{tmp_path / name}.db"
    store = honed.open_store(url)
    blank = store.register_model(NAME, _ROOT / "tool-base", reason="a model that knows nothing")
    store.promote(NAME, blank.version, expected_live=None)
    out = tmp_path / name
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [*command, str(SCRIPT), url, str(out), str(batch)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-6000:])
    return {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in out.glob("result-*.json")}


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to this Python")
def test_one_cycle_under_torchrun_registers_one_candidate_and_trains_like_one_process(tmp_path: Path) -> None:
    two = launch([str(TORCHRUN), "--standalone", "--nproc_per_node", "2"], 2, tmp_path, "two")
    one = launch([sys.executable], 4, tmp_path, "one")
    assert sorted(two) == [0, 1] and sorted(one) == [0]
    main, worker, alone = two[0], two[1], one[0]
    assert main["world_size"] == 2 and alone["world_size"] == 1

    # The main process ran the cycle; the other rank only trained, on the same run.
    assert main["status"] in ("promoted", "rejected"), main["reason"]
    assert worker["status"] == "worker" and worker["promoted"] is None, worker["reason"]
    assert worker["run_id"] == main["run_id"] and "trained with the main process" in worker["reason"]

    store = honed.open_store(f"sqlite:///{tmp_path / 'two'}.db")
    versions = store.versions(NAME)
    assert [v.version for v in versions] == [1, 2], "exactly one candidate registered"
    assert versions[1].ref == main["candidate"] and versions[1].training_run == main["run_id"]
    promotions = [e for e in store.model_history(NAME) if e.action == "promote" and e.version == 2]
    assert len(promotions) == (1 if main["status"] == "promoted" else 0) <= 1
    assert [r.id for r in store.training_runs(NAME)] == [main["run_id"]]
    assert len(store.eval_runs(NAME, split="heldout")) == 2, "the gate ran once: live and candidate"
    assert store.trainer_lock_holder(NAME) is None

    # Same rows, global batch and seed: the same steps and (up to float sums) the same loss.
    m, w, a = main["metrics"], worker["metrics"], alone["metrics"]
    assert m["steps"] == a["steps"] == 4 and m["samples"] == a["samples"] == 16
    assert m["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3), (m, a)
    assert w["train_loss"] == pytest.approx(m["train_loss"], rel=1e-6)
    assert m["tokens"] == a["tokens"] > 0
