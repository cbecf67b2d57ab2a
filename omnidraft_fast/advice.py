"""The warnings a checked request gets where ``model.generate()`` warns: options that change nothing in it,
lengths that cannot be met or were left to the default, and a batch whose padding cannot be inferred.

transformers logs or warns each of these (``GenerationConfig.validate`` and ``generate``'s length checks);
here each is a ``UserWarning`` in this engine's words, given once the request has passed every check (a
refused request gets its error only). As in transformers, an option that only matters in another mode
(sampling, beam search) is named when the caller set it, or when it comes from a generation config and
the caller did not choose the mode: a greedy request from ``do_sample=False`` passed to the call is not
warned about a model's configured ``temperature``. A length (``max_length``, ``min_length``) beside the
``*_new_tokens`` that decides is named wherever it was set, the model's generation_config included, and
not where the call unset either. Not said again: transformers' check of a model's generation_config by
itself (sampling options beside its own ``do_sample=False``), which it makes when the model loads and
again at each call.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

__all__ = ["advise"]

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep

# Options that only sampling reads, with the value at which they do nothing (None: any value is read).
_SAMPLING_ONLY: dict[str, Any] = {
    "temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": None, "top_h": None, "typical_p": 1.0,
    "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
}  # fmt: skip
# Options that only beam search reads (which this engine does not run), with the value at which they do nothing.
# transformers warns about the first two; the group options it ignores unwarned, and are named here too.
_BEAM_ONLY: dict[str, Any] = {
    "length_penalty": 1.0, "early_stopping": False, "num_beam_groups": 1, "diversity_penalty": 0.0,
}  # fmt: skip


def advise(
    fields: dict[str, Any],
    caller: dict[str, Any],
    *,
    sampled: bool,
    prompt_width: int,
    max_new_tokens: int,
    rows: int,
    masked: bool,
    eos_ids: tuple[int, ...],
    pad_token_id: int | None,
    replaced: tuple[tuple[str, str, str], ...] = (),
) -> None:
    """Warn about what the request in ``fields`` (its merged generation options) asks for in vain.

    ``caller``: the options the caller set and their values (the caller's ``generation_config``, then the
    call's arguments, None where the call unset one); ``prompt_width``: the padded prompt's width;
    ``max_new_tokens`` as resolved; ``rows``: the caller's batch; ``masked``: an attention mask was passed;
    ``eos_ids`` and ``pad_token_id`` as resolved (the pad id defaults to the first EOS id where none is set).
    ``replaced``: (argument, option, class name) for each of the caller's logits processors and stopping
    criteria that takes the place of the one an option makes (``Processing.overrides``; a ``MaxLengthCriteria``
    then decides the length). Each warning points at the caller's line, the first outside
    this package."""

    def warn(message: str) -> None:
        frame, level = sys._getframe(1), 2  # this function's caller: level 2 from warnings.warn
        while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
            frame, level = frame.f_back, level + 1
        warnings.warn(message, UserWarning, stacklevel=level)

    def unused(options: dict[str, Any], mode: str) -> list[str]:
        """The options of another mode than ``mode``'s switch chose, set to a value that would act there."""
        return [
            f"`{name}`={fields[name]!r}"
            for name, neutral in options.items()
            if fields.get(name) is not None
            and not (name in caller and caller[name] is None)  # not unset by the call (top_k=None: no top-k)
            and fields[name] != neutral
            and (name in caller or mode not in caller)
        ]

    if not sampled and (names := unused(_SAMPLING_ONLY, "do_sample")):
        warn(
            f"{', '.join(names)}: options of sampling, ignored by this request, which decodes greedily "
            "(do_sample is not True); pass do_sample=True to sample with them, or drop them"
        )
    if names := unused(_BEAM_ONLY, "num_beams"):
        warn(f"{', '.join(names)}: options of beam search, which this engine does not run; ignored")
    if not fields.get("return_dict_in_generate"):
        names = [f"`{name}`" for name in ("output_scores", "output_logits") if fields.get(name) is True]
        if names:
            warn(
                f"{' and '.join(names)}: returned only with return_dict_in_generate=True, which is not set; "
                "ignored"
            )

    for argument, option, name in replaced:
        warn(
            f"`{argument}` holds a {name}, which `{option}` makes too: yours takes its place, as in "
            f"transformers; drop one of them"
        )
    if rows > 1 and not masked and pad_token_id in eos_ids:  # padding cannot be told from tokens
        unset = fields.get("pad_token_id") is None
        warn(
            f"no `attention_mask` for a batch of {rows} rows, and it cannot be inferred from input_ids: "
            + ("no `pad_token_id` is set, so it is" if unset else "`pad_token_id`")
            + f" {pad_token_id}, an EOS id, and every token is read as part of its prompt; pass the tokenizer's "
            "attention_mask"
        )
    by_criterion = any(option == "max_length" for _, option, _ in replaced)
    if fields.get("max_new_tokens") is None and fields.get("max_length") is None and not by_criterion:
        warn(
            f"no `max_new_tokens` (nor `max_length`) is set, so up to {max_new_tokens} new tokens are generated, "
            "transformers' default; set max_new_tokens to choose"
        )
    if fields.get("max_new_tokens") is not None and fields.get("max_length") is not None:
        warn(
            f"both `max_new_tokens`={fields.get('max_new_tokens')!r} and `max_length`={fields['max_length']!r} "
            "are set: max_new_tokens decides, as in transformers, and max_length is ignored"
        )
    min_new = fields.get("min_new_tokens")
    if min_new is not None and fields.get("min_length") is not None:
        warn(
            f"both `min_new_tokens`={min_new!r} and `min_length`={fields['min_length']!r} are set: "
            "min_new_tokens decides, as in transformers, and min_length is ignored"
        )
    longest = prompt_width + max_new_tokens
    if min_new is not None and min_new > max_new_tokens:
        warn(
            f"`min_new_tokens`={min_new} is more than the {max_new_tokens} new tokens the request may generate: "
            "rows stop at that length without reaching it; lower min_new_tokens or raise max_new_tokens"
        )
    elif min_new is None and (fields.get("min_length") or 0) > longest:
        warn(
            f"`min_length`={fields['min_length']} is more than the longest a row may become ({prompt_width} "
            f"prompt columns + {max_new_tokens} new tokens = {longest}): rows stop there without reaching it; "
            "lower min_length or raise max_new_tokens"
        )
