"""Tiny models of real architectures, built from configs (no hub), shared by the tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Triton kernels run on CPU tensors under the interpreter; the variable must be set before triton is
# imported. A machine with an NVIDIA driver runs them compiled.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import copy

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from omnidraft_fast.bridge import VocabBridge

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
SHARED = Path(os.environ.get("OMNIDRAFT_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def _foreign_package() -> str | None:
    """Why the package these tests would test is not this checkout's own, or None. The editable install maps
    ``omnidraft_fast`` to a checkout and ``omnidraft_fast.kernels`` to its top-level ``kernels/``: tests of
    another checkout run against the installed one's code, and with this checkout first on ``PYTHONPATH``
    only ``omnidraft_fast`` moves while its kernels stay the installed checkout's. Either way the tests
    would pass or fail for code they were not run for."""
    import omnidraft_fast.kernels  # binds omnidraft_fast too

    root = Path(__file__).resolve().parents[1]
    for module, home in (
        (omnidraft_fast, root / "omnidraft_fast"),
        (omnidraft_fast.kernels, root / "kernels"),
    ):
        found = Path(module.__file__).resolve().parent
        if found != home:
            return (
                f"{module.__name__} is imported from {found}, not from this checkout ({home}): install this "
                f"checkout (pip install --no-deps -e {root}) in the environment that runs its tests"
            )
    return None


def pytest_configure(config):
    problem = _foreign_package()
    if problem is not None:
        raise pytest.UsageError(problem)
    # Tiny models are dominated by per-op overhead: one thread is faster, and it keeps parallel jobs on a
    # 2-core machine from oversubscribing it (with 2 threads each, forwards ran ~60x slower under load).
    torch.set_num_threads(1)
    if os.environ.get("TRITON_INTERPRET") == "1":
        from triton_interpreter import install

        install()


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state, whichever tests ran before it in its worker: a
    test's unseeded draws (a model's random weights, an engine's sampling) then do not hang on the order or
    the split of ``pytest -n``."""
    torch.manual_seed(0)


def _interpreter_problem() -> str | None:
    """Why this triton's interpreter cannot run the kernels' loops over program-id bounds, or None.

    triton 3.6's interpreter turns such a bound into a one-element array, which numpy >= 2.4 no longer
    converts to an int; the compiled kernels are not concerned."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    import numpy
    import triton
    import triton.language as tl

    @triton.jit
    def _probe(out_ptr, BLOCK: tl.constexpr):
        begin = tl.program_id(0) * BLOCK
        for start in range(begin, tl.minimum(begin + BLOCK, 4), 2):
            tl.store(out_ptr + start + tl.arange(0, 2), tl.full((2,), 1, tl.int32))

    try:
        _probe[(1,)](torch.zeros(4, dtype=torch.int32), BLOCK=4)
    except Exception as error:  # the interpreter's own failure, whatever its type
        return (
            f"triton {triton.__version__}'s interpreter cannot run the kernels with numpy {numpy.__version__} "
            f"({type(error).__name__}); install numpy<2.4 or a newer triton to run them on the CPU"
        )
    return None


# the modules whose kernels loop over program-id bounds (the n-gram kernels do not)
_KERNEL_MODULES = (
    "test_kernels_sampling",
    "test_kernels_translate",
    "test_kernels_verify",
    "test_kernels_match",
    "test_kernels_lookup",
    "test_engine_kernels",
)


# The tests that take 20 s to 2 min each on the CPU (pytest --durations), longest first. They run first:
# pytest-xdist hands tests out in collection order, and one of them collected near the end (test_scale.py,
# test_zoo.py) left a worker of `make test`'s two running it alone for minutes after the other had finished.
_LONG_FIRST = (
    "test_kernels_compile.py::",
    "test_zoo.py::test_sampling_on_the_trained_pairs_keeps_the_target_law",
    "test_scale.py::",
    "test_lossless_sampling.py::",
    "test_bridge.py::test_real_tokenizer_pairs",
    "test_cross_vocab.py::test_sampling_is_lossless_across_vocabularies",
    "test_zoo.py::test_split_tokens_on_the_trained_cross_pair",
    "test_cli.py::test_cascade_sweep",
)


def _long_first(item) -> int:
    name = item.nodeid.rpartition("/")[2]
    ranks = (rank for rank, prefix in enumerate(_LONG_FIRST) if name.startswith(prefix))
    return next(ranks, len(_LONG_FIRST))


def pytest_collection_modifyitems(config, items):
    items.sort(key=_long_first)  # stable: the rest keep their order (and their modules' fixtures)
    selected = [item for item in items if item.module.__name__ in _KERNEL_MODULES]
    problem = _interpreter_problem() if selected else None
    if problem is not None:
        for item in selected:
            item.add_marker(pytest.mark.skip(reason=problem))


def tiny_model(
    arch: str,
    vocab_size: int = 96,
    *,
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    max_positions: int = 256,
    tied: bool = False,
    eos_token_id: int | None = None,
    dtype: torch.dtype = torch.float32,
    kv_heads: int = 2,
) -> torch.nn.Module:
    """A randomly initialised causal LM of ``arch`` (4 query heads, ``kv_heads`` key/value heads), in eval mode."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, bos_token_id=None, eos_token_id=eos_token_id, pad_token_id=None)
    if arch == "gpt2":
        config = GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=max_positions, **common)
        model = GPT2LMHeadModel(config)
    else:
        config_class, model_class = {
            "llama": (LlamaConfig, LlamaForCausalLM),
            "mistral": (MistralConfig, MistralForCausalLM),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM),
            "qwen3": (Qwen3Config, Qwen3ForCausalLM),
        }[arch]
        config = config_class(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=kv_heads,
            max_position_embeddings=max_positions,
            tie_word_embeddings=tied,
            **common,
        )
        model = model_class(config)
    return model.to(dtype).eval()


def perturbed_copy(model: torch.nn.Module, scale: float, seed: int = 1) -> torch.nn.Module:
    """A drafter that agrees with ``model`` often but not always: its weights plus Gaussian noise."""
    torch.manual_seed(seed)
    drafter = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in drafter.parameters():
            parameter.add_(torch.randn_like(parameter) * scale * parameter.std().clamp_min(1e-3))
    return drafter.eval()


def peaked_pair(
    vocab_size: int, *, seed: int, head_scale: float, noise: float, eos_token_id: int | None = None
):
    """A tiny llama target whose head is scaled by ``head_scale`` (next-token laws far from uniform, as a
    trained model's are) and a drafter that is its ``perturbed_copy`` with ``noise``."""
    target = tiny_model("llama", vocab_size, seed=seed, eos_token_id=eos_token_id)
    with torch.no_grad():
        target.lm_head.weight.mul_(head_scale)
    return target, perturbed_copy(target, noise, seed=seed + 1)


def left_padded_prompts(
    vocab_size: int, lengths: list[int], seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of the given lengths, left-padded with id 0, and their attention mask."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = torch.randint(3, vocab_size, (length,), generator=generator)
        mask[row, width - length :] = 1
    return ids, mask


def word_tokenizer(vocab_size: int):
    """A word-level fast tokenizer over a whole tiny vocabulary, built offline: id i <-> "w{i}" (0-2 special)."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tokenizer_models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    backend = Tokenizer(tokenizer_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the project's ../shared folder, or set OMNIDRAFT_SHARED)")
    return path


def _corpus() -> list[str]:
    """Text every machine has: a fixed, sorted set of the running Python's standard-library sources."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    names = [
        "textwrap.py",
        "string.py",
        "functools.py",
        "heapq.py",
        "bisect.py",
        "fractions.py",
        "calendar.py",
    ]
    texts = [(root / name).read_text(encoding="utf-8") for name in names if (root / name).exists()]
    texts.append("naïve café — 東京 ☕ 🙂 ñandú\tcolumns\t\t  spaced   out\n\n\n")
    return texts


@pytest.fixture(scope="session")
def trained_tokenizers():
    """Two tokenizers trained here: a SentencePiece-style one (metaspace, byte fallback, 400 ids) for
    drafters and a byte-level BPE (350 ids) for targets."""
    from omnidraft_fast.zoo.tokenizers import byte_level, sentencepiece_style

    corpus = _corpus()
    return sentencepiece_style(corpus, 400), byte_level(corpus, 350)


CROSS_TARGET_VOCAB = 384  # the trained target tokenizer has 350 ids: the rest are padding
CROSS_DRAFTER_VOCAB = 416  # the trained drafter tokenizer has 400


@pytest.fixture(scope="session")
def cross_pair(trained_tokenizers):
    """A random target and a drafter that shares its weights through the bridge: the drafter's embedding
    and head rows of a drafter token are the target's rows of the target token with the same bytes, so
    the two agree wherever both tokenisations coincide (partial acceptance, exercised both ways)."""
    drafter_tokenizer, target_tokenizer = trained_tokenizers
    target = tiny_model("llama", CROSS_TARGET_VOCAB, seed=21, hidden=48)
    bridge = VocabBridge.from_tokenizers(drafter_tokenizer, target_tokenizer, drafter_vocab_size=CROSS_DRAFTER_VOCAB,
                                         target_vocab_size=CROSS_TARGET_VOCAB)  # fmt: skip
    drafter = copy.deepcopy(target)
    drafter.resize_token_embeddings(CROSS_DRAFTER_VOCAB)
    mapped = bridge.d2t >= 0
    with torch.no_grad():
        source = bridge.d2t.clamp_min(0).long()
        drafter.model.embed_tokens.weight[mapped] = target.model.embed_tokens.weight[source[mapped]]
        drafter.lm_head.weight[mapped] = target.lm_head.weight[source[mapped]]
    drafter.config.vocab_size = CROSS_DRAFTER_VOCAB
    return target, drafter.eval(), target_tokenizer, drafter_tokenizer
