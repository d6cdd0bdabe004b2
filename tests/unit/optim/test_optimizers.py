"""Memory-efficient optimizers against naive references: GaLore = P·Adam(PᵀG) (and AdamW with P = I),
LOMO = SGD with the same clipping, MeZO's estimate = a finite difference, LISA's sampling and state."""
import copy

import pytest
import torch
from torch import nn

from deltatune.optim.galore import GaLore
from deltatune.optim.lisa import Lisa
from deltatune.optim.lomo import Lomo
from deltatune.optim.mezo import Mezo, small_magnitude_mask
from deltatune.utils.errors import ConfigError
from tests.helpers import tiny_llama_config


def naive_galore(w0, grads, lr, betas, eps, rank, scale, wd):
    """P from the SVD of the first gradient, Adam moments on PᵀG (or GQ), update α·P·N — by hand."""
    w = w0.clone().double()
    m = v = None
    tall = w.shape[0] >= w.shape[1]
    u, _, vh = torch.linalg.svd(grads[0].double(), full_matrices=False)
    basis = u[:, :rank] if tall else vh[:rank].T
    for t, g in enumerate(grads, start=1):
        g = g.double()
        r = basis.T @ g if tall else g @ basis
        m = (1 - betas[0]) * r if m is None else betas[0] * m + (1 - betas[0]) * r
        v = (1 - betas[1]) * r * r if v is None else betas[1] * v + (1 - betas[1]) * r * r
        n = (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
        update = scale * (basis @ n if tall else n @ basis.T)
        w = w * (1 - lr * wd) - lr * update
    return w


@pytest.mark.parametrize("shape", [(12, 7), (5, 9)])
def test_galore_equals_naive_projected_adam(shape):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(shape))
    w0 = w.detach().clone()
    grads = [torch.randn(shape) for _ in range(4)]
    opt = GaLore([{"params": [w], "galore": True}], lr=0.01, rank=3, update_gap=100, scale=0.5, weight_decay=0.1)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    ref = naive_galore(w0, grads, 0.01, (0.9, 0.999), 1e-8, 3, 0.5, 0.1)
    assert (w.detach().double() - ref).abs().max() < 1e-5
    # the moments are rank-sized: [r, n] for a tall matrix, [m, r] for a wide one
    expected = (3, shape[1]) if shape[0] >= shape[1] else (shape[0], 3)
    assert tuple(opt.state[w]["exp_avg"].shape) == expected


def test_galore_with_identity_projection_is_adamw():
    torch.manual_seed(1)
    w1 = nn.Parameter(torch.randn(6, 4))
    w2 = nn.Parameter(w1.detach().clone())
    identity = lambda g, r: torch.eye(g.shape[0] if g.shape[0] >= g.shape[1] else g.shape[1])  # noqa: E731
    ours = GaLore([{"params": [w1], "galore": True}], lr=0.02, rank=4, scale=1.0, weight_decay=0.05, projector=identity)
    ref = torch.optim.AdamW([w2], lr=0.02, weight_decay=0.05, foreach=False)
    for _ in range(5):
        g = torch.randn(6, 4)
        w1.grad, w2.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert (w1 - w2).abs().max() < 1e-5


def small_net(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def batch_loss(net, batch):
    return ((net(batch["x"]) - batch["y"]) ** 2).sum()


@pytest.mark.parametrize("max_norm", [None, 0.05])
def test_lomo_equals_sgd_with_the_same_clipping(max_norm):
    net, ref = small_net(), small_net()
    batch = {"x": torch.randn(4, 6), "y": torch.randn(4, 3)}
    opt = Lomo(net.parameters(), lr=0.1, max_grad_norm=max_norm)
    loss_sum = opt.train_step([batch], lambda i, b: (batch_loss(net, b), batch_loss(net, b).detach()))
    assert all(p.grad is None for p in net.parameters())  # gradients were freed inside backward
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1)
    loss = batch_loss(ref, batch)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm) if max_norm else None
    sgd.step()
    if max_norm:
        assert norm > 10 * max_norm  # the clipping really acted
    assert float(loss_sum) == pytest.approx(float(loss))
    for p, q in zip(net.parameters(), ref.parameters()):
        assert (p - q).abs().max() < 1e-6


def test_lomo_refuses_gradient_accumulation():
    net = small_net()
    before = [p.detach().clone() for p in net.parameters()]
    batch = {"x": torch.randn(2, 6), "y": torch.randn(2, 3)}
    with pytest.raises(ConfigError, match="train.grad_accum = 2"):
        Lomo(net.parameters(), lr=0.1).train_step([batch, batch], lambda i, b: (batch_loss(net, b), None))
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))


def test_mezo_estimate_matches_finite_difference_and_directional_derivative():
    net = small_net(dtype=torch.float64)
    batch = {"x": torch.randn(5, 6, dtype=torch.float64), "y": torch.randn(5, 3, dtype=torch.float64)}
    before = [p.detach().clone() for p in net.parameters()]
    opt = Mezo(net.parameters(), lr=1e-3, eps=1e-4)
    g, plus, minus = opt.estimate(lambda: batch_loss(net, batch), seed=7)
    # θ is restored after the two perturbed passes
    assert all((p - q).abs().max() < 1e-12 for p, q in zip(net.parameters(), before))
    # reference: the same z regenerated from the seed, a central difference on a copy of the model
    gen = torch.Generator().manual_seed(7)
    z = [torch.randn(p.shape, generator=gen, dtype=torch.float32).double() for p in net.parameters()]
    ref_net = copy.deepcopy(net)
    with torch.no_grad():
        for p, zi in zip(ref_net.parameters(), z):
            p.add_(zi, alpha=1e-4)
        lp = float(batch_loss(ref_net, batch))
        for p, zi in zip(ref_net.parameters(), z):
            p.add_(zi, alpha=-2e-4)
        lm = float(batch_loss(ref_net, batch))
    assert plus == pytest.approx(lp, abs=1e-10) and minus == pytest.approx(lm, abs=1e-10)
    assert g == pytest.approx((lp - lm) / 2e-4, rel=1e-8)
    # and it is the directional derivative zᵀ∇L
    batch_loss(net, batch).backward()
    directional = sum(float((p.grad * zi).sum()) for p, zi in zip(net.parameters(), z))
    assert g == pytest.approx(directional, rel=1e-5)
    # the update is θ − lr·ĝ·z
    for p in net.parameters():
        p.grad = None
    opt.apply(7, g)
    for p, q, zi in zip(net.parameters(), before, z):
        assert (p - (q - 1e-3 * g * zi)).abs().max() < 1e-10


def test_sparse_mezo_changes_only_small_magnitude_entries():
    net = small_net()
    batch = {"x": torch.randn(5, 6), "y": torch.randn(5, 3)}
    before = [p.detach().clone() for p in net.parameters()]
    masks = [small_magnitude_mask(p, 0.25) for p in net.parameters()]
    opt = Mezo(net.parameters(), lr=1e-2, eps=1e-3, density=0.25)
    for _ in range(3):
        opt.train_step([batch], lambda i, b: (batch_loss(net, b), batch_loss(net, b)))
    for p, q, m in zip(net.parameters(), before, masks):
        assert torch.equal(p[~m], q[~m])  # outside the mask: bit-identical
        assert not torch.equal(p[m], q[m])
        assert m.sum() == max(1, int(0.25 * p.numel()))


def test_mezo_without_a_scalar_loss_fails_and_leaves_weights():
    net = small_net()
    before = [p.detach().clone() for p in net.parameters()]
    opt = Mezo(net.parameters(), lr=1e-2)
    with pytest.raises(ConfigError, match="objective must return a scalar loss"):
        opt.train_step([{"x": torch.randn(2, 6)}], lambda i, b: (net(b["x"]), None))
    assert all((p - q).abs().max() < 1e-6 for p, q in zip(net.parameters(), before))


def test_lisa_samples_layers_and_keeps_state_only_for_active_ones():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=4))
    params = list(model.parameters())
    opt = Lisa(params, model, n_active=2, interval=3, lr=1e-3)
    layers = model.model.layers

    def active():
        return [i for i, layer in enumerate(layers) if all(p.requires_grad for p in layer.parameters())]

    first = active()
    assert len(first) == 2 and first == opt.active_layers
    assert all(not p.requires_grad for i, layer in enumerate(layers) if i not in first for p in layer.parameters())
    assert model.model.embed_tokens.weight.requires_grad and model.lm_head.weight.requires_grad
    ids = torch.randint(0, 128, (2, 8))
    seen = {tuple(first)}
    for _ in range(9):
        current = active()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        stateful = {id(p) for p in opt.state}
        layer_of = {id(p): i for i, layer in enumerate(layers) for p in layer.parameters()}
        # optimizer state: embeddings/head/norm + only the layers active now (or just before a re-draw)
        assert {layer_of[i] for i in stateful if i in layer_of} <= set(current)
        assert id(model.lm_head.weight) in stateful
        seen.add(tuple(active()))
    assert len(seen) > 1  # re-drawn every 3 steps


def test_lisa_gamma_above_layers_is_an_error():
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config())
    with pytest.raises(ConfigError, match=r"optim.lisa.layers = 3 is more than the 2 layers"):
        Lisa(list(model.parameters()), model, n_active=3, interval=2)


@pytest.mark.parametrize("max_norm", [None, 0.05])
def test_layerwise_galore_equals_clip_then_step(max_norm):
    """Updating each weight inside backward (gradients freed at once) is the same update as backward → clip → step."""
    net, ref = small_net(), small_net()

    def groups(m):
        return [{"params": [p for p in m.parameters() if p.ndim == 2], "galore": True}, {"params": [p for p in m.parameters() if p.ndim < 2]}]

    ours = GaLore(groups(net), lr=0.01, rank=2, update_gap=2, scale=0.5, weight_decay=0.1, layerwise=True, max_grad_norm=max_norm)
    plain = GaLore(groups(ref), lr=0.01, rank=2, update_gap=2, scale=0.5, weight_decay=0.1)
    for step in range(3):  # crosses a basis refresh (update_gap 2)
        batch = {"x": torch.randn(4, 6, generator=torch.Generator().manual_seed(step)), "y": torch.randn(4, 3, generator=torch.Generator().manual_seed(9 + step))}
        loss_sum = ours.train_step([batch], lambda i, b: (batch_loss(net, b), batch_loss(net, b).detach()))
        assert all(p.grad is None for p in net.parameters())
        loss = batch_loss(ref, batch)
        loss.backward()
        if max_norm:
            assert torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm) > 10 * max_norm
        plain.step()
        plain.zero_grad(set_to_none=True)
        assert float(loss_sum) == pytest.approx(float(loss))
    for p, q in zip(net.parameters(), ref.parameters()):
        assert (p - q).abs().max() < 1e-6
    with pytest.raises(RuntimeError, match="train_step"):
        ours.step()
