"""Every jaxgpt model as a model of EleutherAI's lm-evaluation-harness.

  python -m jaxgpt.main --mode=eval --workdir=out/run --tasks=hellaswag,arc_easy
  python -m jaxgpt.evals.harness --model jaxgpt --model_args workdir=out/run --tasks hellaswag
  lm_eval --model jaxgpt --model_args init_from=gpt2 --tasks hellaswag

`JaxGPTLM` is registered under the name "jaxgpt": importing this module
registers it, and setup.cfg declares it in the `lm_eval.models` entry-point
group, which harness versions with plugin discovery read (so that the plain
`lm_eval` command finds it); `python -m jaxgpt.evals.harness` is the harness's own
command line with jaxgpt registered, for any harness version. Its model_args:
workdir (a run's checkpoint; checkpoint=latest|best) or init_from (anything
--init_from takes), batch_size (rows per compiled call), max_gen_toks, seed,
add_bos_token (as HFLM's: left out, texts are encoded as the tokenizer does by
default, e.g. after Llama's <s>; True, after the tokenizer's bos; False, alone).

The harness tokenises requests through tok_encode (the run's tokenizer, as
HFLM encodes them) and splits context and continuation itself (TemplateLM);
jaxgpt scores them:
- loglikelihood: scoring.make_score on rows sorted by length and padded to a
  few lengths, batch_size rows at a time: one program per length.
- loglikelihood_rolling: the harness's windows of block_size tokens, each
  token predicted once with as much context as fits, scored the same way.
- generate_until: generate.generate with its KV cache, greedy or sampled,
  prompts (left-truncated to block_size - max_gen_toks tokens, as HFLM does)
  padded to the same few lengths and cut at the first stop string (and the
  first end of text or, for a chat model, end of turn).

Chat models (the harness's --apply_chat_template, --fewshot_as_multiturn,
--system_instruction): the harness hands apply_chat_template the
conversation (system instruction, few-shot turns, the question) and scores
or continues the text it returns. The template is the one the model's
tokenizer brings (datasets.chat_template.template_for): a Hugging Face
model's jinja template, rendered as transformers renders it (so as HFLM
does), or jaxgpt's chat tokens; a model with neither is refused in one line.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any
from unittest import mock

if __name__ == "__main__":  # Without the eval extra: one line, not a traceback.
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        from jaxgpt.run import errors

        sys.exit(
            errors.needs_package_line(
                "python -m jaxgpt.evals.harness", "lm-evaluation-harness", e, "eval"
            )
        )

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm import tqdm

from jaxgpt import generate, lecture, model, sharding, train
from jaxgpt.config import ConfigError
from jaxgpt.datasets import chat_template as chat
from jaxgpt.evals import scoring
from jaxgpt.hub import hf, load, tokenizer_io
from jaxgpt.run import errors, hosts, layout
from jaxgpt.run.configs import RunConfig

DEFAULT_ROWS = 16  # Rows per compiled call when the harness says "auto".
SAMPLING = ("do_sample", "temperature", "top_k", "top_p", "until", "max_gen_toks")


def load_checkpoint(workdir, init_from, checkpoint: str, mesh):
    """(model config, parameters, tokenizer) of a workdir's checkpoint or of
    --init_from's weights; ConfigError if neither or both are named."""
    if bool(workdir) == bool(init_from):
        raise ConfigError(
            "name the model with workdir=<a run's --workdir> or init_from=<gpt2, a"
            " folder in Hugging Face's layout, ...> in --model_args (one of them)."
        )
    run = RunConfig(workdir=str(workdir or "out"), init_from=init_from or None)
    return load.load_model(run, checkpoint, mesh)


def as_flag(name: str, value: bool | str | None) -> bool | None:
    """A true/false model_arg (a bool, or its text), or None; ConfigError else."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "false"):
        raise ConfigError(f"--model_args {name}={value}: give True or False.")
    return text == "true"


def rows_per_call(batch_size: Any, mesh) -> int:
    """The harness's batch_size (an int, a string, "auto"...) as rows per
    compiled call, a multiple of the mesh's devices."""
    n = int(batch_size) if str(batch_size).isdigit() else DEFAULT_ROWS
    devices = layout.batch_devices(mesh)
    return -(-max(n, 1) // devices) * devices


@functools.lru_cache
def score_of(model_cfg, mesh):
    """scoring.make_score, one per (config, mesh): models of one config (another
    add_bos_token, say) share its compiled programs."""
    return scoring.make_score(model_cfg, mesh)


@register_model("jaxgpt")
class JaxGPTLM(TemplateLM):
    """A jaxgpt checkpoint (or --init_from's weights) for the harness; `loaded`
    passes an already loaded (model config, params, tokenizer) instead."""

    def __init__(
        self,
        workdir: str | None = None,
        init_from: str | None = None,
        checkpoint: str = "latest",
        batch_size: int | str = DEFAULT_ROWS,
        max_gen_toks: int = 256,
        seed: int = 1337,
        add_bos_token: bool | str | None = None,
        loaded: tuple | None = None,
        mesh=None,
        **ignored: Any,  # max_batch_size, device: JAX places the work.
    ):
        super().__init__()
        add_bos_token = as_flag("add_bos_token", add_bos_token)
        if jax.process_count() > 1:
            raise ConfigError("lm-eval tasks run in one process (of many devices).")
        self.mesh = mesh or sharding.make_mesh()
        if loaded is None:
            loaded = load_checkpoint(workdir, init_from, checkpoint, self.mesh)
        self.model_cfg, self.params, self.tok = loaded
        self.source = str(workdir or init_from or "")
        self.rows = rows_per_call(batch_size, self.mesh)
        self._max_gen_toks = int(max_gen_toks)
        self.score = score_of(self.model_cfg, self.mesh)
        self.apply_fn = lecture.apply_of(
            self.model_cfg
        )  # generate()'s compiled programs' key.
        self.encode = scoring.encoder(self.tok, add_bos_token)
        self.sample_key = train.stream(train.root_key(int(seed)), "sample")
        self.draws = 0  # Generation calls so far: draw i samples with key i.
        self.local_params = None  # On this process, for generation; made once.

    # --- What the harness asks of a model -------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return scoring.prefix_token(self.tok)

    @property
    def max_length(self) -> int:
        return self.model_cfg.block_size

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        """The model's name (as HFLM's: "/" as "__"): it keys the harness's
        caches of chat-templated requests."""
        return (self.source or self.tok.name).replace("/", "__")

    @functools.cached_property
    def template(self) -> chat.ChatTokenizer | chat.HFChatTemplate | None:
        """The chat template the model's tokenizer brings, if any."""
        return chat.template_for(self.tok)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The jinja template --apply_chat_template renders with (the harness
        logs it); None when chat_template is False."""
        if not chat_template:
            return None
        template = self.require_chat()
        if isinstance(template, chat.HFChatTemplate):
            return template.template
        return tokenizer_io.CHAT_JINJA

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The conversation as the template's text, with the assistant's header
        (add_generation_prompt) or, as HFLM, continuing its last message. As
        HFLM, a template that refuses the system role renders without it."""
        template = self.require_chat()
        args = (add_generation_prompt, not add_generation_prompt)
        try:
            return chat.chat_text(template, chat_history, *args)
        except chat.ChatTemplateError as e:
            without = [m for m in chat_history if m["role"] != "system"]
            if len(without) == len(chat_history):
                raise ConfigError(str(e)) from None
            logging.warning("%s; rendering without the system message.", e)
            return chat.chat_text(template, without, *args)

    def require_chat(self) -> chat.ChatTokenizer | chat.HFChatTemplate:
        """The model's chat template; ConfigError if it has none."""
        try:
            template = self.template
        except chat.ChatTemplateError as e:  # One that does not compile, say.
            raise ConfigError(f"--apply_chat_template: {e}") from None
        if template is None:
            raise ConfigError(
                f"--apply_chat_template: the model's {self.tok.name!r} tokenizer has"
                " no chat template: leave --apply_chat_template out, or evaluate a"
                " chat model (trained with jaxgpt's chat tokens, or a Hugging Face"
                " model whose folder has a chat_template)."
            )
        return template

    @functools.cached_property
    def stop_ids(self) -> frozenset[int]:
        """The ids a continuation ends at: the end of text, and a chat
        template's end of turn (<|im_end|>, jaxgpt's <|end|>)."""
        try:
            turn = self.template.stop_ids if self.template else ()
        except chat.ChatTemplateError:  # A template that cannot be used: none.
            turn = ()
        return frozenset({self.tok.eos_id, *turn} - {None})

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        """As HFLM's: a string that starts with the prefix token's text gets no
        special tokens added."""
        if add_special_tokens is None and string.startswith(
            self.tok_decode([self.prefix_token_id])
        ):
            add_special_tokens = False
        return self.encode(string, add_special_tokens)

    def tok_decode(self, tokens) -> str:
        return self.tok.decode(tokens)

    def get_model_info(self) -> dict:
        return {
            "model_source": self.source,
            "model_num_parameters": model.count_params(self.params),
            "model_dtype": self.model_cfg.dtype,
            "model_config": self.model_cfg.to_dict(),
        }

    # --- Scoring ---------------------------------------------------------------------

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """(log-likelihood, greedy) of each (key, context ids, continuation ids),
        longest first, `rows` at a time."""
        S, B = self.max_length, self.rows
        windows = [scoring.window(ctx, cont, S) for _, ctx, cont in requests]
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
        out: list[Any] = [None] * len(windows)
        starts = range(0, len(order), B)
        for lo in tqdm(
            starts, disable=disable_tqdm, desc="loglikelihood", unit="batch"
        ):
            chunk = order[lo : lo + B]
            T = scoring.padded_length(len(windows[chunk[0]][0]), S)
            batch = scoring.pack([windows[i] for i in chunk], B, T)
            ll_B, greedy_B = jax.device_get(self.score(self.params, *batch))
            for row, i in enumerate(chunk):
                out[i] = (float(ll_B[row]), bool(greedy_B[row]))
                if requests[i][0] is not None:  # Rolling windows are cached whole.
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
        return out

    def loglikelihood_rolling(
        self, requests, disable_tqdm: bool = False
    ) -> list[float]:
        """Each text's log-likelihood over the harness's windows of block_size."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for ctx, pred in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, ctx, pred))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- Generation ------------------------------------------------------------------

    def sampling(self, gen_kwargs: dict) -> dict:
        """The harness's generation kwargs as generate()'s options, or ValueError
        naming one it cannot honour."""
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        unknown = sorted(set(kwargs) - set(SAMPLING))
        if unknown:
            raise ValueError(
                f"jaxgpt's sampler takes {', '.join(SAMPLING)}; the task asks for"
                f" {unknown[0]}={kwargs[unknown[0]]!r}."
            )
        N = kwargs["max_gen_toks"]
        if not 0 < N < self.max_length:
            raise ValueError(
                f"max_gen_toks={N} must lie in [1, {self.max_length}), the model's"
                " context (the prompt keeps the rest): pass --gen_kwargs max_gen_toks=..."
            )
        temperature, top_p = (
            float(kwargs.get("temperature") or 0.0),
            kwargs.get("top_p"),
        )
        if kwargs["do_sample"] and not temperature:
            temperature = 1.0  # Sampling without a temperature: transformers' default.
        return {
            "max_new_tokens": N,
            "temperature": temperature if kwargs["do_sample"] else 0.0,
            "top_k": kwargs.get("top_k") or None,
            "top_p": float(top_p) if top_p is not None and top_p < 1.0 else None,
        }

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations, cut at the first stop string (or end of text, or the
        chat template's end of turn)."""
        eot, bos = self.tok.eos_id, self.tok.bos_id
        eos = None if eot is None else self.tok_decode([eot])
        bos = None if bos is None else self.tok_decode([bos])
        groups = defaultdict(list)  # Same options and prompt length: one batch.
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            options = self.sampling(gen_kwargs)
            room = self.max_length - options["max_new_tokens"]
            # HFLM adds no special tokens to a prompt that starts with bos's text.
            special = False if bos and context.startswith(bos) else None
            ids = self.encode(context, special)[-room:] or [self.prefix_token_id]
            until = handle_stop_sequences(gen_kwargs.get("until"), eos=eos)
            key = (json.dumps(options, sort_keys=True), len(ids))
            groups[key].append((i, ids, until))
        out: list[Any] = [None] * len(requests)
        chunks = [
            (json.loads(key[0]), items[lo : lo + self.rows])
            for key, items in groups.items()
            for lo in range(0, len(items), self.rows)
        ]
        for options, chunk in tqdm(chunks, disable=disable_tqdm, desc="generate"):
            rows = self.draw(options, [ids for _, ids, _ in chunk])
            for (i, _, until), tokens in zip(chunk, rows):
                ends = [at for at, t in enumerate(tokens) if t in self.stop_ids]
                tokens = tokens[: ends[0]] if ends else tokens
                text = postprocess_generated_text(self.tok_decode(tokens), until, None)
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    def draw(self, options: dict, prompts: list[list[int]]) -> list[list[int]]:
        """The new tokens of prompts of one length: one generate() call, its rows
        padded to a power of two and its prompts to one of scoring.lengths."""
        p, N = len(prompts[0]), options["max_new_tokens"]
        B = min(1 << (len(prompts) - 1).bit_length(), self.rows)
        prompt_BP = np.zeros((B, scoring.padded_length(p, self.max_length)), np.int32)
        prompt_BP[:, :p] = prompts[0]
        for row, ids in enumerate(prompts):
            prompt_BP[row, :p] = ids
        key = jax.random.fold_in(self.sample_key, self.draws)
        self.draws += 1
        if self.local_params is None:
            self.local_params = hosts.to_local(self.params, self.mesh)
        buf_BA = generate.generate(
            self.apply_fn,
            self.local_params,
            jnp.asarray(prompt_BP),
            key,
            block_size=self.max_length,
            **generate.cache_options(self.model_cfg),
            prompt_len=jnp.int32(p),
            **options,
        )
        return np.asarray(buf_BA)[: len(prompts), p : p + N].tolist()


# --- Running tasks -----------------------------------------------------------------


def task_name(path: str | Path) -> str:
    """The `task:` a task yaml defines (its !function tags left unresolved)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, tag, node: None)
    try:
        name = (yaml.load(Path(path).read_text(), Loader) or {}).get("task")
    except (OSError, yaml.YAMLError, AttributeError) as e:
        raise ConfigError(
            f"--tasks: cannot read {path} as a task yaml ({e})."
        ) from None
    if not isinstance(name, str):
        raise ConfigError(f"--tasks: {path} names no task (its `task:` key).")
    return name


def evaluate(
    lm: JaxGPTLM,
    tasks: list[str],
    num_fewshot: int | None = None,
    limit: float | None = None,
    include_path: str | None = None,
    output: str | Path | None = None,
    **kwargs: Any,
) -> dict:
    """lm_eval.simple_evaluate of `lm` on `tasks` (names, or task yaml files):
    prints the harness's table and, with `output` (a .json path), writes the
    results beside it, dated. The harness's own tasks are indexed only when a
    task is named, not given as a yaml file."""
    import lm_eval
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    files = [t for t in tasks if t.endswith(".yaml")]
    folders = [include_path] if include_path else []
    folders += sorted({str(Path(f).resolve().parent) for f in files})
    named = [t for t in tasks if t not in files]
    manager = TaskManager(include_path=folders or None, include_defaults=bool(named))
    names = named + [task_name(f) for f in files]
    for name in names:
        if not manager.match_tasks([name]):
            raise no_task(name)
    tracker = EvaluationTracker(output_path=str(output)) if output else None
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=names,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        evaluation_tracker=tracker,
        log_samples=False,
        **kwargs,
    )
    print(lm_utils.make_table(results))
    if "groups" in results:
        print(lm_utils.make_table(results, "groups"))
    if tracker is not None:
        tracker.save_results_aggregated(results=results, samples=None)
        logging.info("results written beside %s", output)
    return results


# Where lm-eval's command line checks its arguments: what these raise is a
# refusal of the command line, not a failure.
LM_EVAL_CLI = ("__main__.py", "_cli", "config", "evaluator.py")


def command_line_error(e: Exception) -> str | None:
    """The one line for an error lm-eval's command line raised about its
    arguments (a task it does not have, a bad --config), or None for others."""
    frames = traceback.extract_tb(e.__traceback__)
    path = Path(frames[-1].filename).parts if frames else ()
    if "lm_eval" not in path or path[path.index("lm_eval") + 1] not in LM_EVAL_CLI:
        return None
    missing = re.match(r"Tasks not found: ([^.]*)", str(e))
    if missing:
        return errors.one_line(no_task(missing.group(1).strip()))
    if str(e).startswith("No tasks specified"):
        return errors.one_line(
            "no task to score: name them with --tasks (e.g. --tasks hellaswag;"
            " `lm_eval ls tasks` lists them)."
        )
    return errors.one_line(e)


def no_task(names: str) -> ConfigError:
    """The refusal of task names (comma-separated) that lm-eval does not have."""
    listed = [n.strip() for n in names.split(",") if n.strip()]
    which = f"task {listed[0]!r}" if len(listed) == 1 else f"tasks {', '.join(listed)}"
    return ConfigError(
        f"--tasks: lm-eval has no {which} (`lm_eval ls tasks` lists them;"
        " --include_path adds a folder of task yamls)."
    )


def main() -> None:
    """The harness's command line (`lm_eval ...`), with jaxgpt registered; its
    refusals are one `error:` line each."""
    from lm_eval.__main__ import cli_evaluate

    from jaxgpt.run import cache

    cache.enable_compilation_cache()
    one_line_usage = mock.patch.object(
        argparse.ArgumentParser, "error", errors.ArgumentParser.error
    )
    try:
        with one_line_usage:
            cli_evaluate()
    except (ConfigError, hf.HuggingFaceError) as e:
        sys.exit(errors.one_line(e))
    except (ValueError, TypeError, OSError) as e:
        line = command_line_error(e)
        if line is None:
            raise
        sys.exit(line)


if __name__ == "__main__":
    main()
