"""``ppzoo.inputs``: token ids outside the vocabulary are refused with the value, where it is and the fix.

The checks of a whole batch and its agreement across ranks (``StepInputs``) need a process
group: ``tests/test_reliability.py`` (ranks passing different shapes or tokens, a bad batch on one
rank) and ``tests/test_runtime.py`` (a batch the microbatches do not divide).
"""

import re

import pytest
import torch

from ppzoo.inputs import check_tokens


@pytest.mark.parametrize(
    "tokens, kwargs, message",
    [
        (
            torch.tensor([[0, 5], [9, 10]]),
            {},
            "t[1, 1] is 10, outside the vocabulary of 10 tokens; t must hold ids 0..9",
        ),
        (
            torch.tensor([[-1, 5], [9, 12]]),
            {},
            "t[0, 0] is -1, outside the vocabulary of 10 tokens (1 more out of range)",
        ),
        (torch.tensor([[-100, -101]]), {"ignore_index": -100}, "t[0, 1] is -101, outside the vocabulary of 10 tokens"),
        (torch.tensor([[True]]), {}, "t must be an integer tensor of token ids, got dtype torch.bool"),
    ],
    ids=["too-large", "negative", "not-the-ignore-index", "bool"],
)
def test_check_tokens_names_the_value_the_position_and_the_vocabulary(tokens, kwargs, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        check_tokens(tokens, "t", vocab_size=10, **kwargs)
    check_tokens(torch.tensor([[0, 9, -100]]), "t", vocab_size=10, ignore_index=-100)
