"""The trainer's configuration: one dataclass, every field with its help text (TRL style).

Defaults are the paper's (SPEC §2 "DPO"): sigmoid DPO with beta 0.1, LoRA r 128 / alpha 256 on the
language model, lr 1e-5 cosine with 10 % warm-up, one epoch per round, plus a likelihood term on the
chosen answer (SPEC §6: DPO without it halved accuracy in the demo world). `HfArgumentParser` turns
the dataclass into the command line, so `--help` prints the same text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from services.common.kafka_io import KafkaSettings

#: Metric names in the manifest; the admin's eval gate (services.admin.settings) reads the same names.
PREFERENCE_ACCURACY = "eval_preference_accuracy"
REWARD_MARGIN = "eval_reward_margin"
#: Held-out chosen answers' implicit reward, beta * (log pi - log pi_ref): below 0 they became less likely.
REWARD_CHOSEN = "eval_reward_chosen"
REWARD_REJECTED = "eval_reward_rejected"
#: Mean REC accuracy (points, 0-100) over IoU thresholds 0.5..0.9 on the REC gate's set (`trainer.rec_gate`).
REC_ACCURACY = "rec_accuracy"

#: LoRA on the language model only: vLLM serves LoRA on the LM, and the SPEC says "on the language model".
LANGUAGE_MODEL_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


#: Training objectives (`objective`): preference learning, or the SFT-on-chosen control.
OBJECTIVES = ("dpo", "sft-chosen")
#: TRL's paired preference losses the 'dpo' objective may use (`dpo_loss`).
DPO_LOSSES = ("sigmoid", "ipo", "hinge", "apo_zero")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class TrainerConfig:
    """Everything one training round and the long-running loop need."""

    # --- model and data --------------------------------------------------------------------------
    base_model: str = field(
        default="Qwen/Qwen2.5-VL-7B-Instruct", metadata=_help("Base policy: hub id or local folder.")
    )
    model_family: str = field(
        default="qwen2.5-vl",
        metadata=_help("Prompt/resize family of the policy (as the describer's model_family)."),
    )
    store: str = field(default=".spr/adapters", metadata=_help("Adapter store: directory or file:// URI."))
    work_dir: str = field(default=".spr/trainer", metadata=_help("Scratch space for checkpoints/reports."))
    continue_from: str = field(
        default="latest",
        metadata=_help("'latest' (or any alias/version): continue that adapter; 'base': a fresh LoRA."),
    )
    # --- DPO -------------------------------------------------------------------------------------
    objective: str = field(
        default="dpo",
        metadata={
            "help": "'dpo': sigmoid DPO (+ rpo_alpha x NLL on the chosen answer); 'sft-chosen': NLL on the "
            "chosen answers only, the paper's SFT ablation (same data, no rejected answers).",
            "choices": OBJECTIVES,
        },
    )
    dpo_loss: str = field(
        default="sigmoid",
        metadata={
            "help": "TRL's preference loss of the 'dpo' objective: 'sigmoid' (DPO, the paper's), or 'ipo', "
            "'hinge', 'apo_zero' (anchored: raises the chosen answers' likelihood, lowers the rejected).",
            "choices": DPO_LOSSES,
        },
    )
    beta: float = field(default=0.1, metadata=_help("DPO beta (the loss's temperature)."))
    rpo_alpha: float = field(
        default=1.0, metadata=_help("Weight of the NLL term on the chosen answer (RPO); 0 = pure DPO.")
    )
    learning_rate: float = field(default=1e-5, metadata=_help("Peak learning rate."))
    lr_scheduler: str = field(default="cosine", metadata=_help("Learning-rate schedule."))
    warmup_ratio: float = field(default=0.1, metadata=_help("Fraction of steps spent warming up."))
    num_epochs: float = field(default=1.0, metadata=_help("Epochs over each round's pairs."))
    max_steps: int = field(default=-1, metadata=_help("Cap on optimizer steps per round (-1 = epochs)."))
    batch_size: int = field(default=4, metadata=_help("Pairs per device batch."))
    gradient_accumulation: int = field(default=1, metadata=_help("Batches per optimizer step."))
    max_length: int | None = field(default=None, metadata=_help("Truncate sequences to this many tokens."))
    seed: int = field(default=0, metadata=_help("Seed of shuffling, LoRA init and the held-out split."))
    # --- LoRA ------------------------------------------------------------------------------------
    lora_r: int = field(default=128, metadata=_help("LoRA rank."))
    lora_alpha: int = field(default=256, metadata=_help("LoRA alpha."))
    lora_dropout: float = field(default=0.05, metadata=_help("LoRA dropout."))
    lora_target_modules: str = field(
        default=LANGUAGE_MODEL_TARGETS, metadata=_help("Regex of the modules that get LoRA.")
    )
    # --- evaluation and gate ---------------------------------------------------------------------
    heldout_fraction: float = field(
        default=0.1, metadata=_help("Fraction of a round's pairs held out for the eval gate.")
    )
    gate_tolerance_accuracy: float = field(
        default=0.01, metadata=_help("stable moves only if held-out preference accuracy drops <= this.")
    )
    gate_tolerance_margin: float = field(
        default=0.05, metadata=_help("stable moves only if held-out reward margin drops <= this.")
    )
    gate_rec_data: str = field(
        default="",
        metadata=_help(
            "REC set of the optional REC gate (spr-rec JSON, refer or Flickr30k folder); '' = REC gate off. "
            "Candidate and current stable (or the base) are scored on it before publication."
        ),
    )
    gate_rec_limit: int = field(default=500, metadata=_help("REC gate: the first N expressions (0 = all)."))
    gate_tolerance_rec: float = field(
        default=1.0,
        metadata=_help("stable moves only if mean REC Acc@0.5..0.9 (points) drops <= this vs the reference."),
    )
    gate_rec_batch_size: int = field(default=16, metadata=_help("REC gate: expressions per generate batch."))
    gate_rec_max_new_tokens: int = field(default=48, metadata=_help("REC gate: answer length (tokens)."))
    # --- trigger policy --------------------------------------------------------------------------
    trigger_every_pairs: int = field(default=1024, metadata=_help("Train once this many new pairs wait."))
    trigger_every_minutes: float = field(
        default=60.0, metadata=_help("Train at least this often when pairs wait (0 = never by time).")
    )
    min_pairs: int = field(default=2, metadata=_help("Never train on fewer pairs than this."))
    max_pairs: int = field(default=100_000, metadata=_help("Pairs consumed into one round at most."))
    # --- Kafka -----------------------------------------------------------------------------------
    bootstrap_servers: str = field(default="localhost:9092", metadata=_help("Kafka bootstrap servers."))
    group_id: str = field(
        default="spr-trainer",
        metadata=_help("Consumer group on `pairs`; `<group_id>.control` reads on-demand requests."),
    )
    kafka_api_version: str = field(default="", metadata=_help("Pin the protocol, e.g. '2.0'; '' negotiates."))
    kafka_session_timeout_ms: int = field(default=45_000, metadata=_help("Consumer session timeout."))
    kafka_max_poll_interval_ms: int = field(
        default=3_600_000,
        metadata=_help("Longest round (ms) before the group evicts the trainer; also the rebalance timeout."),
    )
    poll_idle_s: float = field(
        default=5.0,
        metadata=_help(
            "One-shot and export stop reading at the end offsets seen at assignment, or once the topic "
            "is idle this long."
        ),
    )
    # --- runtime ---------------------------------------------------------------------------------
    device: str = field(default="auto", metadata=_help("'auto' (CUDA if present), 'cpu' or 'cuda[:n]'."))
    bf16: str = field(default="auto", metadata=_help("'auto' (bf16 on CUDA), 'true' or 'false'."))
    metrics_port: int = field(default=0, metadata=_help("Prometheus port in run mode (0 = none)."))

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.dpo_loss not in DPO_LOSSES:
            raise ValueError(f"dpo_loss must be one of {DPO_LOSSES}, got {self.dpo_loss!r}")
        if self.gate_tolerance_rec < 0 or self.gate_rec_limit < 0:
            raise ValueError("gate_tolerance_rec and gate_rec_limit must be >= 0")

    def resolved_device(self) -> str:
        """The device training runs on."""
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def use_bf16(self) -> bool:
        """bf16 on CUDA by default; CPU training stays fp32 (bf16 matmuls are slow and lossy there)."""
        if self.bf16 == "auto":
            return self.resolved_device().startswith("cuda")
        return self.bf16.lower() in ("1", "true", "yes")

    def gate_tolerances(self) -> dict[str, float]:
        """Per-metric tolerances in the form services.admin.gate.evaluate_gate takes."""
        return {PREFERENCE_ACCURACY: self.gate_tolerance_accuracy, REWARD_MARGIN: self.gate_tolerance_margin}

    def kafka(self) -> KafkaSettings:
        """Client settings for the pairs consumer and the adapters producer."""
        version = tuple(int(p) for p in self.kafka_api_version.split(".")) if self.kafka_api_version else None
        return KafkaSettings(
            bootstrap_servers=self.bootstrap_servers,
            client_id="spr-trainer",
            api_version=version,
            session_timeout_ms=self.kafka_session_timeout_ms,
            heartbeat_interval_ms=min(3_000, self.kafka_session_timeout_ms // 3),
            # A round trains between two polls; the consumer must not be evicted meanwhile.
            max_poll_interval_ms=self.kafka_max_poll_interval_ms,
        )

    def hyperparameters(self) -> dict[str, str]:
        """What goes into the manifest: everything that shapes the weights, plus the REC gate's set and
        size when that gate is on (its metrics in the manifest mean nothing without naming the set)."""
        keys = [
            "objective",
            "dpo_loss",
            "beta",
            "rpo_alpha",
            "learning_rate",
            "lr_scheduler",
            "warmup_ratio",
            "num_epochs",
            "max_steps",
            "batch_size",
            "gradient_accumulation",
            "max_length",
            "seed",
            "lora_r",
            "lora_alpha",
            "lora_dropout",
            "lora_target_modules",
            "heldout_fraction",
            "continue_from",
        ]
        if self.gate_rec_data:
            keys += ["gate_rec_data", "gate_rec_limit"]
        return {key: str(getattr(self, key)) for key in keys}
