"""The ``omnidraft-fast`` command: ``generate`` with local or hub models, the README ``demo`` and
``cascade-sweep``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

_DTYPES = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _local_missing(path: str) -> bool:
    """A path meant as a local folder (absolute, relative with ./ or ../, ~, or deeper than org/name)
    that does not exist: not worth asking the hub about."""
    if Path(path).expanduser().exists():
        return False
    return path.startswith(("/", ".", "~")) or path.count("/") > 1


def _from_pretrained(loader, path: str, flag: str, **kwargs):
    """``loader.from_pretrained(path)``, its failures named by the command-line flag that gave ``path``."""
    if _local_missing(path):
        raise ValueError(f"{flag}: no such folder {path!r}")
    if Path(path).expanduser().is_file():
        raise ValueError(f"{flag} {path!r} is a file: give the folder that holds it (save_pretrained's)")
    try:
        return loader.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:
        raise ValueError(f"{flag} {path!r}: {str(error).splitlines()[0]}") from error


# What a saved tokenizer's vocabulary lives in (fast tokenizers, SentencePiece, BPE, WordPiece, tiktoken).
_VOCABULARY_FILES = ("tokenizer.json", "*.model", "vocab.*", "merges.txt", "*.tiktoken", "tekken.json")


def _load_tokenizer(path: str, flag: str, instead: str | None):
    """The tokenizer saved at ``path`` (given by ``flag``; ``instead``: the flag that names another folder
    for it). A folder with no tokenizer in it is refused naming ``flag``: transformers then builds one from
    the model's config alone, with no vocabulary but its special tokens, or fails to build one."""
    from transformers import AutoTokenizer

    folder = Path(path).expanduser()
    missing = folder.is_dir() and not any(any(folder.glob(pattern)) for pattern in _VOCABULARY_FILES)
    files = f"the folder holds no tokenizer files ({', '.join(_VOCABULARY_FILES)})"
    fix = "save the tokenizer into it (tokenizer.save_pretrained(folder))" + (
        f", or give the tokenizer's folder with {instead}" if instead else ""
    )
    try:
        tokenizer = _from_pretrained(AutoTokenizer, path, flag)
    except ValueError as error:
        if missing:
            raise ValueError(f"{flag} {path!r}: {files}; {fix}") from error
        raise
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        where = f" ({files})" if missing else ""
        raise ValueError(
            f"{flag} {path!r}: its tokenizer has no vocabulary, only the special tokens "
            f"{tokenizer.all_special_tokens}{where}; {fix}"
        )
    return tokenizer


def _load(path: str, dtype: str, device: str, flag: str):
    from transformers import AutoModelForCausalLM

    from .models import LOAD_OPTIONS

    model = _from_pretrained(AutoModelForCausalLM, path, flag, dtype=_DTYPES[dtype], **LOAD_OPTIONS)
    return model.to(device).eval()


def _device(name: str | None) -> torch.device:
    """``--device``, checked: a torch device string whose backend this torch has."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device: {name!r} is not a device (cpu, cuda, cuda:1, ...)") from error
    if device.type == "meta":
        raise ValueError(
            f"--device {name}: the meta device holds no weights to generate with (cpu, cuda, ...)"
        )
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.mps, torch.xpu, ...
    if device.type != "cpu" and not (hasattr(backend, "is_available") and backend.is_available()):
        raise ValueError(
            f"--device {name}: {device.type} is not available to this torch ({torch.__version__})"
        )
    return device


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    return _int_at_least(text, 0)


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value}")
    return value


def seed(text: str) -> int:
    """argparse type: a seed torch takes, an int in [0, 2**64)."""
    return _int_at_least(text, 0, 2**64)


def _int_at_least(text: str, low: int, end: int | None = None) -> int:
    within = f">= {low}" if end is None else f"in [{low}, {end})"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int {within}, got {text!r}") from None
    if value < low or (end is not None and value >= end):
        raise argparse.ArgumentTypeError(f"must be an int {within}, got {value}")
    return value


def _generate(args: argparse.Namespace) -> int:
    from .api import generate
    from .config import EngineConfig

    sampling_flags = [f"--{name.replace('_', '-')}" for name in ("temperature", "top_k", "top_p", "min_p", "typical_p")
                      if getattr(args, name) is not None]  # fmt: skip
    if sampling_flags and not args.do_sample:  # greedy decoding would ignore them
        raise ValueError(
            f"{', '.join(sampling_flags)} shape sampling: add --do-sample, or leave them out for greedy"
        )
    # flags for the other way of drafting would be dropped without a word
    if args.drafter is not None and args.max_matching_ngram_size is not None:
        raise ValueError(
            "--max-matching-ngram-size sets how prompt lookup (--prompt-lookup-num-tokens) matches, and --drafter "
            "drafts with a model: drop it, or draft by prompt lookup instead of --drafter"
        )
    drafter_flags = [flag for flag, given in (
        ("--drafter-tokenizer", args.drafter_tokenizer is not None),
        ("--confidence-threshold", args.confidence_threshold is not None),
        ("--translation", args.translation is not None),
        ("--no-split-tokens", args.no_split_tokens),
    ) if given]  # fmt: skip
    if args.drafter is None and drafter_flags:
        raise ValueError(
            f"{', '.join(drafter_flags)}: for drafting with --drafter, and --prompt-lookup-num-tokens drafts without a "
            "drafter: drop them, or pass --drafter instead"
        )
    if (args.num_return_sequences or 1) > 1 and not args.do_sample:  # greedy copies would all be the same
        raise ValueError(
            f"--num-return-sequences {args.num_return_sequences} samples each prompt that many times: add "
            "--do-sample, or leave it out for greedy"
        )
    device = _device(args.device)
    # the tokenizers first: a folder without one is refused before the models load
    if args.tokenizer:
        tokenizer = _load_tokenizer(args.tokenizer, "--tokenizer", None)
    else:
        tokenizer = _load_tokenizer(args.model, "--model", "--tokenizer")
    if args.drafter_tokenizer:
        drafter_tokenizer = _load_tokenizer(args.drafter_tokenizer, "--drafter-tokenizer", None)
    elif args.drafter:
        drafter_tokenizer = _load_tokenizer(args.drafter, "--drafter", "--drafter-tokenizer")
    else:  # prompt lookup
        drafter_tokenizer = None
    target = _load(args.model, args.dtype, device, "--model")
    drafter = _load(args.drafter, args.dtype, device, "--drafter") if args.drafter else None
    if args.seed is not None:
        torch.manual_seed(args.seed)
    prompts = args.prompt
    if len(prompts) > 1:
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(prompts, return_tensors="pt", padding=len(prompts) > 1).to(device)
    options = {  # the flags given: an option passed as None would override the model's generation_config
        "max_new_tokens": args.max_new_tokens,
        "do_sample": args.do_sample,  # greedy unless --do-sample, whatever the model's config says
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "assistant_confidence_threshold": args.confidence_threshold,
        "repetition_penalty": args.repetition_penalty,
        "min_p": args.min_p,
        "typical_p": args.typical_p,
        "no_repeat_ngram_size": args.no_repeat_ngram_size,
        "bad_words_ids": [tokenizer(word, add_special_tokens=False).input_ids for word in args.bad_word]
        if args.bad_word
        else None,
        "min_new_tokens": args.min_new_tokens,
        "num_return_sequences": args.num_return_sequences,
        "stop_strings": args.stop,
        "prompt_lookup_num_tokens": args.prompt_lookup_num_tokens,
        "max_matching_ngram_size": args.max_matching_ngram_size,
    }
    out = generate(
        target,
        **batch,
        drafter=drafter,
        tokenizer=tokenizer,
        drafter_tokenizer=drafter_tokenizer,
        num_draft_tokens=args.num_draft_tokens,
        return_dict_in_generate=True,
        engine_config=EngineConfig(
            translation=args.translation or "omnidraft",
            split_tokens=not args.no_split_tokens,
            cuda_graphs=args.cuda_graphs,
            rounds_per_sync=args.rounds_per_sync,
        ),
        **{name: value for name, value in options.items() if value is not None},
    )
    width = batch["input_ids"].shape[1]
    copies = args.num_return_sequences or 1
    for row, sequence in enumerate(out.sequences):
        prompt = prompts[row // copies]
        text = tokenizer.decode(sequence[width:], skip_special_tokens=True)
        copy = f", sample {row % copies}" if copies > 1 else ""
        print(f"--- prompt {row // copies}{copy}: {prompt!r}\n{prompt}{text}")
    print("--- stats")
    print(json.dumps(out.stats.as_dict(), indent=2) if args.json else out.stats.summary())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(
        prompts_per_task=args.prompts_per_task,
        max_new_tokens=args.max_new_tokens,
        num_draft_tokens=args.num_draft_tokens,
    )
    if args.json:
        print(json.dumps(result, indent=2))
    return 0 if result["identical"] else 1


def _cascade_sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .cascade_sweep import ALPHAS, run_sweep, write_results
    from .report import environment
    from .zoo import load
    from .zoo.data import heldout_prompts

    unknown = set(args.rules) - set(ALPHAS)
    if unknown:  # before anything is loaded or created
        raise ValueError(f"`--rules`: unknown {sorted(unknown)}; choose from {', '.join(ALPHAS)}")
    device = _device(args.device)
    Path(args.out).mkdir(parents=True, exist_ok=True)  # fail before the sweep, not after it
    zoo = load("code-pair", device=device)
    tokenizer = zoo.target_tokenizer
    prompts = [
        tokenizer(text, return_tensors="pt").input_ids.to(device)
        for _, text in heldout_prompts(args.prompts_per_task)
    ]
    rules = {rule: ALPHAS[rule] for rule in args.rules}
    pairs = {
        "shared vocabulary (drafter-shared)": (zoo.drafter_shared, {}),
        "cross vocabulary (drafter-cross, omnidraft)": (
            zoo.drafter_cross,
            {"target_tokenizer": tokenizer, "drafter_tokenizer": zoo.drafter_tokenizer},
        ),
    }
    results = {
        "meta": {
            **environment(device),
            "models": "zoo code-pair",
            "prompts": len(prompts),
            "max_new_tokens": args.max_new_tokens,
            "k": args.num_draft_tokens,
            "decoding": "greedy"
            if args.temperature == 0
            else f"sampling at T={args.temperature} (no top-k/top-p)",
        },
        "pairs": {},
    }
    stem = f"cascades-{device.type}" + (f"-T{args.temperature:g}" if args.temperature else "")
    for name, (drafter, kwargs) in pairs.items():
        print(f"sweeping {name} ...", flush=True)

        def progress(sweep: dict, name: str = name) -> None:  # after each rule: a time limit keeps them
            results["pairs"][name] = sweep
            write_results(results, Path(args.out), stem, complete=False)

        results["pairs"][name] = run_sweep(
            zoo.target, drafter, prompts, max_new_tokens=args.max_new_tokens,
            num_draft_tokens=args.num_draft_tokens, rules=rules, temperature=args.temperature,
            progress=progress, **kwargs,
        )  # fmt: skip
    write_results(results, Path(args.out), stem)  # prints the Markdown
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omnidraft-fast", description="Speculative decoding for Hugging Face LMs."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser(
        "generate", help="generate text from a prompt with a target and a drafter (or prompt lookup)"
    )
    gen.add_argument("--model", required=True, help="target model: local folder or hub id")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--drafter", help="drafter model: local folder or hub id")
    source.add_argument(
        "--prompt-lookup-num-tokens",
        type=int,
        metavar="K",
        help="no drafter: draft up to K tokens copied from where the context's last tokens occurred before "
        "(transformers' prompt lookup decoding)",
    )
    gen.add_argument(
        "--max-matching-ngram-size",
        type=int,
        help="prompt lookup: the longest suffix of the context matched (default 2)",
    )
    gen.add_argument("--tokenizer", help="target tokenizer (default: --model, when that folder holds one)")
    gen.add_argument(
        "--drafter-tokenizer", help="drafter tokenizer (default: --drafter, when that folder holds one)"
    )
    gen.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    gen.add_argument(
        "--max-new-tokens", type=int, default=64, help="new tokens per prompt at most (default 64)"
    )
    gen.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, help="sampling: temperature (default: the model's, else 1)")
    gen.add_argument(
        "--top-k",
        type=int,
        help="sampling: keep the k likeliest tokens (0: off; default: the model's, else 50)",
    )
    gen.add_argument(
        "--top-p",
        type=float,
        help="sampling: keep the likeliest tokens up to this mass (1: off; default: the model's, else 1)",
    )
    gen.add_argument("--min-p", type=float, help="sampling: keep tokens with p >= min_p * max p")
    gen.add_argument("--typical-p", type=float, help="sampling: transformers' typical sampling mass (1: off)")
    gen.add_argument("--repetition-penalty", type=float, help="transformers' repetition penalty (1: off)")
    gen.add_argument("--no-repeat-ngram-size", type=int, help="no n-gram of this size twice (0: off)")
    gen.add_argument(
        "--bad-word",
        action="append",
        help="text the output must not contain as these target tokens (tokenized without special tokens; "
        "repeat for more; mind a leading space)",
    )
    gen.add_argument("--num-return-sequences", type=int, help="sampling: outputs per prompt")
    gen.add_argument("--min-new-tokens", type=int, help="no EOS before this many new tokens")
    gen.add_argument("--stop", action="append", help="a stop string (repeat for more); the row ends after it")
    gen.add_argument("--num-draft-tokens", type=int, help="draft length k (default 4)")
    gen.add_argument(
        "--confidence-threshold",
        type=float,
        help="stop a row's draft after a token the drafter gave less than this probability "
        "(transformers' assistant_confidence_threshold; default: off)",
    )
    gen.add_argument(
        "--translation",
        choices=("omnidraft", "tli", "exact"),
        help="how drafts cross vocabularies when they differ (EngineConfig.translation; default omnidraft)",
    )
    gen.add_argument(
        "--no-split-tokens",
        action="store_true",
        help="end a draft at a drafted token with no target twin, as OmniDraft does, instead of proposing "
        "its bytes as target tokens (EngineConfig.split_tokens)",
    )
    gen.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="run each round as captured stages, CUDA graphs on CUDA (EngineConfig.cuda_graphs)",
    )
    gen.add_argument(
        "--rounds-per-sync",
        type=int,
        default=1,
        help="rounds run between two host reads; >1 with --cuda-graphs replays them as one graph "
        "(EngineConfig.rounds_per_sync)",
    )
    gen.add_argument(
        "--dtype", choices=sorted(_DTYPES), default="auto", help="both models' dtype (default auto: as saved)"
    )
    gen.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    gen.add_argument("--seed", type=seed, help="seed torch's RNG (sampling is then reproducible)")
    gen.add_argument("--json", action="store_true", help="print the stats as JSON")
    gen.set_defaults(run=_generate)

    demo = commands.add_parser(
        "demo", help="plain generate() vs this engine on the embedded trained model pair"
    )
    demo.add_argument(
        "--prompts-per-task", type=positive_int, default=1, help="held-out prompts per task (default 1)"
    )
    demo.add_argument(
        "--max-new-tokens", type=positive_int, default=64, help="new tokens per prompt (default 64)"
    )
    demo.add_argument("--num-draft-tokens", type=positive_int, default=4, help="draft length k (default 4)")
    demo.add_argument("--json", action="store_true", help="also print the figures as JSON")
    demo.set_defaults(run=_demo)

    sweep = commands.add_parser(
        "cascade-sweep",
        help="quality against speed of every cascade deferral rule on the embedded model pairs",
    )
    sweep.add_argument(
        "--prompts-per-task", type=positive_int, default=2, help="held-out prompts per task (default 2)"
    )
    sweep.add_argument(
        "--max-new-tokens", type=positive_int, default=48, help="new tokens per prompt (default 48)"
    )
    sweep.add_argument("--num-draft-tokens", type=positive_int, default=4, help="draft length k (default 4)")
    sweep.add_argument("--rules", nargs="+", default=["chow", "diff", "opt", "token_v1", "token_v2", "token_v3",
                       "lossy"], help="rules to sweep (default: all)")  # fmt: skip
    sweep.add_argument(
        "--temperature", type=non_negative_float, default=0.0, help="0 (default): greedy; > 0: sampling"
    )
    sweep.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    sweep.add_argument(
        "--out",
        default="benchmarks/results",
        help="folder for JSON, Markdown and PNG (default benchmarks/results)",
    )
    sweep.set_defaults(run=_cascade_sweep)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, OSError) as error:
        print(f"omnidraft-fast: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
