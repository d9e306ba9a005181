"""The prompt-set builder of the tests: ``make_set`` for any backbone, and the encoded bytes services receive."""

from __future__ import annotations

from collections.abc import Sequence

from lpt.backbone import BackboneInfo
from lpt.init import init_prompt_set
from lpt.prompt_set import PromptSet, decode, encode

L, S = 2, 3  # the common geometry (prompt length, shared blocks): sets of it run in one forward per batch
# VPT-init prompts are tiny next to the token norms; scaled up, a wrong prompt visibly moves the scores.
PROMPT_SCALE = 20.0


def make_set(
    info: BackboneInfo,
    classes: int | Sequence[str] = 4,
    pool: int = 3,
    seed: int = 0,
    top_k: int = 2,
    prompt_length: int = L,
    share_blocks: int = S,
    scale: float = PROMPT_SCALE,
) -> PromptSet:
    """A fresh set for ``info``, reproducible for a seed, its prompts multiplied by ``scale``.

    Args:
        info: the backbone the set is for.
        classes: the class names, or their number (classes ``c0``, ``c1``, ...).
        pool: group prompts in the pool; 0 gives a shared-prompt-only set.
        seed: the init seed.
        top_k: group prompts averaged per image.
        prompt_length: prompt tokens per block.
        share_blocks: blocks that only see the shared prompt.
        scale: factor on the shared and group prompts (1.0 keeps the init).
    """
    names = [f"c{i}" for i in range(classes)] if isinstance(classes, int) else list(classes)
    ps = init_prompt_set(
        info, names, prompt_length=prompt_length, pool_size=pool, share_blocks=share_blocks, top_k=top_k, seed=seed
    )
    if scale != 1.0:
        ps.shared_prompt = ps.shared_prompt * scale
        if ps.group_prompts is not None:
            ps.group_prompts = ps.group_prompts * scale
    return ps


def prompt_bytes(info: BackboneInfo, **kw: object) -> bytes:
    """The encoded bytes of ``make_set(info, **kw)``."""
    return encode(make_set(info, **kw))


def set_bytes(info: BackboneInfo, **kw: object) -> tuple[PromptSet, bytes]:
    """The encoded set and its decoded twin (what the service runs), for references."""
    data = prompt_bytes(info, **kw)
    return decode(data), data
