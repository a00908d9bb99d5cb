"""Each metric on hand-made inputs whose answer is known."""
import math

import pytest
import torch

from lit_icl.metrics import CandidateAccuracy, ConversionError, Rec2FTP, SimAM, SimAOU, predict


def test_predict_and_accuracy_use_candidates_only():
    logits = torch.tensor([[9.0, 1.0, 2.0, 0.0], [9.0, 0.0, 1.0, 3.0], [0.0, 5.0, 1.0, 1.0]])
    candidates = torch.tensor([1, 2, 3])  # token 0 is not a candidate, though largest
    assert predict(logits, candidates).tolist() == [2, 3, 1]
    acc = CandidateAccuracy()
    acc.update(logits, candidates, torch.tensor([2, 1, 1]))
    acc.update(logits[:1], candidates, torch.tensor([3]))
    assert acc.compute().item() == pytest.approx(2 / 4)


def test_conversion_error():
    err = ConversionError()
    p = torch.tensor([[3.0, 4.0]])
    err.update(p, torch.tensor([[3.0, 4.5]]))
    err.update(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, -0.1]]))
    out = err.compute()
    assert out["max_abs"].item() == pytest.approx(0.5)
    assert out["relative"].item() == pytest.approx(math.sqrt(0.25 + 0.01) / 5.0)


def test_rec2ftp():
    m = Rec2FTP()
    zsl = torch.tensor([0, 0, 0, 0, 1, 0])
    ft = torch.tensor([1, 1, 1, 0, 1, 1])
    icl = torch.tensor([1, 0, 1, 1, 1, 1])
    m.update(zsl, ft, icl)  # base: episodes 0, 1, 2, 5; ICL right on 0, 2, 5
    assert m.compute().item() == pytest.approx(3 / 4)
    assert torch.isnan(Rec2FTP().compute())  # nothing fixed by FT: undefined, not 0


def test_simaou_means_over_examples_then_layers():
    m = SimAOU(n_layer=2)
    icl = [torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[1.0, 1.0], [3.0, 0.0]])]
    ft = [torch.tensor([[5.0, 0.0], [0.0, -1.0]]), torch.tensor([[1.0, 0.0], [2.0, 0.0]])]
    m.update(icl, ft)  # layer 0: cos 1, -1 -> 0; layer 1: 1/sqrt2, 1 -> (1 + 1/sqrt2)/2
    torch.testing.assert_close(m.per_layer(), torch.tensor([0.0, (1 + 2**-0.5) / 2], dtype=torch.float64))
    assert m.compute().item() == pytest.approx((1 + 2**-0.5) / 4)


def test_simam_means_over_heads():
    m = SimAM(n_layer=1)
    a = [torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])]  # one example, two heads, Q = 2
    b = [torch.tensor([[[2.0, 0.0], [1.0, -1.0]]])]  # head cosines 1 and 0
    m.update(a, b)
    assert m.compute().item() == pytest.approx(0.5)
    with pytest.raises(ValueError):
        m.update(a, b + b)  # one list per layer: lengths must agree
