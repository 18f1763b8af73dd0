"""The engine's options, beside the core's (config.py): where a run lives and
what it does (RunConfig), the training loop (LoopConfig), sampling
(SampleConfig), its dataset (DataConfig), its devices (MeshConfig),
downstream evaluation (EvalConfig), export (ExportConfig) and chat
(ChatConfig). Each field with help text is a
flag, made by cli.py, as in config.py."""

from __future__ import annotations

import dataclasses
import os
from typing import Literal

from jaxgpt.config import (
    ConfigError,
    ModelConfig,
    TrainConfig,
    check_choices,
    option,
    require_positive,
)


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """Text generation from a trained model (its key: the run's sample stream)."""

    checkpoint: Literal["latest", "best"] = option(
        "latest", "Which checkpoint --mode=sample reads."
    )
    prompt: str = option("\n", "Text the samples continue.")
    max_new_tokens: int = option(500, "Tokens to generate.")
    temperature: float = option(0.8, "Sampling temperature (0: greedy).")
    top_k: int = option(200, "Sample among the k likeliest tokens (0: all).")
    top_p: float = option(
        1.0, "Sample among the likeliest tokens holding this mass (1: all)."
    )
    num_samples: int = option(1, "Samples to draw.")
    kv_cache: bool = option(
        True, "Cache keys/values while sampling (no: re-run the window per token)."
    )

    def __post_init__(self):
        check_choices(self)
        require_positive(
            max_new_tokens=self.max_new_tokens, num_samples=self.num_samples
        )
        if not self.prompt:
            raise ConfigError(
                "--prompt is empty: give at least one character, e.g."
                " --prompt=$'\\n' (the default)."
            )
        if self.temperature < 0:
            raise ConfigError(
                f"--temperature={self.temperature} must be >= 0 (0 samples greedily)."
            )
        if self.top_k < 0:
            raise ConfigError(
                f"--top_k={self.top_k} must be >= 0 (0 keeps all tokens)."
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(
                f"--top_p={self.top_p} must lie in (0, 1] (1 keeps all tokens)."
            )

    def options(self) -> dict:
        """generate.sample's keyword arguments."""
        names = ("num_samples", "max_new_tokens", "temperature", "top_k", "top_p")
        return {name: getattr(self, name) for name in (*names, "kv_cache")}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What to do, where, and from which seed."""

    mode: Literal["train", "sample", "eval"] = option(
        "train",
        "train (resumes from --workdir if it holds a checkpoint), sample from the"
        " checkpoint in --workdir (or --init_from's weights), or eval: its loss and"
        " bits per byte on --dataset (and --eval_tasks), or with --tasks its"
        " lm-evaluation-harness scores.",
    )
    init_from: str | None = option(
        None,
        "Start from pretrained weights: gpt2, gpt2-medium, gpt2-large, gpt2-xl, a"
        " Hugging Face Hub repository of a GPT-2 or Llama-family model (e.g."
        " HuggingFaceTB/SmolLM2-135M), or a local folder in Hugging Face's"
        " GPT2LMHeadModel or LlamaForCausalLM layout. Training finetunes them (a"
        " workdir's checkpoint, once there, is resumed instead).",
    )
    workdir: str = option("out", "Checkpoints, metrics.jsonl and the run's meta.")
    overwrite: bool = option(
        False, "Delete the checkpoints in --workdir and start afresh."
    )
    allow_changes: bool = option(
        False,
        "Resume even though training settings (optimizer, schedule, batch, seed)"
        " differ from the checkpoint's; the change and its step are recorded in"
        " the checkpoint's meta.",
    )
    seed: int = option(
        1337, "Root of every random stream: init, batches, dropout, evals, sampling."
    )
    peak_tflops: float | None = option(
        None,
        "Peak TFLOP/s of one device, for the MFU in the log. Default: the data"
        " sheet's for a known GPU/TPU (jaxgpt/run/perf.py), else measured with a matmul.",
    )
    tensorboard: bool = option(
        True,
        "Write TensorBoard event files (losses, learning rate, gradient norm,"
        " tokens/s, MFU, a sample per evaluation) to --workdir.",
    )

    def __post_init__(self):
        check_choices(self)
        if self.peak_tflops is not None:
            require_positive(peak_tflops=self.peak_tflops)
        if not self.workdir.strip():  # An unset shell variable: the current folder.
            raise ConfigError(
                f"--workdir={self.workdir!r} names no folder (an unset shell"
                " variable?): name the run's own folder, e.g. --workdir=out."
            )
        if not -(2**63) <= self.seed < 2**63:
            raise ConfigError(
                f"--seed={self.seed} does not fit in 64 bits: choose a seed in"
                f" [{-(2**63)}, {2**63 - 1}]."
            )


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """The training loop: evaluations, checkpoints, log lines and guards."""

    max_iters: int  # TrainConfig's (--max_iters): the schedule's end, not a flag here.
    stop_at: int | None = option(
        None,
        "Stop (and checkpoint) at this step without changing the schedule; rerun"
        " to resume.",
    )
    eval_interval: int = option(250, "Steps between evaluations and checkpoints.")
    log_interval: int = option(10, "Steps between log lines.")
    save_every_minutes: float = option(
        15.0,
        "Also save the latest checkpoint when this many minutes have passed since"
        " the last save, so a preempted run loses at most that much (0: off).",
    )
    max_loss_ratio: float = option(
        3.0,
        "Stop as diverged when a loss exceeds this multiple of the best val loss"
        " so far (0: only a non-finite loss stops); nothing diverged is saved.",
    )

    def __post_init__(self):
        check_choices(self)
        require_positive(
            eval_interval=self.eval_interval, log_interval=self.log_interval
        )
        if self.save_every_minutes < 0 or self.max_loss_ratio < 0:
            raise ConfigError(
                f"--save_every_minutes={self.save_every_minutes} and --max_loss_ratio"
                f"={self.max_loss_ratio} must be >= 0 (0 turns them off)."
            )
        if 0 < self.max_loss_ratio <= 1:
            raise ConfigError(
                f"--max_loss_ratio={self.max_loss_ratio} must exceed 1 (or be 0:"
                " off): a loss a little above the best is normal noise."
            )
        if self.stop_at is not None and not 0 < self.stop_at <= self.max_iters:
            raise ConfigError(
                f"--stop_at={self.stop_at} must lie in (0, --max_iters="
                f"{self.max_iters}]."
            )

    @property
    def end_step(self) -> int:
        """Where this invocation stops: --stop_at, else --max_iters."""
        return self.stop_at or self.max_iters


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The dataset: prepared token files, and where their text comes from."""

    dataset: str = option(
        "shakespeare_char",
        "Dataset: shakespeare_char, shakespeare (GPT-2 BPE), openwebtext,"
        " fineweb_edu, or any name for --data_path's text. Prepared on first use.",
    )
    data_dir: str = option(
        "data", "Prepared datasets: <data_dir>/<dataset>/{train,val}.bin, meta.json."
    )
    data_path: str | None = option(
        None,
        "A text file or a folder of .txt/.jsonl files to prepare as --dataset."
        " Default for the shakespeare datasets: tiny shakespeare from"
        " $JAXGPT_DATA_DIR/tinyshakespeare/input.txt, the cache, or a download.",
    )
    tokenizer: str | None = option(
        None,
        "How to tokenise a dataset being prepared: char, gpt2, bpe:<vocab size>"
        " (learned from its text), a tokenizer .json (jaxgpt's or Hugging Face"
        " tokenizers'), or a model folder or Hub repository (its tokenizer.json)."
        " Default: the dataset's own (char for shakespeare_char and for --data_path"
        " text, else gpt2).",
    )
    max_documents: int | None = option(
        None, "Prepare only the first this many documents of a streamed dataset."
    )

    def __post_init__(self):
        if not self.dataset or "/" in self.dataset or self.dataset.startswith("."):
            raise ConfigError(
                f"--dataset={self.dataset!r} must be a plain folder name, e.g."
                " --dataset=shakespeare_char."
            )
        if self.max_documents is not None:
            require_positive(max_documents=self.max_documents)
        if self.tokenizer is not None:
            check_tokenizer_spec(self.tokenizer)


BPE_MIN_VOCAB = 257  # A byte-level BPE's 256 bytes and <|endoftext|>.


def check_tokenizer_spec(spec: str) -> None:
    """--tokenizer names a tokenizer jaxgpt makes: char, gpt2, bpe:<size> (at
    least its bytes and <|endoftext|>), a .json file, or a model folder or Hub
    repository (a path or owner/name) holding a tokenizer.json."""
    if spec in ("char", "gpt2") or spec.endswith(".json") or "/" in spec:
        return
    if os.path.isdir(spec):
        return
    if spec.startswith("bpe:") and spec[4:].isdigit():
        if int(spec[4:]) < BPE_MIN_VOCAB:
            raise ConfigError(
                f"--tokenizer={spec} is too small: a byte-level BPE has 256 byte"
                f" tokens and <|endoftext|> before any merge, so give at least"
                f" bpe:{BPE_MIN_VOCAB} (e.g. bpe:4096)."
            )
        return
    raise unknown_tokenizer(spec)


def unknown_tokenizer(spec: str) -> ConfigError:
    return ConfigError(
        f"--tokenizer={spec} is unknown: use char, gpt2, bpe:<vocab size> (e.g."
        " bpe:4096, trained on the dataset), a tokenizer .json file, or a model"
        " folder or Hub repository holding a tokenizer.json."
    )


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Devices and hosts: the (data, fsdp) mesh and a multi-process run."""

    mesh_data: int | None = option(
        None, "Data-parallel axis of the device mesh (default: devices / fsdp)."
    )
    mesh_fsdp: int = option(
        1, "FSDP axis: devices that split the parameters and optimizer state."
    )
    coordinator_address: str | None = option(
        None,
        "host:port of process 0, for a run over several processes or hosts; with"
        " --num_processes and --process_id.",
    )
    num_processes: int | None = option(None, "Processes in the run.")
    process_id: int | None = option(None, "This process: 0 .. num_processes - 1.")
    distributed_timeout: int = option(
        300,
        "Seconds a process of a multi-process run waits for all the others to"
        " join before it gives up in one line.",
    )

    def __post_init__(self):
        if self.mesh_fsdp < 1 or (self.mesh_data is not None and self.mesh_data < 1):
            raise ConfigError(
                f"--mesh_data={self.mesh_data} and --mesh_fsdp={self.mesh_fsdp} must"
                " be >= 1."
            )
        given = (self.coordinator_address, self.num_processes, self.process_id)
        if any(v is None for v in given) and not all(v is None for v in given):
            raise ConfigError(
                "--coordinator_address, --num_processes and --process_id go together:"
                " give all three (the same address and count to every process, ids"
                " 0 .. num_processes - 1), or none for a single process."
            )
        require_positive(distributed_timeout=self.distributed_timeout)
        if self.multi_process and not 0 <= self.process_id < self.num_processes:
            raise ConfigError(
                f"--process_id={self.process_id} must lie in [0, --num_processes"
                f"={self.num_processes})."
            )

    @property
    def multi_process(self) -> bool:
        return self.coordinator_address is not None


EVAL_TASKS = ("hellaswag", "chat")  # Downstream tasks a training run can score itself.


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Downstream tasks: HellaSwag while training, lm-evaluation-harness tasks."""

    tasks: str | None = option(
        None,
        "--mode=eval: lm-evaluation-harness tasks (comma-separated names, e.g."
        " hellaswag,arc_easy, or task yaml files) scored by lm_eval.simple_evaluate"
        " instead of the loss; the harness's table is printed and its JSON written"
        " to <workdir>/lm_eval_results_<date>.json. Needs the eval extra.",
    )
    include_path: str | None = option(
        None, "A folder of lm-eval task yamls that --tasks may name too."
    )
    num_fewshot: int | None = option(
        None, "Few-shot examples per --tasks prompt (default: each task's own)."
    )
    limit: float | None = option(
        None,
        "Score only the first this many examples of each of --tasks (below 1: that"
        " fraction of them); for a quick look, not for reported scores.",
    )
    apply_chat_template: bool = option(
        False,
        "--tasks as a chat model answers them (lm-eval's --apply_chat_template):"
        " each request rendered with the model's chat template, the checkpoint's"
        " own or its Hugging Face folder's.",
    )
    fewshot_as_multiturn: bool = option(
        True,
        "With --apply_chat_template: the few-shot examples as earlier turns of the"
        " conversation (lm-eval's default); --nofewshot_as_multiturn: all in the"
        " first user turn.",
    )
    system_instruction: str | None = option(
        None,
        "--tasks: a system message before every request (with"
        " --apply_chat_template, the template's system turn).",
    )
    eval_batch_size: int = option(
        16,
        "Rows (sequences) per compiled call when scoring tasks: --tasks' requests,"
        " --eval_tasks' endings (4 per HellaSwag example), and the chat task's"
        " replies decoded together.",
    )
    eval_tasks: str | None = option(
        None,
        "Also score these downstream tasks at each evaluation of a run (and in"
        " --mode=eval): hellaswag, its acc and acc_norm scored completion-style as"
        " lm-evaluation-harness scores them; chat, the exact match of greedy replies"
        " to --chat_eval_path's records (jaxgpt.evals.generation).",
    )
    eval_task_examples: int | None = option(
        None,
        "Score only the first this many examples of --eval_tasks (default: all"
        " 10,042 of HellaSwag's validation split).",
    )
    eval_data_path: str | None = option(
        None,
        "HellaSwag's validation split as a local jsonl (Rowan/hellaswag's rows),"
        " for a machine offline. Default: <data_dir>/hellaswag/validation.jsonl,"
        " read once through HF datasets and kept there.",
    )
    chat_eval_path: str | None = option(
        None,
        "The chat task's test split (test.jsonl of python -m"
        " jaxgpt.datasets.chat_tasks) that --eval_tasks=chat and python -m"
        " jaxgpt.evals.generation score.",
    )
    chat_data_path: str | None = option(
        None,
        "The chat task's train split (train.jsonl of python -m"
        " jaxgpt.datasets.chat_tasks) whose prompts python -m jaxgpt.tools.grpo"
        " answers and learns from the rewards of.",
    )

    def __post_init__(self):
        require_positive(eval_batch_size=self.eval_batch_size)
        for name in ("tasks", "eval_tasks"):
            if getattr(self, name) is not None and not self.task_list(name):
                raise ConfigError(f"--{name} is empty: name at least one task.")
        unknown = [t for t in self.task_list("eval_tasks") if t not in EVAL_TASKS]
        if unknown:
            raise ConfigError(
                f"--eval_tasks={self.eval_tasks}: {unknown[0]!r} is not one a run"
                f" scores itself ({', '.join(EVAL_TASKS)}); use --mode=eval --tasks"
                " for lm-evaluation-harness's tasks."
            )
        if "chat" in self.task_list("eval_tasks") and not self.chat_eval_path:
            raise ConfigError(
                "--eval_tasks=chat needs --chat_eval_path: the test.jsonl that"
                " python -m jaxgpt.datasets.chat_tasks writes."
            )
        if self.eval_task_examples is not None:
            require_positive(eval_task_examples=self.eval_task_examples)
        if self.limit is not None:
            require_positive(limit=self.limit)
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ConfigError(f"--num_fewshot={self.num_fewshot} must be >= 0.")
        chat = (
            ("apply_chat_template", self.apply_chat_template),
            ("system_instruction", self.system_instruction is not None),
        )
        for name, given in chat:
            if given and self.tasks is None:
                raise ConfigError(
                    f"--{name} shapes lm-evaluation-harness's requests: add"
                    " --mode=eval --tasks=..., or leave it out."
                )

    def task_list(self, name: str = "tasks") -> list[str]:
        """--tasks (or --eval_tasks) as a list of names."""
        return [t.strip() for t in (getattr(self, name) or "").split(",") if t.strip()]


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """Writing a trained model in Hugging Face's layout (python -m jaxgpt.hub.export)."""

    out: str | None = option(
        None, "Folder to write (config.json, model.safetensors, the tokenizer)."
    )
    format: Literal["auto", "gpt2", "llama"] = option(
        "auto",
        "The layout: gpt2 (GPT2LMHeadModel), llama (LlamaForCausalLM), or auto:"
        " GPT-2's for a model with GPT-2's choices, else Llama's.",
    )

    def __post_init__(self):
        check_choices(self)


@dataclasses.dataclass(frozen=True)
class ChatConfig:
    """Talking to a model: the terminal chat (python -m jaxgpt.chat) and the
    OpenAI-compatible server with its web page (python -m jaxgpt.serve). Replies
    sample with --temperature, --top_p, --top_k and --max_new_tokens."""

    system: str = option(
        "", "A system message that starts each conversation (empty: none)."
    )
    host: str = option(
        "127.0.0.1",
        "The address the server listens on (0.0.0.0: every interface; then set"
        " --api_key).",
    )
    port: int = option(8000, "The server's port.")
    api_key: str = option(
        "", "A bearer token every API request must carry (empty: none asked)."
    )
    slots: int = option(
        16, "Requests the server decodes together, one token each per step."
    )
    max_waiting: int = option(
        256,
        "Replies that may wait for a free slot; a request past them gets 429 at"
        " once, with Retry-After (OpenAI's clients retry it).",
    )
    max_request_bytes: int = option(
        1_000_000, "The largest request body the server reads (larger: 413)."
    )
    max_messages: int = option(
        512, "The most messages one chat request may hold (more: 400)."
    )
    model_name: str = option(
        "", "The model's name in the API (empty: --init_from's, or --workdir's)."
    )

    def __post_init__(self):
        require_positive(
            port=self.port,
            slots=self.slots,
            max_waiting=self.max_waiting,
            max_request_bytes=self.max_request_bytes,
            max_messages=self.max_messages,
        )


# The options a resume may change: how, not what, a run trains (the logging
# cadence, the compute dtype...). The one list of them: docs/flags.md marks
# them, the checkpoint's meta leaves them out of the settings a resume checks.
FREE_ON_RESUME = {
    ModelConfig: ("dropout", "dtype", "remat", "attention"),
    TrainConfig: ("eval_iters",),
    LoopConfig: (
        "stop_at", "eval_interval", "log_interval", "save_every_minutes",
        "max_loss_ratio",
    ),
}  # fmt: skip


def free_on_resume(cls: type) -> tuple[str, ...]:
    """The names of `cls`'s options a resume may change."""
    return FREE_ON_RESUME.get(cls, ())


# Every config, in the order docs/flags.md lists them.
ALL = (
    RunConfig,
    DataConfig,
    ModelConfig,
    TrainConfig,
    LoopConfig,
    SampleConfig,
    MeshConfig,
    EvalConfig,
    ExportConfig,
    ChatConfig,
)
