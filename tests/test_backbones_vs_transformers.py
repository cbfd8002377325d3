"""ConvNeXt and Swin backbones against transformers' `ConvNextBackbone` / `SwinBackbone` inside
`DeformableDetrForObjectDetection`, every weight perturbed: the backbone's feature maps, logits
and boxes on a padded batch of two images whose sizes are no multiples of the patch or window
size, float32 to 1e-4 and float64 to 1e-9; the state dict both ways; the backbone's gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deformable_detr_jax import DeformableDetrConfig, convert_state_dict, export_state_dict
from tests import hf_reference as ref
from tests.random_models import SMALL

pytestmark = pytest.mark.torch

SIZES = ((130, 170), (97, 161))  # not multiples of 3, 4 or 5 (nor of 32)
CASES = [
    ("convnext", "box_refine", {}),
    ("convnext", "two_stage", {"num_feature_levels": 5}),
    ("swin", "box_refine", {}),
    ("swin", "two_stage", {}),
]


@pytest.fixture
def float64_proposals(monkeypatch):
    """transformers' proposal position embedding in the model's dtype (it casts to float32)."""
    from transformers.models.deformable_detr import modeling_deformable_detr as hf_modeling

    from tests.test_parity import torch_proposal_pos_embed

    monkeypatch.setattr(
        hf_modeling.DeformableDetrModel,
        "get_proposal_pos_embed",
        lambda self, proposals: torch_proposal_pos_embed(proposals, self.config.d_model),
    )


def _hf_model(kind, variant, seed, **kwargs):
    # one encoder layer, one decoder layer in two-stage (the ResNet tests cover the transformer);
    # transformers 5 cannot build a model with a single class/box head (its tied-weights check)
    layers = {"encoder_layers": 1, "decoder_layers": 1 if variant == "two_stage" else 2}
    fields = {**SMALL, **layers, **ref.VARIANTS[variant], **kwargs}
    hf_cfg = ref.hf_config_with_backbone(kind, **fields)
    return hf_cfg, ref.random_hf_model(hf_cfg, seed=seed)


def _theirs(model, pixels, mask, dtype):
    import torch

    model = model.to(dtype)
    x = torch.from_numpy(pixels).to(dtype)
    m = torch.from_numpy(mask)
    with torch.no_grad():
        out = model(pixel_values=x, pixel_mask=m)
        features = [f.numpy() for f, _ in model.model.backbone(x, m)]
    return out.logits.numpy(), out.pred_boxes.numpy(), features


def _ours(config, state_dict, pixels, mask, dtype):
    from flax import nnx

    model = convert_state_dict(state_dict, config, dtype=dtype)
    x, m = jnp.asarray(pixels.transpose(0, 2, 3, 1), dtype), jnp.asarray(mask, bool)
    # jitted: one compile instead of the eager op-by-op compiles (seconds, not half a minute)
    out, maps = nnx.jit(lambda model, x, m: (model(x, m), model.model.backbone(x, m)))(model, x, m)
    # NHWC -> NCHW as transformers'
    features = [np.asarray(f).transpose(0, 3, 1, 2) for f, _ in maps]
    return np.asarray(out.logits), np.asarray(out.pred_boxes), features


def _compare(ours, theirs, tol, what):
    (logits, boxes, features), (want_logits, want_boxes, want_features) = ours, theirs
    assert len(features) == len(want_features)
    for i, (a, b) in enumerate(zip(features, want_features)):
        assert a.shape == b.shape, f"{what} feature map {i}: {a.shape} vs {b.shape}"
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol, err_msg=f"{what} features {i}")
    np.testing.assert_allclose(logits, want_logits, rtol=tol, atol=tol, err_msg=f"{what} logits")
    np.testing.assert_allclose(boxes, want_boxes, rtol=tol, atol=tol, err_msg=f"{what} boxes")
    return max(
        float(np.max(np.abs(logits - want_logits))), float(np.max(np.abs(boxes - want_boxes)))
    )


@pytest.mark.parametrize("kind, variant, kwargs", CASES)
def test_backbone_parity(kind, variant, kwargs, float64_proposals):
    """float32 to 1e-4 and float64 to 1e-9 (feature maps, logits, boxes)."""
    import torch

    hf_cfg, model = _hf_model(kind, variant, seed=31, **kwargs)
    config = DeformableDetrConfig.from_hf(hf_cfg.to_dict())
    assert config.backbone_type == kind
    state_dict = ref.state_dict_numpy(model)
    pixels, mask = ref.two_images(seed=5, sizes=SIZES)

    got = _ours(config, state_dict, pixels, mask, jnp.float32)
    diff32 = _compare(got, _theirs(model, pixels, mask, torch.float32), 1e-4, "float32")
    with jax.enable_x64(True):
        got = _ours(config, state_dict, pixels, mask, jnp.float64)
    diff64 = _compare(got, _theirs(model, pixels, mask, torch.float64), 1e-9, "float64")
    print(f"{kind} {variant}: max |diff| float32 {diff32:.2e}, float64 {diff64:.2e}")


@pytest.mark.parametrize(
    "kind, kwargs",
    [
        ("convnext", {"num_feature_levels": 4, "out_features": ["stage1", "stage2", "stage3"]}),
        (
            "swin",
            {"num_feature_levels": 5, "out_features": ["stage1", "stage2", "stage3", "stage4"]},
        ),
        ("swin_patch3", {"num_feature_levels": 1}),
    ],
)
def test_out_features_parity(kind, kwargs):
    """Other out_features (four stages: strides 4..32; not the last stage), patch size 3,
    window 3, three Swin stages, a single level: float32 to 1e-4."""
    import torch

    hf_cfg, model = _hf_model(kind, "plain", seed=41, **kwargs)
    config = DeformableDetrConfig.from_hf(hf_cfg.to_dict())
    pixels, mask = ref.two_images(seed=6, sizes=SIZES)
    got = _ours(config, ref.state_dict_numpy(model), pixels, mask, jnp.float32)
    _compare(got, _theirs(model, pixels, mask, torch.float32), 1e-4, "float32")


@pytest.mark.parametrize("kind", ["convnext", "swin"])
def test_state_dict_both_ways(kind):
    """transformers' state dict -> ours -> the same keys and values, which transformers loads;
    the config survives `to_hf` -> transformers -> `from_hf`."""
    import torch
    from transformers import DeformableDetrConfig as HFConfig

    hf_cfg, model = _hf_model(kind, "two_stage", seed=51)
    state_dict = ref.state_dict_numpy(model)
    config = DeformableDetrConfig.from_hf(hf_cfg.to_dict())
    exported = export_state_dict(convert_state_dict(state_dict, config))
    assert set(exported) == set(state_dict)
    for key, value in state_dict.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in exported.items()})
    again = HFConfig.from_dict(config.to_hf())
    assert again.backbone_config.model_type == kind
    assert DeformableDetrConfig.from_hf(again.to_dict()) == config


@pytest.mark.parametrize("kind", ["convnext", "swin"])
def test_pytorch_folders_both_ways(kind, tmp_path):
    """A folder transformers saved loads (with its config.json, and from the weights alone: the
    backbone read off the keys); `save_pytorch_checkpoint` writes the keys transformers writes
    (Swin: transformers 4 names), which transformers loads with nothing missing or unexpected;
    a transformers-4 Swin file (`relative_position_index` buffers, no `swin.layernorm`) loads."""
    import torch
    from flax import nnx
    from safetensors.numpy import load_file, save_file
    from transformers import DeformableDetrForObjectDetection as HFModel

    from deformable_detr_jax import load_pytorch_checkpoint, save_pytorch_checkpoint

    hf_cfg, model = _hf_model(kind, "box_refine", seed=61)
    model.save_pretrained(tmp_path / "theirs")
    pixels, mask = ref.two_images(seed=7, sizes=SIZES)
    x, m = jnp.asarray(pixels.transpose(0, 2, 3, 1)), jnp.asarray(mask, bool)
    with torch.no_grad():
        want = model(pixel_values=torch.from_numpy(pixels), pixel_mask=torch.from_numpy(mask))
    want = want.logits.numpy()

    ours = load_pytorch_checkpoint(tmp_path / "theirs")
    logits = nnx.jit(lambda model, x, m: model(x, m).logits)  # one compile, not op by op
    np.testing.assert_allclose(np.asarray(logits(ours, x, m)), want, rtol=1e-4, atol=1e-4)
    theirs_file = load_file(tmp_path / "theirs" / "model.safetensors")
    alone = load_pytorch_checkpoint(tmp_path / "theirs" / "model.safetensors", num_heads=2)
    for name in (
        "backbone_type",
        "backbone_depths",
        "backbone_hidden_sizes",
        "backbone_out_indices",
    ):
        assert getattr(alone.config, name) == getattr(ours.config, name), name
    assert (alone.config.backbone_num_heads, alone.config.backbone_window_size) == (
        ours.config.backbone_num_heads,
        ours.config.backbone_window_size,
    )

    save_pytorch_checkpoint(ours, tmp_path / "ours")
    assert set(load_file(tmp_path / "ours" / "model.safetensors")) == set(theirs_file)
    again, info = HFModel.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        got = again.eval()(pixel_values=torch.from_numpy(pixels), pixel_mask=torch.from_numpy(mask))
    np.testing.assert_array_equal(got.logits.numpy(), want)

    if kind == "swin":  # transformers 4: index buffers, no classifier norm
        old = {k: v for k, v in theirs_file.items() if ".swin.layernorm." not in k}
        table = next(k for k in old if k.endswith("relative_position_bias_table"))
        old[table.replace("_bias_table", "_index")] = np.zeros((25 * 25,), np.int64)
        save_file(old, tmp_path / "v4.safetensors")
        v4 = load_pytorch_checkpoint(tmp_path / "v4.safetensors", tmp_path / "theirs")
        np.testing.assert_allclose(np.asarray(logits(v4, x, m)), want, rtol=1e-4, atol=1e-4)


def test_backbone_gradients_float64():
    """The gradient of a random linear function of logits and boxes with respect to every Swin
    backbone parameter (box refinement, the padded batch), float64: equal to torch's to 1e-9
    of the largest; `swin.layernorm`, which nothing uses, gets none in torch and zero here."""
    import torch
    from flax import nnx

    from deformable_detr_jax.convert.state_dict import nnx_path_to_key, to_torch_layout

    hf_cfg, model = _hf_model("swin", "box_refine", seed=71)
    config = DeformableDetrConfig.from_hf(hf_cfg.to_dict())
    state_dict = ref.state_dict_numpy(model)
    model = model.double()
    pixels, mask = ref.two_images(seed=8, sizes=SIZES)
    rng = np.random.default_rng(9)
    shape = (2, SMALL["num_queries"])
    w_logits = rng.standard_normal((*shape, SMALL["num_labels"]))
    w_boxes = rng.standard_normal((*shape, 4))

    out = model(pixel_values=torch.from_numpy(pixels).double(), pixel_mask=torch.from_numpy(mask))
    loss = (out.logits * torch.from_numpy(w_logits)).sum() + (
        out.pred_boxes * torch.from_numpy(w_boxes)
    ).sum()
    loss.backward()
    theirs = {
        name: p.grad.numpy()
        for name, p in model.named_parameters()
        if name.startswith("model.backbone.") and p.grad is not None
    }

    with jax.enable_x64(True):
        ours = convert_state_dict(state_dict, config, dtype=jnp.float64)
        graphdef, params, rest = nnx.split(ours, nnx.Param, ...)
        x = jnp.asarray(pixels.transpose(0, 2, 3, 1), jnp.float64)
        m = jnp.asarray(mask, bool)

        def objective(params):
            out = nnx.merge(graphdef, params, rest)(x, m)
            return jnp.sum(out.logits * w_logits) + jnp.sum(out.pred_boxes * w_boxes)

        grads = {
            nnx_path_to_key(path): to_torch_layout(str(path[-1]), np.asarray(var[...]))
            for path, var in nnx.to_flat_state(jax.jit(jax.grad(objective))(params))
        }
    backbone = {k: v for k, v in grads.items() if k.startswith("model.backbone.")}
    unused = set(backbone) - set(theirs)
    assert unused == {
        "model.backbone.model.swin.layernorm.weight",
        "model.backbone.model.swin.layernorm.bias",
    }
    assert all(not backbone[k].any() for k in unused)
    scale = max(float(np.abs(g).max()) for g in theirs.values())
    worst = 0.0
    for name, want in theirs.items():
        np.testing.assert_allclose(backbone[name], want, rtol=0, atol=1e-9 * scale, err_msg=name)
        worst = max(worst, float(np.abs(backbone[name] - want).max()))
    print(f"swin backbone gradients: max |diff| {worst:.2e} (largest gradient {scale:.2e})")


def _param_shapes(config):
    """{name: shape} of every weight of `config`'s model (traced, not built)."""
    from flax import nnx

    from deformable_detr_jax import DeformableDetrForObjectDetection

    abstract = nnx.eval_shape(lambda: DeformableDetrForObjectDetection(config, rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    return {".".join(map(str, p)): v.shape for p, v in flat}


@pytest.mark.parametrize("kind", ["convnext", "swin"])
def test_imagenet_backbone_weights(kind, tmp_path):
    """A transformers ImageNet classifier's file through `model.backbone_weights`: our backbone's
    feature maps equal those of transformers' `ConvNextBackbone` / `SwinBackbone.from_pretrained`
    of the same folder
    (its output norms fresh in both); a ResNet's file is refused naming what is missing."""
    import torch
    from flax import nnx
    from transformers import (
        ConvNextBackbone,
        ConvNextForImageClassification,
        SwinBackbone,
        SwinForImageClassification,
    )

    from deformable_detr_jax.modeling.backbone import DeformableDetrConvEncoder
    from deformable_detr_jax.training.initialization import backbone_weights_from_resnet

    hf_cfg = ref.hf_config_with_backbone(kind, **SMALL)
    factory = ConvNextForImageClassification if kind == "convnext" else SwinForImageClassification
    classifier = factory(hf_cfg.backbone_config)
    gen = torch.Generator().manual_seed(81)
    with torch.no_grad():
        for tensor in classifier.parameters():
            tensor.add_(torch.randn(tensor.shape, generator=gen) * 0.02)
    classifier.save_pretrained(tmp_path / "imagenet")
    backbone_class = ConvNextBackbone if kind == "convnext" else SwinBackbone
    backbone = backbone_class.from_pretrained(
        tmp_path / "imagenet", out_features=hf_cfg.backbone_config.out_features
    ).eval()

    config = DeformableDetrConfig.from_hf(hf_cfg.to_dict())
    shapes = _param_shapes(config)
    loaded = backbone_weights_from_resnet(tmp_path / "imagenet" / "model.safetensors", shapes)
    prefix = "model.backbone."
    encoder = DeformableDetrConvEncoder(config, rngs=nnx.Rngs(82))
    graphdef, state = nnx.split(encoder)
    flat = nnx.to_flat_state(state)
    names = [prefix + ".".join(map(str, p)) for p, v in flat if isinstance(v, nnx.Param)]
    # every backbone weight comes from the file but the output norms, which stay fresh (ones and
    # zeros) as in transformers' backbone, and Swin's final norm, which the backbone never uses
    fresh = ("hidden_states_norms", "swin.layernorm")
    assert sorted(loaded) == sorted(n for n in names if not any(f in n for f in fresh))
    flat = [
        (p, v.replace(jnp.asarray(loaded[prefix + ".".join(map(str, p))])))
        if prefix + ".".join(map(str, p)) in loaded
        else (p, v)
        for p, v in flat
    ]
    encoder = nnx.merge(graphdef, nnx.from_flat_state(flat))
    for norm in encoder.model.hidden_states_norms.values():
        np.testing.assert_array_equal(np.asarray(norm.scale[...]), 1.0)
        np.testing.assert_array_equal(np.asarray(norm.bias[...]), 0.0)

    pixels, mask = ref.two_images(seed=9, sizes=SIZES)
    with torch.no_grad():
        want = [f.numpy() for f in backbone(torch.from_numpy(pixels)).feature_maps]
    got = nnx.jit(lambda b, x, m: b(x, m))(
        encoder, jnp.asarray(pixels.transpose(0, 2, 3, 1)), jnp.asarray(mask, bool)
    )
    assert len(got) == len(want)
    for (feature, _), expected in zip(got, want):
        np.testing.assert_allclose(
            np.asarray(feature).transpose(0, 3, 1, 2), expected, rtol=1e-4, atol=1e-4
        )

    # a transformers ResNet classifier's file
    from transformers import ResNetConfig, ResNetForImageClassification

    resnet = ResNetForImageClassification(
        ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1])
    )
    resnet.save_pretrained(tmp_path / "resnet")
    with pytest.raises(ValueError, match="does not fit the backbone"):
        backbone_weights_from_resnet(tmp_path / "resnet" / "model.safetensors", shapes)
