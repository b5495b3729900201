"""cifar10_serve.ranking: one order of classes, ties broken by class index."""
import torch

from cifar10_serve.ranking import ranked, top1


def test_classes_are_ranked_by_probability_then_index():
    probs = torch.tensor([[0.1, 0.3, 0.2, 0.3, 0.1],
                          [0.2, 0.2, 0.2, 0.2, 0.2],
                          [0.0, 0.1, 0.2, 0.3, 0.4]])
    assert ranked(probs).tolist() == [[1, 3, 2, 0, 4], [0, 1, 2, 3, 4], [4, 3, 2, 1, 0]]
    assert top1(probs).tolist() == [1, 0, 4]


def test_a_tie_at_any_place_of_a_long_row_keeps_index_order():
    """Long rows take other sort kernels: the tie rule must hold whatever the length."""
    probs = torch.rand(64, 1000, generator=torch.Generator().manual_seed(0))
    probs[:, 500] = probs[:, 7] = probs.max() + 1  # an exact tie for first, far apart
    order = ranked(probs)
    assert order[:, :2].tolist() == [[7, 500]] * 64
    rest = probs.gather(1, order)
    assert (rest[:, :-1] >= rest[:, 1:]).all()


def test_one_row_as_a_list():
    assert ranked([0.5, 0.25, 0.25]).tolist() == [0, 1, 2]
    assert int(top1([0.25, 0.5, 0.5])) == 1
