"""The training log in the store: runs with lineage, evaluations, and one trainer per model."""

from __future__ import annotations

import time

import pytest

import honed
from honed.store.training import TrainerBusy


def test_a_run_records_config_data_lineage_and_outcome(store_url: str) -> None:
    store = honed.open_store(store_url)
    run = store.start_training_run("agent", "sft", parent="agent@v1", config={"lr": 5e-4}, owner="me")
    assert run.status == "running" and run.ended_at is None
    assert store.add_training_examples(run.id, ["t1", "t2", "t1"]) == 2
    store.update_training_run(run.id, data={"rows": 10})
    done = store.update_training_run(
        run.id, status="rejected", data={"passed": 7}, metrics={"loss": 0.5}, reason="worse on held-out"
    )
    assert done.ended_at is not None and done.data == {"rows": 10, "passed": 7}
    assert sorted(store.training_examples(run.id)) == ["t1", "t2"]
    ev = store.record_eval("agent", "agent@v2", "heldout", {"pass_at_1": 0.4}, training_run=run.id)
    assert store.eval_runs("agent")[-1].id == ev.id
    assert store.eval_runs("agent", version="agent@v1") == []
    latest = store.training_runs("agent")[0]
    assert (
        latest.status == "rejected" and latest.reason == "worse on held-out" and latest.config == {"lr": 5e-4}
    )
    store.close()


def test_one_trainer_per_model_and_an_expired_holder_is_taken_over(store_url: str) -> None:
    store = honed.open_store(store_url)
    other = honed.open_store(store_url)
    owner = store.acquire_trainer_lock("agent", owner="a", ttl_s=0.5)
    with pytest.raises(TrainerBusy, match="another trainer holds the lock"):
        other.acquire_trainer_lock("agent", owner="b")
    other.acquire_trainer_lock("another-model", owner="b")  # per model, not global
    run = store.start_training_run("agent", "sft", parent=None, config={}, owner=owner)
    time.sleep(0.6)  # holder crashed: its lock expires, its running run is marked interrupted
    assert other.acquire_trainer_lock("agent", owner="b") == "b"
    left = store.training_run(run.id)
    assert left.status == "interrupted" and "live version was not changed" in left.reason
    assert store.trainer_lock_holder("agent") == "b"
    other.release_trainer_lock("agent", "b")
    with store.trainer_lock("agent") as me:
        assert store.trainer_lock_holder("agent") == me
    assert store.trainer_lock_holder("agent") is None
    store.close()
    other.close()


def _model_files(folder):
    from test_registry import fake_model  # the files the registry's checks pass

    return fake_model(folder)


def test_a_trainer_killed_on_this_machine_frees_its_lock_and_its_candidate_is_rejected(
    store_url: str, tmp_path
) -> None:
    """A QA pass (session 15): a cycle killed with kill -9 (the OOM killer mid-training) held the
    model's lock for six hours, and the candidate it had registered stayed `candidate` forever."""
    import socket
    import subprocess
    import sys

    store = honed.open_store(store_url)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    from honed.store.training import default_owner

    here = default_owner().rpartition(":")[0]
    holder = f"{here}:{int(dead.stdout)}"  # a process of this machine, ended
    # A QA pass (session 16): a trainer in another pid namespace (a container with the same host
    # name) was judged gone, its lock taken and its run marked interrupted while it trained.
    # Its owner said only host:pid, which a container with the same host name also writes.
    store.acquire_trainer_lock("boxed", owner=f"{socket.gethostname()}:{int(dead.stdout)}", ttl_s=3600)
    with pytest.raises(TrainerBusy):
        store.acquire_trainer_lock("boxed", owner="b")
    store.acquire_trainer_lock("agent", owner=holder, ttl_s=3600)
    run = store.start_training_run("agent", "sft", parent=None, config={}, owner=holder)
    orphan = store.register_model("agent", _model_files(tmp_path / "v1"), training_run=run.id)
    # What `honed status` reads meanwhile (a QA pass, session 17: "trainer running" for the lock's
    # whole ttl, the run `running`): nobody holds it, the run was interrupted.
    from honed.cli.loop import loop_status

    assert store.trainer_lock_holder("agent") is None
    (shown,) = loop_status(store, "agent")["models"]
    assert shown["trainer"] is None and shown["last_run"]["status"] == "interrupted"
    assert store.trainer_lock_holder("boxed") is not None  # another pid space: alive until its ttl
    store.acquire_trainer_lock("other", owner="elsewhere:1", ttl_s=3600)
    with pytest.raises(TrainerBusy):  # a holder on another machine keeps it until it expires
        store.acquire_trainer_lock("other", owner="b")
    assert store.acquire_trainer_lock("agent", owner="b") == "b"
    assert store.training_run(run.id).status == "interrupted"
    assert store.model_version("agent", orphan.version).status == "rejected"
    store.close()


def test_a_held_lock_is_renewed_for_as_long_as_its_block_runs(store_url: str) -> None:
    """Never renewed, a lock held past its time was taken over mid-run (a QA pass, session 14)."""
    import time

    store, other = honed.open_store(store_url), honed.open_store(store_url)
    with store.trainer_lock("agent", ttl_s=0.6) as owner:
        time.sleep(1.5)  # two and a half times its ttl
        with pytest.raises(TrainerBusy):
            other.acquire_trainer_lock("agent", owner="b")
        assert other.trainer_lock_holder("agent") == owner
    assert other.trainer_lock_holder("agent") is None  # released at the end of the block


def test_migration_0004_downgrades_and_upgrades(store_url: str) -> None:
    from alembic import command
    from sqlalchemy import inspect

    from honed.store.store import _alembic_config

    store = honed.open_store(store_url)
    config = _alembic_config()
    with store.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0003")
    assert "training_runs" not in inspect(store.engine).get_table_names()
    with store.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
    tables = set(inspect(store.engine).get_table_names())
    assert {"training_runs", "training_examples", "eval_runs", "trainer_locks"} <= tables
    store.close()


def test_a_trainer_killed_after_its_promotion_leaves_the_run_promoted(store_url: str, tmp_path) -> None:
    """A QA pass (session 19): killed between the gate's promotion and the run's record, the run
    was taken over as "interrupted; the live version was not changed" beside its own promotion."""
    store = honed.open_store(store_url)
    base = store.register_model("agent", _model_files(tmp_path / "v1"))
    store.promote("agent", base.version)
    owner = store.acquire_trainer_lock("agent", owner="a", ttl_s=0.3)
    run = store.start_training_run("agent", "sft", parent=base.ref, config={}, owner=owner)
    candidate = store.register_model("agent", _model_files(tmp_path / "v2"), parent=base, training_run=run.id)
    store.promote("agent", candidate.version, expected_live=base.version, actor="trainer")
    time.sleep(0.4)  # the trainer was killed here: its lock expires
    assert store.acquire_trainer_lock("agent", owner="b") == "b"
    after = store.training_run(run.id)
    assert after.status == "promoted" and "after promoting its candidate (agent@v2)" in after.reason
    assert store.live_version("agent").ref == candidate.ref
    store.close()
