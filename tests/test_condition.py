import pytest
import torch

from diffmem.core.condition import Condition
from diffmem.errors import DiffmemError


def _cond():
    return Condition({"prompt_embeds": torch.arange(6.0).reshape(2, 3, 1)}, 2, ("a", "b"))


def test_repeat_select_cat():
    cond = _cond()
    repeated = cond.repeat_interleave(2)
    assert repeated.prompts == ("a", "a", "b", "b")
    assert repeated["prompt_embeds"][:, 0, 0].tolist() == [0, 0, 3, 3]
    assert cond.select([1]).prompts == ("b",) and cond.select(slice(0, 1))["prompt_embeds"].shape == (1, 3, 1)
    both = Condition.cat([cond, cond.select([0])])
    assert both.batch_size == 3 and both.prompts == ("a", "b", "a")


def test_replace_keeps_the_rest_and_rejects_unknown_names():
    cond = _cond()
    embeds = torch.zeros(2, 3, 1, requires_grad=True)
    assert cond.replace(prompt_embeds=embeds)["prompt_embeds"] is embeds
    with pytest.raises(DiffmemError, match="has no tensors"):
        cond.replace(text_embeds=embeds)


def test_inconsistent_batches_are_rejected():
    with pytest.raises(DiffmemError, match="has batch 2, expected 3"):
        Condition({"prompt_embeds": torch.zeros(2, 3, 1)}, 3)
    with pytest.raises(DiffmemError, match="different kinds"):
        Condition.cat([_cond(), Condition({}, 1)])


def test_to_keeps_integer_labels():
    labels = Condition({"class_labels": torch.tensor([1, 2]), "x": torch.zeros(2)}, 2).to(dtype=torch.float16)
    assert labels["class_labels"].dtype == torch.long and labels["x"].dtype == torch.float16
