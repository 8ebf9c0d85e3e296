"""Tests for the Matching Networks baseline (Vinyals et al., 2016, with FCE)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import Tensor, nn

from l2l_adversarial.algorithms.matching_networks import MatchingNetwork
from l2l_adversarial.attacks import FGSM

SIZE = 16  # 16x16 images: CNN4's four poolings leave a 1x1 map, so D = hidden


def make_net(seed: int = 0, **kwargs: object) -> MatchingNetwork:
    torch.manual_seed(seed)
    options: dict[str, object] = {
        "ways": 5,
        "in_channels": 1,
        "image_size": SIZE,
        "hidden": 8,
        "processing_steps": 3,
    }
    options.update(kwargs)
    return MatchingNetwork(**options)  # type: ignore[arg-type]


def random_episode(shots: int = 2, queries: int = 3, seed: int = 1) -> tuple[Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    support_labels = torch.arange(5).repeat_interleave(shots)
    query_labels = torch.arange(5).repeat_interleave(queries)
    support = torch.rand(len(support_labels), 1, SIZE, SIZE, generator=generator)
    query = torch.rand(len(query_labels), 1, SIZE, SIZE, generator=generator)
    return support, support_labels, query, query_labels


# -- a small few-shot problem: classes are 4x4 binary motifs tiled with a random phase in
# channel 1, under 30% noise; channel 0 is class-independent noise the embedding must ignore.
def motifs(count: int, generator: torch.Generator) -> Tensor:
    return (torch.rand(count, 4, 4, generator=generator) < 0.5).float()


def motif_images(motif_batch: Tensor, generator: torch.Generator) -> Tensor:
    count = motif_batch.shape[0]
    tiled = motif_batch.repeat(1, SIZE // 4 + 1, SIZE // 4 + 1)
    shifts = torch.randint(0, 4, (count, 2), generator=generator)
    rows = torch.arange(SIZE)
    patterns = torch.stack(
        [tiled[i][rows + shifts[i, 0]][:, rows + shifts[i, 1]] for i in range(count)]
    )
    signal = 0.3 * torch.rand(count, SIZE, SIZE, generator=generator) + 0.7 * patterns
    nuisance = torch.rand(count, SIZE, SIZE, generator=generator)
    return torch.stack([nuisance, signal], dim=1)


def motif_episode(pool: Tensor, shots: int, generator: torch.Generator) -> tuple[Tensor, ...]:
    classes = torch.randperm(pool.shape[0], generator=generator)[:5]
    support_labels = torch.arange(5).repeat_interleave(shots)
    query_labels = torch.arange(5).repeat_interleave(5)
    support = motif_images(pool[classes[support_labels]], generator)
    query = motif_images(pool[classes[query_labels]], generator)
    return support, support_labels, query, query_labels


def query_accuracy(net: MatchingNetwork, pool: Tensor, shots: int, episodes: int = 30) -> float:
    generator = torch.Generator().manual_seed(123)
    correct = total = 0
    with torch.no_grad():
        for _ in range(episodes):
            sx, sy, qx, qy = motif_episode(pool, shots, generator)
            correct += int((net(sx, sy, qx).argmax(dim=1) == qy).sum())
            total += len(qy)
    return correct / total


# -- independent reference of Vinyals et al.'s FCE equations ---------------------------------
def lstm_step(
    inputs: Tensor, hidden: Tensor, cell: Tensor, w_in: Tensor, w_state: Tensor, bias: Tensor
) -> tuple[Tensor, Tensor]:
    gates = inputs @ w_in.T + hidden @ w_state.T + bias
    i, f, g, o = gates.chunk(4, dim=-1)
    cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(cell), cell


def reference_log_probabilities(
    net: MatchingNetwork, support: Tensor, labels: Tensor, query: Tensor
) -> Tensor:
    """Appendix equations of Vinyals et al. written out step by step."""
    support_features, query_features = net.embedding(support), net.embedding(query)
    width = support_features.shape[1]
    lstm = net.support_lstm

    def run(order: list[int], suffix: str) -> dict[int, Tensor]:
        hidden, cell, outputs = torch.zeros(width), torch.zeros(width), {}
        for i in order:
            hidden, cell = lstm_step(
                support_features[i],
                hidden,
                cell,
                getattr(lstm, f"weight_ih_l0{suffix}"),
                getattr(lstm, f"weight_hh_l0{suffix}"),
                getattr(lstm, f"bias_ih_l0{suffix}") + getattr(lstm, f"bias_hh_l0{suffix}"),
            )
            outputs[i] = hidden
        return outputs

    n = len(support)
    forward, backward = run(list(range(n)), ""), run(list(reversed(range(n))), "_reverse")
    g = torch.stack([support_features[i] + forward[i] + backward[i] for i in range(n)])

    # LSTM(f'(x), [h_{k-1}, r_{k-1}], c_{k-1}): the state input is the concatenation [h, r].
    cell_module = net.query_lstm
    w_input = cell_module.weight_ih[:, :width]
    w_state = torch.cat([cell_module.weight_hh, cell_module.weight_ih[:, width:]], dim=1)
    bias = cell_module.bias_ih + cell_module.bias_hh
    rows = []
    for f in query_features:
        h, c = f, torch.zeros(width)
        for _ in range(net.processing_steps):
            r = torch.softmax(g @ h, dim=0) @ g
            h_hat, c = lstm_step(f, torch.cat([h, r]), c, w_input, w_state, bias)
            h = h_hat + f
        cosine = torch.nn.functional.cosine_similarity(h.unsqueeze(0), g, dim=1)
        weights = torch.softmax(cosine, dim=0)
        rows.append(torch.log(weights @ torch.nn.functional.one_hot(labels, 5).float()))
    return torch.stack(rows)


# -- tests ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fce", [True, False])
def test_output_shapes_and_normalisation(fce: bool) -> None:
    net = make_net(fce=fce)
    sx, sy, qx, qy = random_episode(shots=2, queries=3)
    log_probabilities = net(sx, sy, qx)
    assert log_probabilities.shape == (15, 5)
    torch.testing.assert_close(log_probabilities.exp().sum(dim=1), torch.ones(15))
    weights = net.attention(sx, sy, qx)
    assert weights.shape == (15, 10)
    assert bool((weights > 0).all())
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(15))
    loss = net.meta_loss(sx, sy, qx, qy)
    assert loss.dim() == 0 and torch.isfinite(loss)
    torch.testing.assert_close(loss, nn.functional.cross_entropy(log_probabilities, qy))
    same_loss, accuracy = net.loss_and_accuracy(sx, sy, qx, qy)
    torch.testing.assert_close(same_loss, loss)
    expected_accuracy = (log_probabilities.argmax(dim=1) == qy).float().mean()
    assert not accuracy.requires_grad and torch.equal(accuracy, expected_accuracy)


def test_fce_matches_the_papers_equations() -> None:
    net = make_net(fce=True)
    sx, sy, qx, _ = random_episode(shots=2, queries=2)
    with torch.no_grad():
        torch.testing.assert_close(net(sx, sy, qx), reference_log_probabilities(net, sx, sy, qx))


def test_without_fce_attention_is_the_cosine_kernel_on_cnn_features() -> None:
    net = make_net(fce=False)
    sx, sy, qx, _ = random_episode(shots=1, queries=2)
    with torch.no_grad():
        support, query = net.embedding(sx), net.embedding(qx)
        cosine = nn.functional.cosine_similarity(query[:, None, :], support[None, :, :], dim=2)
        expected = torch.softmax(cosine, dim=1)
        torch.testing.assert_close(net.attention(sx, sy, qx), expected)
        torch.testing.assert_close(net(sx, sy, qx), torch.log(expected))  # 1-shot: a = p


def test_fce_can_be_switched_off_and_changes_the_outputs() -> None:
    with_fce, without_fce = make_net(seed=3, fce=True), make_net(seed=3, fce=False)
    for a, b in zip(
        with_fce.embedding.parameters(), without_fce.embedding.parameters(), strict=True
    ):
        assert torch.equal(a, b)  # same CNN, so any difference comes from FCE
    assert not any("lstm" in name for name, _ in without_fce.named_parameters())
    assert any("lstm" in name for name, _ in with_fce.named_parameters())
    sx, sy, qx, _ = random_episode()
    assert not torch.allclose(with_fce(sx, sy, qx), without_fce(sx, sy, qx), atol=1e-4)


def test_custom_embedding_and_deeper_support_lstm() -> None:
    torch.manual_seed(0)
    embedding = nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, 12), nn.ReLU())
    net = MatchingNetwork(embedding, ways=5, in_channels=1, image_size=SIZE, lstm_layers=2)
    assert net.embedding_dim == 12
    assert net.support_lstm.num_layers == 2
    sx, sy, qx, qy = random_episode()
    assert net(sx, sy, qx).shape == (15, 5)
    explicit = MatchingNetwork(embedding, ways=5, embedding_dim=12)  # no probe needed
    assert explicit.embedding_dim == 12


@pytest.mark.parametrize("fce", [True, False])
def test_learns_novel_classes_well_above_chance(fce: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    train_pool, test_pool = motifs(30, generator), motifs(20, generator)  # disjoint classes
    net = make_net(seed=0, fce=fce, in_channels=2, hidden=16)
    before = query_accuracy(net, test_pool, shots=5)
    optimizer = torch.optim.Adam(net.parameters(), lr=5e-3)
    for _ in range(150):
        optimizer.zero_grad()
        net.meta_loss(*motif_episode(train_pool, 5, generator)).backward()
        optimizer.step()
    after = query_accuracy(net, test_pool, shots=5)
    assert after > 0.6, (before, after)  # chance is 0.2
    assert after > before + 0.2, (before, after)


def test_training_is_deterministic_given_a_seed() -> None:
    def train(seed: int) -> tuple[list[float], dict[str, Tensor]]:
        net = make_net(seed=seed)
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
        losses = []
        for episode in range(5):
            optimizer.zero_grad()
            loss = net.meta_loss(*random_episode(seed=episode))
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses, net.state_dict()

    (losses_a, state_a), (losses_b, state_b) = train(7), train(7)
    assert losses_a == losses_b
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    losses_c, _ = train(8)
    assert losses_c != losses_a


def test_state_dict_round_trip_gives_identical_outputs() -> None:
    net = make_net(seed=0)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    optimizer.zero_grad()
    net.meta_loss(*random_episode()).backward()
    optimizer.step()
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    buffer.seek(0)
    restored = make_net(seed=99)
    sx, sy, qx, _ = random_episode(seed=5)
    assert not torch.allclose(restored(sx, sy, qx), net(sx, sy, qx))
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(restored(sx, sy, qx), net(sx, sy, qx))


def test_query_attack_raises_the_loss_and_leaves_the_network_untouched() -> None:
    net = make_net(seed=0)
    sx, sy, qx, qy = random_episode()
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    model = net.query_model(sx, sy)
    clean = model(qx)
    assert not clean.requires_grad  # detached parameters: no edge into the network
    torch.testing.assert_close(clean, net(sx, sy, qx).detach())
    adversarial = FGSM(eps=8 / 255)(model, qx, qy)
    assert float((adversarial - qx).abs().max()) <= 8 / 255 + 1e-6
    clean_loss = nn.functional.nll_loss(net(sx, sy, qx), qy)
    assert nn.functional.nll_loss(net(sx, sy, adversarial), qy) > clean_loss
    for name, p in net.named_parameters():
        assert p.grad is None and torch.equal(p, before[name])


def test_support_attack_targets_the_clean_support_classifier() -> None:
    net = make_net(seed=0)
    sx, sy, qx, _ = random_episode()
    model = net.support_model(sx, sy)
    torch.testing.assert_close(model(sx), net(sx, sy, sx).detach())
    adversarial = FGSM(eps=8 / 255)(model, sx, sy)
    assert adversarial.shape == sx.shape and not torch.equal(adversarial, sx)
    assert float((adversarial - sx).abs().max()) <= 8 / 255 + 1e-6
    clean_loss = nn.functional.nll_loss(net(sx, sy, sx), sy)
    assert nn.functional.nll_loss(net(sx, sy, adversarial), sy) > clean_loss
    assert net(adversarial, sy, qx).shape == (15, 5)  # usable as an adversarial support set


def test_invalid_inputs_raise_clear_errors() -> None:
    net = make_net(seed=0)
    sx, sy, qx, qy = random_episode()
    with pytest.raises(ValueError, match=r"support_labels must lie in \[0, 5\)"):
        net(sx, torch.where(sy == 4, 5, sy), qx)
    with pytest.raises(ValueError, match=r"no sample of class\(es\) \[4\]"):
        net(sx, torch.where(sy == 4, 0, sy), qx)
    with pytest.raises(ValueError, match="query_labels must lie"):
        net.meta_loss(sx, sy, qx, qy + 1)
    with pytest.raises(ValueError, match="same data"):
        net(sx, sy, qx[:, :, :8])
    with pytest.raises(ValueError, match="non-finite"):
        net(torch.full_like(sx, float("nan")), sy, qx)
    with pytest.raises(TypeError, match="integer class indices"):
        net(sx, sy.float(), qx)
    with pytest.raises(ValueError, match="query_inputs must be"):
        net(sx, sy, torch.tensor(1.0))


def test_invalid_construction_raises_clear_errors() -> None:
    with pytest.raises(ValueError, match="ways must be an integer >= 2"):
        MatchingNetwork(ways=1)
    with pytest.raises(ValueError, match="processing_steps"):
        MatchingNetwork(processing_steps=0)
    with pytest.raises(ValueError, match="lstm_layers"):
        MatchingNetwork(lstm_layers=0)
    with pytest.raises(TypeError, match="embedding must be a torch.nn.Module"):
        MatchingNetwork("cnn")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="flat"):
        MatchingNetwork(nn.Conv2d(1, 4, 3), in_channels=1, image_size=SIZE)
    with pytest.raises(ValueError, match="pass embedding_dim"):
        MatchingNetwork(nn.Linear(7, 4), in_channels=1, image_size=SIZE)
    unflattened = MatchingNetwork(nn.Conv2d(1, 4, 3), fce=False)
    sx, sy, qx, _ = random_episode()
    with pytest.raises(ValueError, match="flat"):
        unflattened(sx, sy, qx)
    wrong_width = MatchingNetwork(nn.Flatten(), embedding_dim=12)
    with pytest.raises(ValueError, match="embedding_dim=12"):
        wrong_width(sx, sy, qx)
