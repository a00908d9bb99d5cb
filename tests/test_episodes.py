"""Episodes: demonstrations split one by one, padding masks, slicing."""
import pytest
import torch

from lit_icl.data import Episodes


def padded():
    # episode 0: demos [5 6] [7]; episode 1: demos [8] [9 10], one pad token on the left
    demo = torch.tensor([[5, 6, 7, 1], [0, 8, 9, 10]])
    index = torch.tensor([[0, 0, 1, -1], [-1, 0, 1, 1]])
    return Episodes(demo, torch.tensor([[3], [4]]), torch.tensor([1, 2]), torch.tensor([1, 2]), index)


def test_demonstrations_are_left_padded_one_by_one():
    ids, mask = padded().demonstrations()
    assert ids.tolist() == [[[5, 6], [0, 7]], [[0, 8], [9, 10]]]
    assert mask.tolist() == [[[1, 1], [0, 1]], [[0, 1], [1, 1]]]


def test_masks_and_prompts():
    ep = padded()
    assert ep.demo_mask.tolist() == [[1, 1, 1, 0], [0, 1, 1, 1]]
    assert ep.prompt_mask.tolist() == [[1, 1, 1, 0, 1], [0, 1, 1, 1, 1]]
    unpadded = Episodes(torch.tensor([[5, 6]]), torch.tensor([[3]]), torch.tensor([1]), torch.tensor([1]),
                        torch.tensor([[0, 1]]))
    assert unpadded.demo_mask is None and unpadded.prompt_mask is None
    ids, mask = unpadded.demonstrations()
    assert ids.tolist() == [[[5], [6]]] and mask is None


def test_slicing_keeps_the_split():
    ep = padded()[1:]
    assert len(ep) == 1 and ep.shot_index.tolist() == [[-1, 0, 1, 1]]
    with pytest.raises(TypeError, match="slice"):
        padded()[0]
    with pytest.raises(ValueError, match="shot_index shape"):
        Episodes(torch.tensor([[5, 6]]), torch.tensor([[3]]), torch.tensor([1]), torch.tensor([1]),
                 torch.tensor([[0]]))


def test_no_shot_index_means_one_demonstration_per_row():
    ep = Episodes(torch.tensor([[5, 6, 7]]), torch.tensor([[3]]), torch.tensor([1]), torch.tensor([1]))
    ids, mask = ep.demonstrations()
    assert ids.tolist() == [[[5, 6, 7]]] and mask is None
