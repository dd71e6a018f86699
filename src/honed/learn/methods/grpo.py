"""GRPO: TRL samples completions of the training tasks and honed's verifiers are the reward."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from honed.learn.datasets import TrainingData
from honed.learn.methods.base import NothingToLearn, TrlMethod
from honed.messages import completion_trajectory
from honed.trajectory import Trajectory
from honed.trajectory import label as trajectory_label
from honed.verifiers.protocol import trust_of, verifier_name
from honed.verifiers.routing import applicable

log = logging.getLogger("honed")


class GRPOMethod(TrlMethod):
    """GRPO on training tasks (`prepare(store, "grpo")`) with TRL's `GRPOTrainer` and a
    `GRPOConfig`: TRL samples `num_generations` completions per task (calling `tools`, plain
    callables or LangChain tools: see `trl_tool`) and the `verifiers` score each one, 1 pass /
    0 fail / None when they cannot tell. A group whose completions all score the same teaches
    nothing; when every group did, `train` raises `NothingToLearn`.

        GRPOMethod([ReferenceMatch()], tools=[add], num_generations=4, max_completion_length=256)
    """

    name = "grpo"
    accepts = ("grpo",)
    trl_classes = ("GRPOConfig", "GRPOTrainer")

    def __init__(
        self, verifiers: Sequence[Any], *, tools: Sequence[Any] | None = None, **kwargs: Any
    ) -> None:
        if not verifiers:
            raise ValueError("GRPO needs at least one verifier to score completions")
        super().__init__(**kwargs)
        self.verifiers = list(verifiers)
        self.tools = [trl_tool(t) for t in tools or ()]

    def _extra_config(self) -> dict[str, Any]:
        return {
            "verifiers": [verifier_name(v) for v in self.verifiers],
            "tools": [getattr(t, "__name__", type(t).__name__) for t in self.tools],
        }

    def _trainer(self, base: str, args: Any, data: TrainingData, tokenizer: Any, callbacks: list[Any]) -> Any:
        from trl import GRPOTrainer

        return GRPOTrainer(
            model=base,
            reward_funcs=[VerifierReward(self.verifiers, usable=data.usable_verifiers)],
            args=args,
            train_dataset=data.dataset,
            processing_class=tokenizer,
            peft_config=self._peft(),
            callbacks=callbacks,
            tools=self.tools or None,
        )

    def _metrics(self, trainer: Any, result: Any, seconds: float) -> dict[str, float]:
        metrics = super()._metrics(trainer, result, seconds)
        logged = [e for e in trainer.state.log_history if e.get("frac_reward_zero_std") is not None]
        if logged:
            metrics["zero_variance_groups"] = sum(e["frac_reward_zero_std"] for e in logged) / len(logged)
            rewards = [e["reward"] for e in logged if e.get("reward") is not None]
            if rewards:
                metrics["reward"] = sum(rewards) / len(rewards)
        return metrics

    def _verify_learned(self, trainer: Any, metrics: dict[str, float]) -> None:
        logged = [e for e in trainer.state.log_history if "frac_reward_zero_std" in e]
        if logged and all(e.get("reward") is None for e in logged):
            raise NothingToLearn(
                "grpo: no verifier could tell on any completion (every reward None): check that the "
                "tasks' metadata carries what the verifiers read",
                metrics=metrics,
            )
        if metrics.get("zero_variance_groups") == 1.0:
            raise NothingToLearn(
                f"grpo: in every group of {trainer.args.num_generations} completions all got the same "
                f"reward (mean {metrics.get('reward', float('nan')):.2f}), so no advantage and no gradient: "
                "tasks are all solved or all out of reach; SFT on demonstrations or a teacher first",
                metrics=metrics,
            )


# -- GRPO's reward -----------------------------------------------------------------------------


class VerifierReward:
    """A TRL reward function that judges each completion with honed verifiers.

    Each completion becomes a minimal `Trajectory` (the task's id, split and metadata, one model
    step per assistant turn, a tool step per tool result, the final text as output), so the same
    verifiers that label production trajectories score the rollouts, routed as the `Worker` routes
    them (`honed.verifiers.routing.applicable`: `metadata["verifier"]`, tags, requirements). The
    label is `honed.trajectory.label` of their verdicts: 1.0 pass, 0.0 fail, None (no signal)
    when none could tell or all raised. Only verifiers that may label training data count, as
    for every other method: `usable` (the store's policies, `TrainingData.usable_verifiers`), and
    for one the store has no policy for, its own trust (a model judge is low-trust: a completion
    that talks it into a pass must not be rewarded for it)."""

    __name__ = "verifiers"

    def __init__(self, verifiers: Iterable[Any], *, usable: dict[str, bool] | None = None) -> None:
        self.verifiers = list(verifiers)
        known = usable or {}
        self.untrusted = {
            verifier_name(v) for v in self.verifiers if not known.get(verifier_name(v), trust_of(v) != "low")
        } | {name for name, ok in known.items() if not ok}

    def __call__(
        self,
        prompts: list[Any],
        completions: list[Any],
        task_id: list[str | None] | None = None,
        metadata: list[str | None] | None = None,
        split: list[str | None] | None = None,
        **_: Any,
    ) -> list[float | None]:
        n = len(completions)
        task_ids, metas, splits = task_id or [None] * n, metadata or [None] * n, split or [None] * n
        return [
            self.score(completion_trajectory(p, c, task_id=t, metadata=m, split=s))
            for p, c, t, m, s in zip(prompts, completions, task_ids, metas, splits, strict=True)
        ]

    def score(self, trajectory: Trajectory) -> float | None:
        verdicts = []
        for verifier in applicable(self.verifiers, trajectory):  # the Worker's routing, exactly
            try:
                verdicts.append(verifier.verify(trajectory))
            except Exception:
                log.warning("verifier %s raised on a GRPO completion", verifier_name(verifier), exc_info=True)
        label = trajectory_label(verdicts, untrusted=self.untrusted)
        return None if label is None else float(label)


_JSON_TYPES: dict[str, type] = {
    "integer": int, "number": float, "string": str, "boolean": bool, "array": list, "object": dict,
}  # fmt: skip


def trl_tool(tool: Any) -> Callable[..., Any]:
    """A tool as TRL's trainers take it: a plain function with type hints and a Google-style
    docstring, from which transformers builds the schema the prompt shows. Functions pass
    through; a LangChain tool is wrapped (an argument without a description is described by its
    name, since transformers requires one; so the prompt's schema carries descriptions the
    agent's own schema may lack)."""
    if inspect.isfunction(tool) or inspect.ismethod(tool):
        return tool
    from langchain_core.tools import BaseTool
    from langchain_core.utils.function_calling import convert_to_openai_tool

    if not isinstance(tool, BaseTool):
        raise TypeError(f"GRPO tools are functions or LangChain tools, not {type(tool).__name__}")
    schema = convert_to_openai_tool(tool)["function"]
    parameters = schema.get("parameters") or {}
    properties: dict[str, Any] = parameters.get("properties") or {}
    required = set(parameters.get("required") or ())

    def call(**kwargs: Any) -> Any:
        result = tool.invoke(kwargs)
        return getattr(result, "content", result)

    hints = {name: _JSON_TYPES.get(p.get("type"), str) for name, p in properties.items()}
    call.__name__ = call.__qualname__ = schema["name"]
    call.__doc__ = "\n".join(
        [schema.get("description") or schema["name"], "", "Args:"]
        + [f"    {name}: {p.get('description') or name}" for name, p in properties.items()]
    )
    call.__annotations__ = dict(hints)
    call.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=inspect.Parameter.empty if name in required else None,
                annotation=hint,
            )
            for name, hint in hints.items()
        ]
    )
    return call
