"""One DPO round, as a readable recipe (torchtune style): every step is a function, `train_round` reads
top to bottom.

1. load the base policy through the production loader (`services.modelzoo.loading.load_policy`);
2. attach the adapter to continue from (trainable), or let TRL add a fresh LoRA (`peft_config`);
   render every row with the policy's own chat template, each answer closed by the EOS that serving
   stops on (`closed_answers`), each sequence starting with the BOS serving sends
   (`ServingPrefixCollator`);
3. train with TRL's `DPOTrainer` (sigmoid DPO, or another `dpo_loss`, + NLL on the chosen answer,
   weighted `rpo_alpha`; or the NLL alone for the `sft-chosen` control);
   the reference model is the base with the adapter disabled, as TRL does for PEFT models;
4. evaluate on the held-out pairs: preference accuracy, reward margin and the chosen and rejected
   rewards (TRL's own metrics);
5. save the standard PEFT folder (adapter_config.json + adapter_model.safetensors).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from transformers import PreTrainedModel, ProcessorMixin, TrainerCallback
from trl.trainer.dpo_config import DPOConfig
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference, DPOTrainer

from services.modelzoo.loading import load_policy
from trainer.config import (
    PREFERENCE_ACCURACY,
    REWARD_CHOSEN,
    REWARD_MARGIN,
    REWARD_REJECTED,
    TrainerConfig,
)

log = logging.getLogger(__name__)

#: TRL log keys -> the names this project reports (train side; eval side gets the eval_ prefix).
_TRL_METRICS = {
    "loss": "loss",
    "rewards/margins": "reward_margin",
    "rewards/accuracies": "preference_accuracy",
    "rewards/chosen": "reward_chosen",
    "rewards/rejected": "reward_rejected",
}


@dataclass
class RoundResult:
    """What one round produced: the PEFT folder and its metrics."""

    adapter_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    train_samples_per_second: float = 0.0


def lora_config(cfg: TrainerConfig) -> LoraConfig:
    """A fresh LoRA on the language model."""
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules,
        task_type="CAUSAL_LM",
    )


def training_losses(cfg: TrainerConfig) -> tuple[list[str], list[float]]:
    """TRL loss types and weights of the configured objective.

    'sft-chosen' is TRL's "sft" loss alone: NLL on the chosen answers of the same pairs, the control
    that tells a preference gain from the effect of training on the chosen answers at all.
    """
    if cfg.objective == "sft-chosen":
        return ["sft"], [1.0]
    if cfg.rpo_alpha > 0:
        return [cfg.dpo_loss, "sft"], [1.0, cfg.rpo_alpha]
    return [cfg.dpo_loss], [1.0]


def dpo_config(cfg: TrainerConfig, output_dir: Path) -> DPOConfig:
    """TRL arguments for one round; checkpoints are off: a crashed round is retrained from its pairs."""
    losses, weights = training_losses(cfg)
    device = cfg.resolved_device()
    return DPOConfig(
        output_dir=str(output_dir),
        beta=cfg.beta,
        loss_type=losses,
        loss_weights=weights,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float < 1 is a fraction of the steps
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation,
        max_length=cfg.max_length,
        seed=cfg.seed,
        bf16=cfg.use_bf16(),
        use_cpu=device == "cpu",
        # Checkpointing trades compute for memory; on CPU it only slows tiny models down (SPEC §5).
        gradient_checkpointing=device != "cpu",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
    )


def load_start(cfg: TrainerConfig, parent_dir: Path | None) -> tuple[PreTrainedModel, ProcessorMixin]:
    """The base policy, with the parent adapter attached and trainable when there is one."""
    device = cfg.resolved_device()
    model, processor = load_policy(cfg.base_model, device, "bfloat16" if cfg.use_bf16() else "float32")
    if parent_dir is None:
        return model, processor
    log.info("continuing from adapter %s", parent_dir)
    peft_model = PeftModel.from_pretrained(model, str(parent_dir), is_trainable=True)
    return peft_model, processor  # type: ignore[return-value]


def serving_prefix_ids(tokenizer: Any) -> list[int]:
    """The special tokens serving's tokenizer call (``add_special_tokens=True``) puts before a text:
    LLaMA's BOS; none for Qwen's tokenizers."""
    plain: list[int] = tokenizer("x", add_special_tokens=False)["input_ids"]
    served: list[int] = tokenizer("x", add_special_tokens=True)["input_ids"]
    cut = len(served) - len(plain)
    return served[:cut] if cut > 0 and served[cut:] == plain else []


#: Per-token tensors of TRL's collated batch that a prompt prefix extends with zeros, and all of them.
_ZERO_FOR_PREFIX = ("completion_mask", "token_type_ids", "mm_token_type_ids")
_PER_TOKEN = ("input_ids", "attention_mask", *_ZERO_FOR_PREFIX)


@dataclass
class ServingPrefixCollator(DataCollatorForVisionPreference):
    """TRL's vision preference collator, each sequence starting with the tokens serving starts it with.

    TRL tokenizes the rendered prompt with ``add_special_tokens=False``, trusting the chat template to
    write the BOS. LLaVA-1.5's template does not (serving's processor call adds it), so without this
    every round trained the policy on sequences without the BOS that each sequence of its SFT and of
    serving starts with: position 0, which every other position attends to, held another token.
    Writing ``<s>`` into the prompt text instead would change how the text after it is tokenized
    (``▁USER`` becomes ``U`` ``SER``), so the ids are put in front of the collated batch, whose rows
    TRL has flushed left.
    """

    prefix_ids: list[int] = field(default_factory=list)

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = super().torch_call(examples)
        if not self.prefix_ids:
            return batch
        ids: torch.Tensor = batch["input_ids"]
        prefix = torch.tensor(self.prefix_ids, dtype=ids.dtype).expand(len(ids), -1)
        batch["input_ids"] = torch.cat((prefix, ids), dim=1)
        batch["attention_mask"] = torch.cat((torch.ones_like(prefix), batch["attention_mask"]), dim=1)
        for key in _ZERO_FOR_PREFIX:
            if key in batch:
                batch[key] = torch.cat((torch.zeros_like(prefix), batch[key]), dim=1)
        if self.max_length is not None:  # TRL cut the rows before the prefix was added
            for key in _PER_TOKEN:
                if key in batch:
                    batch[key] = batch[key][:, : self.max_length]
        return batch


def render_closed(processor: ProcessorMixin, row: dict[str, Any]) -> dict[str, Any]:
    """One conversational row -> TRL's standard (text) row, rendered by the policy's chat template, with
    each answer ending in exactly one EOS token.

    TRL appends no EOS to conversational rows: it trusts the chat template to close the assistant turn.
    LLaVA-1.5's template (and so the world policy's) ends it with a space instead, so an answer trained
    that way never learns to stop and the policy runs on past its box (REC answers gained a second,
    third, ... box). A template that does close the turn with EOS (Qwen's ``<|im_end|>``) keeps its own
    token, cut right after it; one that does not gets the tokenizer's EOS, as the SFT taught it.
    """
    tokenizer: Any = getattr(processor, "tokenizer", processor)
    eos: str = tokenizer.eos_token
    prompt: str = processor.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)

    def answer(turns: list[dict[str, Any]]) -> str:
        full: str = processor.apply_chat_template(row["prompt"] + turns, tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("the chat template renders the prompt differently once an answer follows")
        completion = full[len(prompt) :]
        end = completion.find(eos)
        return completion[: end + len(eos)] if end >= 0 else completion.rstrip() + eos

    return {"prompt": prompt, "chosen": answer(row["chosen"]), "rejected": answer(row["rejected"])}


def closed_answers(dataset: Dataset, processor: ProcessorMixin) -> Dataset:
    """Every row of ``dataset`` through :func:`render_closed`; images and pair ids stay."""
    return dataset.map(
        lambda row: render_closed(processor, row), remove_columns=["prompt", "chosen", "rejected"]
    )


def make_trainer(
    cfg: TrainerConfig,
    model: PreTrainedModel,
    processor: ProcessorMixin,
    train: Dataset,
    output_dir: Path,
    callbacks: list[TrainerCallback] | None = None,
) -> DPOTrainer:
    """TRL's DPOTrainer; a fresh LoRA is added by TRL unless the model already carries an adapter."""
    args = dpo_config(cfg, output_dir)
    tokenizer: Any = getattr(processor, "tokenizer", processor)
    if tokenizer.pad_token is None:  # what TRL does when it builds its own collator
        tokenizer.pad_token = tokenizer.eos_token
        model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    collator = ServingPrefixCollator(processor, args.max_length, prefix_ids=serving_prefix_ids(tokenizer))
    return DPOTrainer(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=closed_answers(train, processor),
        processing_class=processor,
        peft_config=None if isinstance(model, PeftModel) else lora_config(cfg),
        callbacks=callbacks,
    )


def train_metrics(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """The last logged value of each reported training metric."""
    found: dict[str, float] = {}
    for entry in log_history:
        for trl_key, name in _TRL_METRICS.items():
            if trl_key in entry:
                found[f"train_{name}"] = float(entry[trl_key])
    return found


def heldout_metrics(trainer: DPOTrainer, processor: ProcessorMixin, heldout: Dataset) -> dict[str, float]:
    """Preference accuracy and reward margin on held-out pairs (empty when none are held out)."""
    if len(heldout) == 0:
        return {}
    evaluated = trainer.evaluate(closed_answers(heldout, processor))
    metrics = {
        PREFERENCE_ACCURACY: float(evaluated["eval_rewards/accuracies"]),
        REWARD_MARGIN: float(evaluated["eval_rewards/margins"]),
        REWARD_CHOSEN: float(evaluated["eval_rewards/chosen"]),
        REWARD_REJECTED: float(evaluated["eval_rewards/rejected"]),
        "eval_loss": float(evaluated["eval_loss"]),
    }
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


def train_round(
    cfg: TrainerConfig,
    train: Dataset,
    heldout: Dataset,
    parent_dir: Path | None,
    output_dir: Path,
    callbacks: list[TrainerCallback] | None = None,
) -> RoundResult:
    """Train one round and save the adapter under ``output_dir/adapter``."""
    model, processor = load_start(cfg, parent_dir)
    trainer = make_trainer(cfg, model, processor, train, output_dir, callbacks)
    log.info("training on %d pairs (%d held out)", len(train), len(heldout))
    output = trainer.train()
    metrics = train_metrics(trainer.state.log_history)
    metrics.update(heldout_metrics(trainer, processor, heldout))
    adapter_dir = output_dir / "adapter"
    trained: Any = trainer.model  # a PeftModel: saves only the adapter, in the standard PEFT layout
    trained.save_pretrained(str(adapter_dir))
    (adapter_dir / "README.md").unlink(missing_ok=True)  # PEFT's model card: not part of the weights
    speed = float(output.metrics.get("train_samples_per_second", 0.0))
    log.info("round done: %s", ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
    return RoundResult(adapter_dir=adapter_dir, metrics=metrics, train_samples_per_second=speed)
