import pytest

from asyncgen.evaluation import prompts, shapes


def test_builtin_set_is_every_caption():
    builtin = prompts.miniature_prompts()
    assert builtin == shapes.all_captions() and len(builtin) >= 100
    subset = prompts.miniature_prompts(24, seed=1)
    assert len(set(subset)) == 24 and set(subset) <= set(builtin)
    assert subset == prompts.miniature_prompts(24, seed=1) != prompts.miniature_prompts(24, seed=2)
    with pytest.raises(ValueError, match="count=0"):
        prompts.miniature_prompts(0)
