"""Variants of the shared test models, written to a temporary directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from kiln import LLM, SamplingParams

EOS_PROMPT = "Once upon a time"
EOS_AT = 5  # greedy decoding of EOS_PROMPT makes the extra EOS id its 6th token


def stories_with_extra_eos(stories_dir: Path, dest: Path, llm: LLM) -> Path:
    """A copy of stories260K with one more EOS id: the token greedy decoding of EOS_PROMPT
    makes at index EOS_AT.

    NOTE: stories260K never emits its own EOS (id 2; TinyStories separates stories with BOS),
    so a real ``eos_token`` finish needs an EOS id the model does produce. The extra id goes in
    ``generation_config.json``, where checkpoints list their additional EOS ids. ``llm`` is
    stories260K itself, used to find that token.
    """
    params = SamplingParams(temperature=0.0, max_new_tokens=EOS_AT + 1)
    (out,) = llm.generate([llm.tokenizer.encode(EOS_PROMPT)], params)
    eos_id = out.token_ids[EOS_AT]
    assert eos_id not in out.token_ids[:EOS_AT]
    for f in stories_dir.iterdir():
        shutil.copy(f, dest / f.name)
    gen_config = json.loads((stories_dir / "generation_config.json").read_text())
    gen_config["eos_token_id"] = [2, eos_id]
    (dest / "generation_config.json").write_text(json.dumps(gen_config))
    return dest


def stories_with_sampling_defaults(stories_dir: Path, dest: Path, defaults: dict) -> Path:
    """A copy of stories260K whose ``generation_config.json`` also sets ``defaults`` (sampling
    fields such as ``temperature`` or ``repetition_penalty``), as tuned checkpoints do."""
    for f in stories_dir.iterdir():
        shutil.copy(f, dest / f.name)
    config = json.loads((stories_dir / "generation_config.json").read_text())
    (dest / "generation_config.json").write_text(json.dumps({**config, **defaults}))
    return dest
