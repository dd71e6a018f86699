"""The model registry in the store: versions, promotion with file checks, rollback, history, races."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

import honed
from honed.cli import app
from honed.store.registry import (
    ModelVersionInvalid,
    ModelVersionNotFound,
    NoLiveVersion,
    NoPreviousVersion,
    PromotionConflict,
    parse_model_ref,
    validate_model_files,
)


def fake_model(folder: Path, seed: int = 0) -> Path:
    """A folder that passes the file checks without torch: config, tokenizer, one tiny safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "qwen2", "vocab_size": 2, "hidden_size": 1, "seed": seed}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    return folder


@pytest.fixture
def store(store_url: str):
    with honed.open_store(store_url) as s:
        yield s


def test_register_promote_rollback_and_history(store, tmp_path: Path) -> None:
    v1 = store.register_model(
        "agent", fake_model(tmp_path / "v1"), metrics={"pass@1": 0.2}, reason="warm start"
    )
    v2 = store.register_model("agent", fake_model(tmp_path / "v2"), parent=v1, metrics={"pass@1": 0.3})
    v3 = store.register_model("agent", str(fake_model(tmp_path / "v3")), parent="agent@v2")
    assert [v.ref for v in (v1, v2, v3)] == ["agent@v1", "agent@v2", "agent@v3"]
    assert (v2.parent, v3.parent, v1.metrics) == (v1.id, v2.id, {"pass@1": 0.2})
    assert store.live_version("agent") is None
    assert {v.status for v in store.versions("agent")} == {"candidate"}

    store.promote("agent", 1, reason="first", actor="ci")
    store.promote("agent@v2")
    live = store.promote("agent", "v3")
    assert live.status == "live" and store.live_version("agent").ref == "agent@v3"
    assert [v.status for v in store.versions("agent")] == ["retired", "retired", "live"]
    assert store.promote("agent", 3).ref == "agent@v3"  # promoting the live version changes nothing

    assert store.rollback("agent", reason="regressed").ref == "agent@v2"
    assert [v.status for v in store.versions("agent")] == ["retired", "live", "rejected"]
    assert store.rollback("agent").ref == "agent@v1"  # skips v3, which was rolled back
    with pytest.raises(NoPreviousVersion):
        store.rollback("agent")
    assert store.live_pointer("agent")[1] == 5

    history = [(e.action, e.from_version, e.version) for e in store.model_history("agent")]
    assert history == [
        ("register", None, 1),
        ("register", None, 2),
        ("register", None, 3),
        ("promote", None, 1),
        ("promote", 1, 2),
        ("promote", 2, 3),
        ("rollback", 3, 2),
        ("rollback", 2, 1),
    ]
    events = store.model_history("agent")
    assert (events[0].reason, events[3].actor, events[3].reason, events[6].reason) == (
        "warm start",
        "ci",
        "first",
        "regressed",
    )
    assert all(e.actor for e in events)


def test_missing_or_corrupt_versions_are_refused_and_the_live_one_stays(store, tmp_path: Path) -> None:
    """Refused when registered (nothing recorded), and again at promotion if the files changed
    after registering: the live version stays."""
    pytest.importorskip("transformers")  # loaded, as in a server or a cycle: model types are checked
    store.register_model("agent", fake_model(tmp_path / "good"))
    store.promote("agent", 1)

    def truncate(folder: Path) -> None:
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-3])

    cases = {
        "truncated or corrupt": truncate,
        "not a valid safetensors file": lambda f: (f / "model.safetensors").write_bytes(b"\xff" * 64),
        "no config.json": lambda f: (f / "config.json").unlink(),
        # transformers would fill in its default sizes: a 7B random model nobody can serve
        "does not give the model's sizes": lambda f: (f / "config.json").write_text(
            '{"model_type": "llama"}'
        ),
        # tokenizer_config.json names a class, not the tokens: served, it tokenises wrongly
        "no tokenizer vocabulary": lambda f: (f / "tokenizer.json").rename(f / "tokenizer_config.json"),
        # ... and what a server parses at load (a QA pass promoted each of these, then served nothing)
        "tokenizer.json is not valid JSON": lambda f: (f / "tokenizer.json").write_text("{not json"),
        "which transformers does not know": lambda f: (f / "config.json").write_text(
            '{"model_type": "no_such_model", "vocab_size": 2, "hidden_size": 1}'
        ),
        # a tokenizer of another model: served, every request failed (a QA pass, session 15)
        "token ids up to 5 but the model's vocabulary has 2 rows": lambda f: (
            f / "tokenizer.json"
        ).write_text('{"model": {"vocab": {"a": 0, "b": 1}}, "added_tokens": [{"id": 5, "content": "<x>"}]}'),
        "not a valid safetensors file: 'list'": lambda f: (f / "model.safetensors").write_bytes(
            (2).to_bytes(8, "little") + b"[]"
        ),
        # a base model's tokenizer: every chat request failed to render (a QA pass, session 19)
        "no chat template": lambda f: (f / "chat_template.jinja").unlink(),
        "base model /nowhere/base does not exist": lambda f: (
            (f / "config.json").rename(f / "adapter_config.json"),
            (f / "adapter_config.json").write_text('{"base_model_name_or_path": "/nowhere/base"}'),
        ),
    }
    for i, (reason, corrupt) in enumerate(cases.items()):
        broken = fake_model(tmp_path / f"broken{i}")
        corrupt(broken)
        with pytest.raises(ModelVersionInvalid, match=reason):
            store.register_model("agent", broken)
        rotted = fake_model(tmp_path / f"rotted{i}")
        version = store.register_model("agent", rotted)
        corrupt(rotted)  # the files change after registering
        with pytest.raises(ModelVersionInvalid, match=reason) as caught:
            store.promote("agent", version.version)
        assert caught.value.ref == version.ref
        assert store.live_version("agent").version == 1
    with pytest.raises(ModelVersionInvalid, match="does not exist"):
        store.register_model("agent", tmp_path / "missing")
    assert [v.version for v in store.versions("agent")] == list(range(1, len(cases) + 2))
    assert [e.action for e in store.model_history("agent")].count("promote") == 1


def test_a_pickled_checkpoint_that_is_code_is_refused(store, tmp_path: Path) -> None:
    """A `*.bin` whose pickle names anything but tensors (here `os.system`) is code, not weights:
    refused without loading it; a real torch checkpoint passes."""
    import os

    import torch

    class Payload:
        def __reduce__(self) -> tuple[object, ...]:
            return (os.system, ("echo pwned",))

    good = fake_model(tmp_path / "good")
    (good / "model.safetensors").unlink()
    torch.save(torch.nn.Linear(2, 2).state_dict(), good / "pytorch_model.bin")
    assert store.register_model("agent", good).version == 1
    evil = fake_model(tmp_path / "evil")
    (evil / "model.safetensors").unlink()
    torch.save({"w": torch.ones(1), "x": Payload()}, evil / "pytorch_model.bin")
    with pytest.raises(ModelVersionInvalid, match="system"):
        store.register_model("agent", evil)


@pytest.mark.parametrize("name", ["../../etc", "a/b", "..", ".hidden", "x y", "bad@name", "", "a\\b", "é"])
def test_model_names_cannot_reach_paths(store, tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="not a model name"):
        store.register_model(name, fake_model(tmp_path / "m"))


def test_honed_register_refuses_a_missing_folder(store_url: str, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from honed.cli import app

    result = CliRunner().invoke(
        app, ["register", "agent", str(tmp_path / "nonexistent"), "--store", store_url]
    )
    assert result.exit_code != 0 and "does not exist" in " ".join(result.output.split())
    with honed.open_store(store_url) as s:
        assert s.versions("agent") == []


def test_expected_live_guards_a_stale_promotion(store, tmp_path: Path) -> None:
    for i in range(3):
        store.register_model("agent", fake_model(tmp_path / f"v{i}"))
    store.promote("agent", 1, expected_live=None)
    with pytest.raises(PromotionConflict, match="expected v2"):
        store.promote("agent", 3, expected_live=2)
    assert store.promote("agent", 2, expected_live=1).version == 2


def test_registry_errors_are_specific(store, tmp_path: Path) -> None:
    with pytest.raises(ModelVersionNotFound, match="no versions"):
        store.promote("ghost@v1")
    with pytest.raises(NoLiveVersion):
        store.rollback("ghost")
    store.register_model("agent", fake_model(tmp_path / "v1"))
    with pytest.raises(ModelVersionNotFound, match="agent has v1"):
        store.promote("agent", 7)
    with pytest.raises(ValueError, match="not a model name"):
        store.register_model("bad@name", fake_model(tmp_path / "bad"))
    store.promote("agent", 1)
    with pytest.raises(PromotionConflict, match="is live"):
        store.reject("agent", 1)
    assert parse_model_ref("support-agent@v12") == ("support-agent", 12)
    assert parse_model_ref("v3", "x") == ("x", 3)
    with pytest.raises(ValueError, match="NAME@vN"):
        parse_model_ref("support-agent")


def test_names_are_independent(store, tmp_path: Path) -> None:
    store.register_model("planner", fake_model(tmp_path / "p1"))
    store.register_model("coder", fake_model(tmp_path / "c1"))
    store.register_model("coder", fake_model(tmp_path / "c2"))
    store.promote("planner@v1")
    store.promote("coder@v2")
    assert (store.live_version("planner").ref, store.live_version("coder").ref) == ("planner@v1", "coder@v2")
    assert store.model_names() == ["coder", "planner"]


def test_the_real_tiny_model_passes_the_file_checks(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from tiny_model import tiny_path

    validate_model_files(tiny_path(0))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_path(0), broken)
    (broken / "tokenizer.json").unlink()
    (broken / "tokenizer_config.json").unlink()
    with pytest.raises(ModelVersionInvalid, match="no tokenizer"):
        validate_model_files(broken)


# -- two processes at once -------------------------------------------------------------------------

RACE = textwrap.dedent(
    """
    import sys, time
    import honed
    from honed.store.registry import PromotionConflict
    url, version, start, mode = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    store = honed.open_store(url)
    while time.time() < start:
        time.sleep(0.001)
    if mode == "once":
        try:
            store.promote("agent", version, expected_live=1, actor=f"proc-{version}")
            print("won")
        except PromotionConflict:
            print("lost")
    else:
        results = []
        for i in range(15):
            try:
                store.promote("agent", version if i % 2 == 0 else 1, actor=f"proc-{version}")
                results.append("ok")
            except PromotionConflict:
                results.append("conflict")
        print(" ".join(results))
    """
)


def _race(url: str, versions: tuple[int, int], mode: str) -> list[str]:
    start = time.time() + 1.5  # both processes are up and connected before either promotes
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, url, str(v), str(start), mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for v in versions
    ]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        outs.append(out.strip())
    return outs


def test_two_processes_promoting_at_once_exactly_one_wins(store, tmp_path: Path) -> None:
    for i in range(3):
        store.register_model("agent", fake_model(tmp_path / f"v{i}"))
    store.promote("agent", 1)
    outcomes = _race(store.url, (2, 3), "once")
    assert sorted(outcomes) == ["lost", "won"]
    winner = 2 if outcomes[0] == "won" else 3
    assert store.live_version("agent").version == winner
    promotions = [e for e in store.model_history("agent") if e.action == "promote"]
    assert [(e.from_version, e.version) for e in promotions] == [(None, 1), (1, winner)]
    assert [v.status for v in store.versions("agent")].count("live") == 1


def test_concurrent_promotions_keep_the_history_consistent(store, tmp_path: Path) -> None:
    for i in range(3):
        store.register_model("agent", fake_model(tmp_path / f"v{i}"))
    store.promote("agent", 1)
    outcomes = " ".join(_race(store.url, (2, 3), "many")).split()
    assert len(outcomes) == 30 and "ok" in outcomes
    moves = [e for e in store.model_history("agent") if e.action == "promote"]
    # Every change started from the version the previous change left live: no lost update.
    for before, after in itertools.pairwise(moves):
        assert after.from_version == before.version
    assert [e.generation for e in moves] == list(range(1, len(moves) + 1))
    assert store.live_pointer("agent")[1] == len(moves)
    assert store.live_version("agent").version == moves[-1].version
    versions = store.versions("agent")
    assert [v.status for v in versions].count("live") == 1
    # Under load one process may win every race; whatever was ever promoted is no longer a candidate.
    promoted = {e.version for e in moves}
    assert all(v.status != "candidate" for v in versions if v.version in promoted)


# -- migrations and the command line ----------------------------------------------------------------


def test_migration_0003_downgrades_and_upgrades(store_url: str) -> None:
    from alembic import command
    from sqlalchemy import inspect

    from honed.store.store import _alembic_config

    store = honed.open_store(store_url)
    config = _alembic_config()
    with store.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0002")
    assert "model_versions" not in inspect(store.engine).get_table_names()
    with store.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
    assert {"model_versions", "model_live", "model_events"} <= set(inspect(store.engine).get_table_names())
    store.close()


def test_cli_versions_promote_rollback(sqlite_url: str, tmp_path: Path) -> None:
    runner = CliRunner()
    store = ["--store", sqlite_url]
    for i in (1, 2):
        done = runner.invoke(
            app,
            ["register", "agent", str(fake_model(tmp_path / f"v{i}")), *store, "--metrics", '{"acc": 0.5}'],
        )
        assert done.exit_code == 0, done.output
        assert f"agent@v{i}" in done.output
    done = runner.invoke(app, ["promote", "agent@v1", *store, "--reason", "first", "--by", "alice"])
    assert done.exit_code == 0 and "now serves agent@v1" in done.output, done.output
    done = runner.invoke(app, ["promote", "agent@v2", *store, "--expect", "1"])
    assert done.exit_code == 0 and "(was agent@v1)" in done.output, done.output
    done = runner.invoke(app, ["rollback", "agent", *store, "-m", "bad answers"])
    assert done.exit_code == 0 and "now serves agent@v1" in done.output, done.output
    done = runner.invoke(app, ["versions", "agent", *store, "--history"], env={"COLUMNS": "200"})
    assert done.exit_code == 0, done.output
    assert (
        "live" in done.output
        and "rejected" in done.output
        and "bad answers" in done.output
        and "alice" in done.output
    )
    data = json.loads(runner.invoke(app, ["versions", "agent", *store, "--json"]).output)
    assert [v["status"] for v in data["versions"]] == ["live", "rejected"]
    typo = runner.invoke(app, ["versions", "agnet", *store, "--json"])  # was rc 0 and no versions
    assert typo.exit_code == 1 and "agnet has no versions" in typo.output and "agent" in typo.output
    assert [e["action"] for e in data["history"]][-1] == "rollback"

    # A version a rollback retired (or the gate rejected) goes live again only with --force (a QA
    # pass, session 21: a typo redeployed a known-worse model without a word).
    refused = runner.invoke(app, ["promote", "agent@v2", *store])
    assert refused.exit_code == 1 and "was rejected" in refused.output and "--force" in refused.output
    assert (
        json.loads(runner.invoke(app, ["versions", "agent", *store, "--json"]).output)["versions"][0][
            "status"
        ]
        == "live"
    )

    (tmp_path / "v2" / "model.safetensors").unlink()
    refused = runner.invoke(app, ["register", "agent", str(tmp_path / "v2"), *store])
    assert refused.exit_code == 1 and "cannot be served" in refused.output
    done = runner.invoke(app, ["promote", "agent@v2", *store, "--force"])  # registered whole, broken since
    assert done.exit_code == 1 and "cannot be served" in done.output
    assert runner.invoke(app, ["promote", "agent", *store]).exit_code == 2  # not NAME@vN
    assert runner.invoke(app, ["promote", "agent@v9", *store]).exit_code == 1
    assert runner.invoke(app, ["serve", "--help"]).exit_code == 0
    # A mistyped name: said with the models there are, not served as 503s for ever, nor a rollback
    # of nothing (a QA pass, session 22).
    typo = runner.invoke(app, ["serve", "agnet", *store, "--port", "0"])
    assert typo.exit_code == 1 and "no such model" in typo.output and "models: agent" in typo.output
    typo = runner.invoke(app, ["rollback", "agnet", *store])
    assert typo.exit_code == 1 and "models: agent" in typo.output
    # The live version damaged on disk: `serve` says so in one line, never "serving" first (a QA
    # pass, session 19: it announced the version, then died in a traceback loading it).
    (tmp_path / "v1" / "model.safetensors").write_bytes(b"\0" * 16)
    done = runner.invoke(app, ["serve", "agent", *store, "--port", "0"])
    assert done.exit_code == 1 and "cannot be served" in done.output and "rollback agent" in done.output
    assert "serving" not in done.output and "Traceback" not in done.output, done.output


def test_a_config_that_does_not_describe_its_weights_is_refused(store, tmp_path: Path) -> None:
    """A QA pass (session 16): only the files' headers were read, never held against the config:
    a GPT-2 config over Qwen weights was promoted and served noise, a larger vocabulary made
    the live version unloadable, and a layer more than the weights hold was random."""
    import shutil

    from tiny_model import tiny_path

    def variant(name: str, edit: Callable[[dict], object]) -> Path:
        folder = tmp_path / name
        shutil.copytree(tiny_path(1), folder)
        config = json.loads((folder / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(json.dumps(config))
        return folder

    gpt2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 390, "n_embd": 192,
            "n_layer": 4, "n_head": 4, "eos_token_id": 2, "pad_token_id": 0}  # fmt: skip
    cases = {
        "gpt2": (lambda c: (c.clear(), c.update(gpt2)), "not in the weights"),
        "vocab": (lambda c: c.update({"vocab_size": 4000}), "other shapes"),
        "layers": (lambda c: c.update({"num_hidden_layers": 5, "layer_types": ["full_attention"] * 5}), "not in the weights"),
    }  # fmt: skip
    for name, (edit, reason) in cases.items():
        with pytest.raises(ModelVersionInvalid, match=reason):
            store.register_model("agent", variant(name, edit))
    assert store.register_model("agent", tiny_path(1)).version == 1  # the model as saved: fine
    # The CLI had not imported transformers, so the check was skipped there (an operator's QA pass,
    # session 21: `honed promote` made a version with random layers live); and a config
    # transformers itself refuses went live, unloadable by any server.
    layers = variant(
        "layers-cli", lambda c: c.update({"num_hidden_layers": 5, "layer_types": ["full_attention"] * 5})
    )
    unloadable = variant("unloadable", lambda c: c.update({"num_hidden_layers": 5}))
    url = str(store.url)
    for folder, reason in ((layers, "not in the weights"), (unloadable, "config.json does not load")):
        cli = subprocess.run(
            [sys.executable, "-m", "honed.cli", "register", "agent", str(folder), "--store", url],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert cli.returncode == 1 and reason in cli.stdout + cli.stderr, cli.stdout + cli.stderr
    assert [v.version for v in store.versions("agent")] == [1]
    # A quantised checkpoint holds other tensors (`qweight`, `scales`) than the model it describes:
    # its structure is not held against the config (a review, session 21).
    quantised = variant("gptq", lambda c: c.update({"quantization_config": {"quant_method": "gptq", "bits": 4},
                                                      "num_hidden_layers": 5, "layer_types": ["full_attention"] * 5}))  # fmt: skip
    assert store.register_model("agent", quantised).version == 2
    # ... but its config must still load (a second review, session 21: the skip came first).
    broken = variant("gptq-broken", lambda c: c.update({"quantization_config": {"quant_method": "gptq", "bits": 4},
                                                        "num_hidden_layers": 5}))  # fmt: skip
    with pytest.raises(ModelVersionInvalid, match=r"config\.json does not load"):
        store.register_model("agent", broken)
