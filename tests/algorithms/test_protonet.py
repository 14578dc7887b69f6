"""Prototypical Networks against a hand computation in float64: prototypes are the class means
of the support embeddings (``network.features``), logits the negative squared Euclidean
distances to them, the loss their cross-entropy; the head is frozen."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from episodes_for_tests import random_episodes, tiny_model

from fewshot.algorithms import ProtoNet
from fewshot.algorithms.protonet import negative_squared_distances, prototypes
from fewshot.core.episode import Episodes
from fewshot.execution import Loop, Vmap, run_meta_batch


def shuffled_episodes(tasks: int = 3, ways: int = 3, shots: int = 2, queries: int = 3) -> Episodes:
    """Episodes whose support and query images come in a random class order (the class means
    must group by label, not by position)."""
    episodes = random_episodes(tasks=tasks, ways=ways, shots=shots, queries=queries)
    g = torch.Generator().manual_seed(5)
    orders = [torch.stack([torch.randperm(t.shape[1], generator=g) for _ in range(tasks)])
              for t in (episodes.support_y, episodes.query_y)]
    rows = torch.arange(tasks)[:, None]
    (s, q) = orders
    return Episodes(episodes.support_x[rows, s], episodes.support_y[rows, s],
                    episodes.query_x[rows, q], episodes.query_y[rows, q])


def logits_by_hand(network, support_x, support_y, query_x) -> torch.Tensor:
    support = network.features(support_x)
    classes = int(support_y.max()) + 1
    centres = torch.stack([support[support_y == c].mean(dim=0) for c in range(classes)])
    query = network.features(query_x)
    return -torch.stack([((query - centre) ** 2).sum(dim=1) for centre in centres], dim=1)


def built(ways: int = 3):
    network = tiny_model(ways=ways)
    protonet = ProtoNet()
    protonet.build(network)
    return network, protonet


def test_the_helpers_are_class_means_and_negative_squared_distances():
    g = torch.Generator().manual_seed(0)
    embeddings = torch.randn(6, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([2, 0, 1, 0, 2, 1])
    centres = prototypes(embeddings, labels, 3)
    for c in range(3):
        torch.testing.assert_close(centres[c], embeddings[labels == c].mean(dim=0), rtol=1e-14, atol=0)
    queries = torch.randn(5, 4, generator=g, dtype=torch.float64)
    expected = -torch.cdist(queries, centres) ** 2
    torch.testing.assert_close(negative_squared_distances(queries, centres), expected,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("training", [True, False], ids=["training", "evaluation"])
@pytest.mark.parametrize("executor", [Loop(), Vmap()], ids=["loop", "vmap"])
def test_task_outputs_equal_the_hand_computation(training, executor):
    network, protonet = built()
    episodes = shuffled_episodes()
    results = run_meta_batch(protonet, network, episodes, executor, training=training)
    assert results.losses.shape == results.accuracies.shape == results.objective.shape == (3, 1)
    assert results.diagnostics == {} and results.batch_norm_statistics == {}
    assert results.objective.requires_grad == training
    for task, (sx, sy, qx, qy) in enumerate(zip(*episodes, strict=True)):
        logits = logits_by_hand(network, sx, sy, qx)
        assert results.losses[task, 0].item() == pytest.approx(F.cross_entropy(logits, qy).item(),
                                                               rel=1e-12)
        accuracy = (logits.argmax(dim=1) == qy).double().mean().item()
        assert results.accuracies[task, 0].item() == pytest.approx(accuracy)


def test_meta_gradient_is_that_of_the_cross_entropy_of_the_hand_logits():
    network, protonet = built()
    episodes = shuffled_episodes()
    features = [p for _, p in network.features.named_parameters()]
    loss = protonet.meta_loss(run_meta_batch(protonet, network, episodes, Loop()), epoch=0)
    grads = torch.autograd.grad(loss, features)
    expected_loss = sum(F.cross_entropy(logits_by_hand(network, sx, sy, qx), qy)
                        for sx, sy, qx, qy in zip(*episodes, strict=True)) / episodes.num_tasks
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-12)
    expected = torch.autograd.grad(expected_loss, features)
    for grad, reference in zip(grads, expected, strict=True):
        torch.testing.assert_close(grad, reference, rtol=1e-10, atol=1e-13)


def test_the_head_is_frozen_after_build_and_gets_no_gradient():
    network = tiny_model()
    assert network.head.weight.requires_grad and network.head.bias.requires_grad
    protonet = ProtoNet()
    protonet.build(network)
    assert not network.head.weight.requires_grad and not network.head.bias.requires_grad
    assert all(p.requires_grad for p in network.features.parameters())
    head_before = network.head.weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in network.parameters() if p.requires_grad], lr=0.1)
    protonet.meta_loss(run_meta_batch(protonet, network, shuffled_episodes(), Loop()), 0).backward()
    assert network.head.weight.grad is None and network.head.bias.grad is None
    assert network.features.blocks[0].weight.grad.abs().sum() > 0
    optimizer.step()
    assert torch.equal(network.head.weight, head_before)
    assert protonet.uses_head is False and protonet.evaluation_steps == 0
    assert protonet.meta_parameters() == {}


def test_build_needs_a_network_with_features():
    with pytest.raises(ValueError, match="network.features"):
        ProtoNet().build(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("network_ways, task_ways", [(3, 3), (5, 3)])
def test_adapt_and_predict_give_the_hand_logits(network_ways, task_ways):
    """Prototypes need no head: a network trained 5-way adapts to a 3-way task as it is."""
    network, protonet = built(network_ways)
    episodes = shuffled_episodes(tasks=1, ways=task_ways)
    sx, sy, qx, _ = (t[0] for t in episodes)
    adapted = protonet.adapt(network, dict(network.named_parameters()), sx, sy)
    assert adapted.steps_taken == 0 and adapted.extras["prototypes"].shape == (task_ways, 4)
    logits = protonet.predict(network, adapted, qx)
    assert logits.shape == (qx.shape[0], task_ways) and not logits.requires_grad
    torch.testing.assert_close(logits, logits_by_hand(network, sx, sy, qx), rtol=1e-12, atol=1e-12)
