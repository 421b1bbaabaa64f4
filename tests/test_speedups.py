"""Speed switches: the optimizer kernel choice and the channels_last callback (speed itself is not asserted)."""

import pytest
import torch

from src.lit.optim import make_optimizer
from src.training import train


def adam_steps(implementation: str) -> list[torch.Tensor]:
    torch.manual_seed(0)
    params = [torch.randn(8, 4, 3, 3, requires_grad=True), torch.randn(8, requires_grad=True)]
    optimizer = make_optimizer(params, implementation=implementation, lr=1e-2)
    for _ in range(3):
        loss = sum((p**2).sum() for p in params)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return params


def test_auto_keeps_torch_default_on_cpu_and_foreach_gives_the_same_numbers():
    optimizer = make_optimizer([torch.zeros(2, requires_grad=True)], lr=1e-3)
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["foreach"] is None
    assert make_optimizer([torch.zeros(2, requires_grad=True)], implementation="foreach", lr=1e-3).defaults["foreach"]
    loop = adam_steps("for-loop")
    for other in (adam_steps("auto"), adam_steps("foreach")):
        for a, b in zip(other, loop):
            assert torch.equal(a, b)


def test_unknown_implementation_is_an_error():
    with pytest.raises(ValueError, match="unknown optimizer implementation 'fast'"):
        make_optimizer([torch.zeros(2, requires_grad=True)], implementation="fast", lr=1e-3)


@pytest.mark.slow
def test_channels_last_switch_trains_and_keeps_checkpoint_names(compose_train):
    cfg = compose_train("trainer.max_steps=2", "callbacks.sample_grid=null", "callbacks.speedups.channels_last=true")
    _, objects = train(cfg)
    module = objects["module"]
    conv = module.net.conv_out.weight  # [1, 32, 3, 3]: the layouts differ (conv_in has 1 input channel)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert module.ema.model.conv_out.weight.is_contiguous(memory_format=torch.channels_last)
    assert module.ema.num_updates == 2
    ckpt = torch.load(objects["trainer"].checkpoint_callback.last_model_path, weights_only=False)
    assert set(ckpt["state_dict"]) == set(module.state_dict())


@pytest.mark.slow
def test_compile_switch_trains_the_compiled_network_like_the_eager_one(compose_train, tmp_path):
    from torch._dynamo.utils import counters

    def run(*switches: str):  # each run in its own folder
        _, objects = train(
            compose_train(
                "trainer.max_steps=2",
                "callbacks.sample_grid=null",
                *switches,
                output_dir=tmp_path / ("compiled" if switches else "eager"),
            )
        )
        return objects

    eager = run()
    counters.clear()
    compiled = run("callbacks.speedups.compile=true")
    assert counters["stats"]["unique_graphs"] >= 1  # the training network really ran through torch.compile
    ckpt = torch.load(compiled["trainer"].checkpoint_callback.last_model_path, weights_only=False)
    assert set(ckpt["state_dict"]) == set(eager["module"].state_dict())  # no _orig_mod. prefixes
    # Two Adam steps move each weight by about lr * sign(grad) per step; inductor rounds differently, which
    # can only flip the sign of gradients that are already ~0, so nearly every weight must land where
    # eager's did (a wrong compiled gradient would move most weights elsewhere).
    pairs = zip(compiled["module"].net.state_dict().values(), eager["module"].net.state_dict().values())
    diffs = torch.cat([(a.float() - b.float()).abs().flatten() for a, b in pairs])
    assert (diffs < 1e-6).float().mean() > 0.99, f"{(diffs < 1e-6).float().mean():.4f} of weights agree"
