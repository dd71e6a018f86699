"""Training methods: each one is a TRL trainer configured by TRL's own config, and nothing more.

    result = SFTMethod(num_train_epochs=2).train("./live-model", prepare(store, "sft"), "./candidate")
    result.path, result.metrics   # a complete model folder; train_loss, steps, tokens, seconds ...

A method turns a `TrainingData` into a trained model folder that `AutoModelForCausalLM` and
`LocalChatModel` load (LoRA merged, the base's tokenizer and other files). There is no training
loop here: `SFTTrainer`, `KTOTrainer`, `DPOTrainer`, `GRPOTrainer` and `DistillationTrainer` do
the work (`OffPolicyMethod` is `SFTTrainer` with a clipped policy-gradient loss over captured
attempts). Each method takes its TRL config, `config=SFTConfig(...)` (`KTOConfig`, `DPOConfig`,
`GRPOConfig`, `DistillationConfig` for `DistillMethod(teacher=...)`), and/or that config's fields
as keywords (`SFTMethod(learning_rate=1e-4, per_device_train_batch_size=16)`); so anything TRL
can do (DeepSpeed, FSDP, other losses, packing) is asked for the way TRL documents it. honed adds
only what TRL lacks: `lora=True` (or `peft_config=`), GRPO's `verifiers` and `tools`, Distill's
`teacher`.

Defaults are TRL's, which are tuned for real models (a learning rate that suits a 1M-parameter
toy would wreck a pretrained 7B), not honed's:

    method    config               learning_rate  num_train_epochs  per_device_train_batch_size
    sft       SFTConfig            2e-5           3                 8
    distill   SFTConfig            2e-5           3                 8   (no teacher: SFT)
    distill   DistillationConfig   1e-6           3                 8   (with a teacher)
    kto       KTOConfig            1e-6           3                 8
    dpo       DPOConfig            1e-6           3                 8
    grpo      GRPOConfig           1e-6           3                 8   (8 generations, 512 tokens)
    offpolicy SFTConfig            2e-5           3                 8   (passes as SFT, failures tapered)

and so are gradient checkpointing (on) and bf16 (on, where transformers allows it). What honed
sets itself (`base`'s docstring has the order): its scratch `output_dir`, the cycle's `seed`
unless you chose one; logistics that never change what is learned (no reporting, no
checkpoints, no progress bar, a log line every step, which its metrics read); `bf16=False` only
where TRL's `bf16=True` would fail (no GPU with bf16, no `use_cpu`); and what its rows need:
SFT's loss on the model's own tokens only (`assistant_only_loss`, or `completion_only_loss` for
pre-tokenised rows) and KTO's pass/fail weights as TRL advises. Your value wins over all of them.
`config()` records the effective settings with each training run.
"""

from honed.learn.methods.base import NothingToLearn, TrainResult, TrlMethod
from honed.learn.methods.grpo import GRPOMethod, VerifierReward, completion_trajectory, trl_tool
from honed.learn.methods.offpolicy import OffPolicyMethod, offpolicy_loss, offpolicy_trainer
from honed.learn.methods.preference import DPOMethod, KTOMethod
from honed.learn.methods.sft import DistillMethod, SFTMethod, teacher_prompts

__all__ = [
    "DPOMethod",
    "DistillMethod",
    "GRPOMethod",
    "KTOMethod",
    "NothingToLearn",
    "OffPolicyMethod",
    "SFTMethod",
    "TrainResult",
    "TrlMethod",
    "VerifierReward",
    "completion_trajectory",
    "offpolicy_loss",
    "offpolicy_trainer",
    "teacher_prompts",
    "trl_tool",
]
