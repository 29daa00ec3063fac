import math

import pytest
import torch

from karma.losses import (
    in_rows,
    action_loss,
    head_scores,
    popularity_log_prob,
    sample_negatives,
    token_ce,
    total_loss,
)

# 2 users, 1 head, d=2; 3 candidates. With tau=0.5 the logits are
#   row 0: z0=[1,0] . [c0,c1,c2] / 0.5 = [1, 0, 0.6] * 2 = [2, 0, 1.2]   (positive c0)
#   row 1: z1=[0,1] . [c0,c1,c2] / 0.5 = [0, 1, 0.8] * 2 = [0, 2, 1.6]   (positive c1)
# CE row 0 = log(e^2 + e^0 + e^1.2) - 2 = log(11.709173) - 2 = 0.460373
# CE row 1 = log(e^0 + e^2 + e^1.6) - 2 = log(13.342088) - 2 = 0.590924
# mean = 0.525648
Z = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
CAND = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
POS = torch.tensor([0, 1])


def test_infonce_hand_computed():
    loss = action_loss(Z, CAND, POS, tau=0.5)
    assert loss.item() == pytest.approx(0.5256481, abs=1e-6)
    # tau as a tensor gives the same value
    assert action_loss(Z, CAND, POS, tau=torch.tensor(0.5)).item() == pytest.approx(0.5256481, abs=1e-6)


def test_duplicate_target_is_masked():
    # candidate 2 carries the same item id (10) as user 0's target, so it leaves row 0:
    # row 0 = log(e^2 + e^0) - 2 = 0.126928; row 1 unchanged 0.590924; mean 0.358926
    loss = action_loss(
        Z, CAND, POS, tau=0.5, cand_ids=torch.tensor([10, 20, 10]), target_ids=torch.tensor([10, 20])
    )
    assert loss.item() == pytest.approx(0.3589258, abs=1e-6)
    # no duplicate ids -> nothing masked
    loss2 = action_loss(
        Z, CAND, POS, tau=0.5, cand_ids=torch.tensor([10, 20, 30]), target_ids=torch.tensor([10, 20])
    )
    assert loss2.item() == pytest.approx(0.5256481, abs=1e-6)


def test_logq_correction_shifts_logits():
    # log_q = log[0.5, 0.25, 0.25]: row 0 logits [2+ln2, 0+ln4, 1.2+ln4] -> CE 0.774418,
    # row 1 logits [0+ln2, 2+ln4, 1.6+ln4] -> CE 0.552728; mean 0.663573
    log_q = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    loss = action_loss(Z, CAND, POS, tau=0.5, log_q=log_q)
    assert loss.item() == pytest.approx(0.6635728, abs=1e-6)
    # a constant shift of all logits leaves softmax unchanged
    flat = torch.full((3,), math.log(1 / 3))
    assert action_loss(Z, CAND, POS, tau=0.5, log_q=flat).item() == pytest.approx(0.5256481, abs=1e-6)


def test_max_vs_mixture():
    z = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # one user, two heads
    cand = torch.tensor([[0.6, 0.8]])  # head scores 0.6 and 0.8
    assert head_scores(z, cand, "max").item() == pytest.approx(0.8)
    # softmax([0, ln 3]) = [0.25, 0.75] -> 0.25*0.6 + 0.75*0.8 = 0.75
    mix = torch.tensor([[0.0, math.log(3.0)]])
    assert head_scores(z, cand, "mixture", mix).item() == pytest.approx(0.75, abs=1e-6)
    with pytest.raises(ValueError, match="mix_logits"):
        head_scores(z, cand, "mixture")
    with pytest.raises(ValueError, match="reduce"):
        head_scores(z, cand, "mean")


def test_single_head_equals_inner_product():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 1, 8, generator=g)
    cand = torch.randn(5, 8, generator=g)
    ref = z[:, 0] @ cand.T
    torch.testing.assert_close(head_scores(z, cand, "max"), ref)
    torch.testing.assert_close(head_scores(z, cand, "mixture", torch.randn(4, 1, generator=g)), ref)
    torch.testing.assert_close(head_scores(z[:, 0], cand), ref)


def test_token_ce_with_ignore():
    # pos 0: logits [0,0], label 0 -> ln 2; pos 1: logits [ln3, 0], label 0 -> ln(4/3);
    # pos 2 ignored. mean = (ln2 + ln(4/3)) / 2 = 0.490415
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]]])
    labels = torch.tensor([[0, 0, -100]])
    assert token_ce(logits, labels).item() == pytest.approx(0.4904146, abs=1e-6)


def test_token_ce_all_ignored_keeps_graph():
    logits = torch.randn(2, 3, 4, requires_grad=True)
    loss = token_ce(logits, torch.full((2, 3), -100))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and torch.all(logits.grad == 0)


def test_gradient_flows_to_z_and_tau():
    z = Z.clone().requires_grad_(True)
    tau = torch.tensor(0.5, requires_grad=True)
    loss = action_loss(z, CAND, POS, tau)
    loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    # finite difference on tau
    eps = 1e-3
    fd = (action_loss(Z, CAND, POS, 0.5 + eps) - action_loss(Z, CAND, POS, 0.5 - eps)) / (2 * eps)
    assert tau.grad.item() == pytest.approx(fd.item(), rel=1e-3)
    assert tau.grad.item() != 0.0


def test_action_loss_bad_args():
    with pytest.raises(ValueError, match="pos_index"):
        action_loss(Z, CAND, torch.tensor([0]), 0.5)
    with pytest.raises(ValueError, match="tau"):
        action_loss(Z, CAND, POS, 0.0)
    with pytest.raises(ValueError, match="log_q"):
        action_loss(Z, CAND, POS, 0.5, log_q=torch.zeros(2))
    with pytest.raises(ValueError, match="cand_ids"):
        action_loss(Z, CAND, POS, 0.5, cand_ids=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="cand"):
        head_scores(Z, torch.zeros(3, 5))


def test_popularity_log_prob_and_sampling():
    counts = torch.tensor([0, 1, 15])
    # (counts + 1) ** 0.75 = [1, 2**0.75, 8] = [1, 1.681793, 8]; sum 10.681793
    expected = [0.0936172, 0.1574448, 0.7489379]
    p = popularity_log_prob(counts).exp()
    assert p.tolist() == pytest.approx(expected, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    ids, log_p = sample_negatives(counts, 200_000, generator=g)
    assert ids.dtype == torch.int64 and ids.shape == (200_000,)
    assert int(ids.min()) >= 0 and int(ids.max()) <= 2
    freq = torch.bincount(ids, minlength=3).double() / 200_000
    assert freq.tolist() == pytest.approx(expected, abs=0.005)
    torch.testing.assert_close(log_p, popularity_log_prob(counts))
    with pytest.raises(ValueError, match="counts"):
        popularity_log_prob(torch.tensor([1, -1]))


def test_total_loss():
    a, g, r = torch.tensor(1.0), torch.tensor(2.0), torch.tensor(4.0)
    assert total_loss(a).item() == 1.0
    assert total_loss(a, gen=g, w_gen=0.5).item() == 2.0  # rec skipped even though w_rec could be set
    assert total_loss(a, gen=g, rec=r, w_gen=0.5, w_rec=0.25).item() == 3.0
    assert total_loss(a, rec=r, w_gen=3.0, w_rec=1.0).item() == 5.0
    with pytest.raises(ValueError, match="w_rec"):
        total_loss(a, rec=r, w_rec=-1.0)


def test_in_rows_marks_each_rows_own_ids():
    ids = torch.tensor([3, 5, 7, 0])
    rows = torch.tensor([[5, -1, 0], [-1, -1, -1], [7, 7, 3]])
    assert in_rows(ids, rows).tolist() == [[False, True, False, True], [False] * 4, [True, False, True, False]]


def test_seen_offset_shifts_the_history_items_among_the_candidates():
    """model.seen_offset: `seen` is added to every candidate in the row's history (shared or the
    row's own, the target too when it repeats one), before the temperature."""
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cand, pos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]), torch.tensor([0, 1])
    cand_ids, targets = torch.tensor([10, 11, 12]), torch.tensor([10, 11])
    row = torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]]])
    ids = torch.tensor([[12], [11]])  # row 0 has seen 12 (a shared negative); row 1 its own target
    got = action_loss(z, cand, pos, tau=0.5, cand_ids=cand_ids, target_ids=targets, row_cand=row,
                      row_cand_ids=ids, seen=torch.tensor(-1.0))
    # row 0: [1, 0, 0.5 - 1, 0 - 1]; row 1: [0, 1 - 1, 0.5, masked repeat]
    logits = torch.tensor([[1.0, 0.0, -0.5, -1.0], [0.0, 0.0, 0.5, float("-inf")]]) / 0.5
    assert got.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, pos).item(), abs=1e-6)
    with pytest.raises(ValueError, match="seen needs"):
        action_loss(z, cand, pos, tau=1.0, seen=1.0)


def test_row_candidates_join_each_rows_softmax():
    """History negatives: row b's own candidates enter row b's softmax only, at log q = row_log_q;
    padding (-1) and a repeat of the row's target are left out."""
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cand, pos = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
    row = torch.tensor([[[0.0, 1.0], [1.0, 1.0]], [[1.0, 0.0], [5.0, 5.0]]])  # [B=2, L=2, d]
    ids, targets = torch.tensor([[7, -1], [8, 11]]), torch.tensor([10, 11])  # row 1's 11 repeats its target
    got = action_loss(z, cand, pos, tau=1.0, cand_ids=torch.tensor([10, 11]), target_ids=targets,
                      row_cand=row, row_cand_ids=ids, row_log_q=math.log(2))
    # row 0 logits [1, 0, 0 - ln2]; row 1 logits [0, 1, 0 - ln2]
    want = torch.nn.functional.cross_entropy(torch.tensor([[1.0, 0.0, -math.log(2)], [0.0, 1.0, -math.log(2)]]), pos)
    assert got.item() == pytest.approx(want.item(), abs=1e-6)
    # without them the loss is the plain one, which is lower: the rows' own negatives add to it
    plain = action_loss(z, cand, pos, tau=1.0, cand_ids=torch.tensor([10, 11]), target_ids=targets)
    assert plain.item() < got.item()
    with pytest.raises(ValueError, match="row_cand_ids"):
        action_loss(z, cand, pos, tau=1.0, row_cand=row)
