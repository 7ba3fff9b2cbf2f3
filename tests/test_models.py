"""ResNet-12 and conv4 variants: shapes, DropBlock's statistics, and exact meta-gradients."""

import pytest
import torch
from test_bilevel import WAYS, image_tasks
from test_gradient_family import build, outer_grads

from metalearn.errors import ConfigError
from metalearn.models.conv4 import Conv4, Conv4Config
from metalearn.models.layers import max_pool_2x2
from metalearn.models.resnet12 import ResNet12, ResNet12Config, drop_block


def tiny_resnet(out_features: int = 0, **options) -> ResNet12:
    return ResNet12(ResNet12Config(widths=[4, 5, 6, 7], **options), (1, 16, 16), out_features)


def test_resnet12_embeds_into_its_last_width_and_maps_pool_by_16():
    model = ResNet12(ResNet12Config(), (3, 84, 84), 0)
    x = torch.rand(2, 3, 84, 84)
    assert model.feature_maps(x).shape == (2, 640, 5, 5)
    assert model(x).shape == (2, 640) and model.embedding_dim == 640
    assert tiny_resnet(out_features=5)(torch.rand(3, 1, 16, 16)).shape == (3, 5)


def test_resnet12_refuses_vector_inputs_and_bad_widths():
    with pytest.raises(ConfigError, match="model=mlp"):
        ResNet12(ResNet12Config(), (1,), 0)
    with pytest.raises(ConfigError, match="four positive widths"):
        ResNet12Config(widths=[64, 160])


def test_drop_block_drops_about_the_rate_in_squares_and_keeps_the_mean():
    torch.manual_seed(0)
    x = torch.ones(64, 8, 20, 20)
    out = drop_block(x, rate=0.1, size=5)
    dropped = (out == 0).float().mean().item()
    assert 0.05 < dropped < 0.15  # gamma is set for 10%; overlapping squares drop a bit fewer
    assert out.mean().item() == pytest.approx(1.0, abs=1e-5)  # rescaled
    # the first dropped unit in raster order is the top-left corner of a whole 5x5 square
    maps = out.flatten(0, 1)
    first = maps[(maps == 0).flatten(1).any(1)][0]
    r, c = (first == 0).nonzero()[0].tolist()
    assert (first[r : r + 5, c : c + 5] == 0).all()


def test_drop_block_is_off_at_evaluation_and_at_rate_zero():
    model = tiny_resnet(drop_rate=0.5, drop_block_size=3)
    x = torch.rand(4, 1, 16, 16)
    model.train(False)
    assert torch.equal(model(x), model(x))
    model.train(True)
    assert not torch.equal(model(x), model(x))
    plain = tiny_resnet()
    assert torch.equal(plain(x), plain(x))


def test_maml_on_resnet12_gives_the_same_meta_gradient_under_vmap_and_the_loop(float64):
    batch = image_tasks()
    batch.support.x = torch.nn.functional.interpolate(batch.support.x.flatten(0, 1), 16).view(
        batch.tasks, -1, 1, 16, 16
    )
    batch.query.x = torch.nn.functional.interpolate(batch.query.x.flatten(0, 1), 16).view(
        batch.tasks, -1, 1, 16, 16
    )
    torch.manual_seed(0)
    vmapped = outer_grads(build("maml", tiny_resnet(WAYS)), batch)
    torch.manual_seed(0)
    looped = outer_grads(build("maml", tiny_resnet(WAYS), batching="loop"), batch)
    for key in vmapped:
        torch.testing.assert_close(vmapped[key], looped[key], rtol=1e-9, atol=1e-11)


def test_conv4_pools_in_the_blocks_it_is_told():
    x = torch.rand(2, 1, 28, 28)
    assert Conv4(Conv4Config(hidden=8), (1, 28, 28), 0).feature_maps(x).shape == (2, 8, 1, 1)
    two = Conv4(Conv4Config(hidden=8, pooled_blocks=2), (1, 28, 28), 0)
    assert two.feature_maps(x).shape == (2, 8, 7, 7)
    with pytest.raises(ConfigError, match="pooled_blocks"):
        Conv4Config(pooled_blocks=5)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv4_without_gradients_gives_the_same_maps_bit_for_bit(channels_last, dtype):
    """Validation's path (ReLU after an index-free 2x2 max-pool) equals nn.MaxPool2d after the
    ReLU exactly, odd sizes included (28 -> 14 -> 7 -> 3 -> 1)."""
    torch.manual_seed(0)
    model = Conv4(Conv4Config(hidden=16), (1, 28, 28), 5, channels_last=channels_last)
    model = model.to(dtype)
    x = torch.rand(12, 1, 28, 28, dtype=dtype)
    with torch.no_grad():
        fast = model(x)
    reference = model.features(
        x.contiguous(memory_format=torch.channels_last) if channels_last else x
    )
    reference = model.head(reference.flatten(1))
    assert torch.equal(fast, reference.detach())
    assert max_pool_2x2(torch.arange(25.0).view(1, 5, 5)).tolist() == [[[6.0, 8.0], [16.0, 18.0]]]
