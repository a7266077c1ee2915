"""One attention configuration: checked once, handed down unchanged, and the only way models
take attention options."""

from __future__ import annotations

import inspect
from dataclasses import fields

import pytest
import torch

from primal_dual_attention import primal
from primal_dual_attention.attention import (
    VARIANTS,
    AttentionConfig,
    MultiHeadAttention,
    attention_config,
    fused_paths,
)
from primal_dual_attention.functional import KERNELS, attention, get_kernel
from primal_dual_attention.models.decoder import DecoderBlock, DecoderLM
from primal_dual_attention.models.encoder import EncoderBlock, TransformerEncoder
from primal_dual_attention.models.lra import LRAClassifier
from primal_dual_attention.models.timeseries import TimeSeriesTransformer
from primal_dual_attention.training.config import TrainConfig

ATTENTION_FIELDS = {f.name for f in fields(AttentionConfig)}


def _constructors():
    yield from (MultiHeadAttention, EncoderBlock, TransformerEncoder, TimeSeriesTransformer, LRAClassifier,
                DecoderBlock, DecoderLM)
    try:
        from primal_dual_attention.timm import TimmAttention
    except ImportError:
        return
    yield TimmAttention


@pytest.mark.parametrize("cls", list(_constructors()), ids=lambda c: c.__name__)
def test_no_model_constructor_has_an_attention_keyword_of_its_own(cls):
    """A new attention switch is a field of AttentionConfig, never another constructor keyword."""
    own = set(inspect.signature(cls.__init__).parameters) & ATTENTION_FIELDS
    assert not own, f"{cls.__name__} takes {sorted(own)} itself; pass an AttentionConfig instead"


@pytest.mark.parametrize("kwargs, error, match", [
    ({"variant": "nope"}, ValueError, r"variant must be one of \['softmax'"),
    ({"variant": "bn", "head_scales": (1, 2)}, ValueError, "only used by the SH variants"),
    ({"variant": "sparse"}, ValueError, "needs window=w"),
    ({"variant": "sh", "window": 2}, ValueError, "cannot be combined with the SH variant"),
    ({"variant": "sh", "head_scales": (1, 0)}, ValueError, r"head_scales\[1\] must be a positive"),
    ({"variant": "sh", "head_scales": "12"}, TypeError, "head_scales must be a sequence"),
    ({"variant": "sparse", "window": -1}, ValueError, "window must be a non-negative integer"),
    ({"variant": "sparse", "window": 2, "grid_size": (2, 2)}, ValueError, "takes no 2-D grid"),
    ({"eps": -1.0}, ValueError, "eps must be a finite number > 0"),
    ({"eps": float("inf")}, ValueError, "eps must be a finite number > 0"),
    ({"eps": 0.0}, ValueError, "eps must be a finite number > 0"),  # a constant key feature: 0 / 0
    ({"fused": "yes"}, TypeError, "fused must be True or False"),
    ({"grid_size": (4,)}, ValueError, r"grid_size must be a pair"),
    ({"num_prefix_tokens": -1}, ValueError, "num_prefix_tokens must be a non-negative"),
])
def test_each_mistake_gets_one_message(kwargs, error, match):
    with pytest.raises(error, match=match):
        AttentionConfig(**kwargs)


def test_variant_sets_kernel_and_bn_and_heads_fill_the_scales():
    config = AttentionConfig(variant="linear_bn_sh")
    assert (config.kernel, config.bn, config.head_scales) == ("linear", True, None)
    assert config.for_heads(8).head_scales == (1, 1, 2, 2, 4, 4, 8, 8)
    with pytest.raises(ValueError, match=r"one entry per head \(4\)"):
        AttentionConfig(variant="sh", head_scales=(1, 2)).for_heads(4)
    with pytest.raises(TypeError):
        AttentionConfig(variant="bn", kernel="linear")  # the variant decides the kernel
    with pytest.raises(TypeError, match=r"unknown attention option\(s\) \['heads'\]"):
        attention_config("bn", heads=3)


def test_the_config_reaches_every_layer_unchanged():
    config = AttentionConfig(variant="bn_sh", head_scales=(1, 2), eps=1e-3, fused=False)
    model = TimeSeriesTransformer(3, 2, 12, dim=8, depth=2, num_heads=2, mlp_dim=8, attention=config)
    layers = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    assert len(layers) == 2 and all(layer.config == config for layer in layers)
    with fused_paths(model, True):
        assert all(layer.config.fused for layer in layers)
    assert not any(layer.config.fused for layer in layers)


def test_module_keywords_equal_a_config():
    torch.manual_seed(0)
    a = MultiHeadAttention(8, 2, variant="bn_sh", head_scales=(1, 2))
    torch.manual_seed(0)
    b = MultiHeadAttention(8, 2, AttentionConfig(variant="bn_sh", head_scales=(1, 2)))
    x = torch.randn(2, 6, 8)
    assert a.config == b.config
    torch.testing.assert_close(a(x), b(x))


@pytest.mark.parametrize("name", ["exp", "Linear", "", None])
def test_an_unknown_kernel_is_an_error_everywhere(name):
    q = torch.randn(1, 1, 4, 2)
    for call in (lambda: get_kernel(name), lambda: attention(q, q, q, kernel=name),
                 lambda: primal.log_kernel_matrix(q[0, 0], q[0, 0], name),
                 lambda: primal.fit_svr(q[0, 0], q[0, 0], name)):
        with pytest.raises(ValueError, match=r"kernel must be one of \['softmax', 'linear'\]"):
            call()


def test_every_variant_kernel_is_in_the_table():
    assert {v.kernel for v in VARIANTS.values()} <= set(KERNELS)
    assert [k for k, kernel in KERNELS.items() if kernel.has_primal] == ["linear"]


@pytest.mark.parametrize("kwargs, match", [
    ({"variant": "sh", "head_scales": [1, 2]}, r"one entry per head \(8\)"),
    ({"variant": "bn", "head_scales": [1] * 8}, "only used by the SH variants"),
    ({"variant": "sh", "head_scales": ["a"] * 8}, r"head_scales\[0\] must be an integer"),
    ({"task": "image", "dataset": "CIFAR10", "variant": "sh", "head_scales": [1] * 8},
     r"one entry per head \(4\)"),
    ({"task": "lra-listops", "heads": 2, "variant": "sparse"}, "needs window"),
    ({"attention_options": {"packheads": True}}, r"unknown attention option\(s\) \['packheads'\]"),
    ({"attention_options": {"pack_heads": "yes"}}, "pack_heads must be True, False, 'flex' or None"),
    ({"attention_options": {"eps": -1.0}}, "eps must be a finite number > 0"),
    ({"attention_options": {"variant": "bn"}}, r"attention_options \['variant'\]: these are options"),
])
def test_train_config_reports_attention_mistakes_before_any_data(kwargs, match, tmp_path):
    missing = str(tmp_path / "no-such-data")
    with pytest.raises(ValueError, match=match):
        TrainConfig(data_dir=missing, **kwargs).validate()


def test_attention_options_read_yaml_exponents_as_numbers():
    """``--attention-options '{eps: 1e-3}'``: PyYAML reads ``1e-3`` as a string; it is the number."""
    from primal_dual_attention.cli import _mapping

    cfg = TrainConfig(variant="bn", attention_options=_mapping("{eps: 1e-3}")).validate()
    assert cfg.attention().eps == 1e-3


def test_attention_options_reach_every_layer_and_the_command_line(tmp_path, capsys):
    """Any AttentionConfig field travels through TrainConfig (a YAML mapping on the command line),
    so a new attention switch needs no training option of its own."""
    from primal_dual_attention.cli import main
    from primal_dual_attention.training.tasks import build_task

    cfg = TrainConfig(task="lra-listops", variant="bn_sh", heads=2, dim=8, mlp_dim=8, depth=1,
                      attention_options={"pack_heads": True, "eps": 1e-3}).validate()
    assert (cfg.attention().pack_heads, cfg.attention().eps, cfg.attention().variant) == (True, 1e-3, "bn_sh")
    layers = [m for m in build_task(cfg).model.modules() if isinstance(m, MultiHeadAttention)]
    assert layers and all(m.config.pack_heads and m.config.eps == 1e-3 for m in layers)
    assert main(["train", "--task", "lra-listops", "--attention-options", "{packheads: true}"]) == 2
    assert "unknown attention option(s) ['packheads']" in capsys.readouterr().err


#: a valid value other than the default for every task-specific option (dim 256 keeps 8 heads whole)
NON_DEFAULT = {"dim": 256, "depth": 2, "heads": 4, "mlp_dim": 64, "norm": "pre", "pooling": "mean",
               "val_fraction": 0.3, "max_len": 64, "max_train_samples": 10, "data_file": "text.txt",
               "model": "vit_tiny_patch16_224", "img_size": 32, "drop_path": 0.1, "auto_augment": "rand-m9",
               "random_erase": 0.25, "mixup": 0.8, "cutmix": 1.0, "repeated_aug": 3, "num_workers": 0}
TASK_DATASETS = {"uea": "JapaneseVowels", "image": "CIFAR10", "lra": "listops", "imagenet": "imagenet",
                 "lm": "imdb"}


def _task_option_cases():
    from primal_dual_attention.training.tasks import TASK_READS, TASK_SPECIFIC_OPTIONS

    for task, dataset in TASK_DATASETS.items():
        reads = TASK_READS[task](TrainConfig(task=task, dataset=dataset))
        for option in TASK_SPECIFIC_OPTIONS:
            yield pytest.param(task, dataset, option, option in reads, id=f"{task}-{option}")


def test_every_task_is_covered_and_every_option_has_a_value():
    from primal_dual_attention.training.tasks import TASK_SPECIFIC_OPTIONS, TASKS

    assert set(TASK_DATASETS) == set(TASKS)
    assert set(NON_DEFAULT) == set(TASK_SPECIFIC_OPTIONS)
    defaults = TrainConfig()
    assert all(NON_DEFAULT[name] != getattr(defaults, name) for name in NON_DEFAULT)


@pytest.mark.parametrize("task, dataset, option, read", list(_task_option_cases()))
def test_a_task_refuses_the_options_it_would_ignore(task, dataset, option, read, tmp_path):
    """Setting an option the task does not read (``--dim`` for the fixed CIFAR ViT,
    ``--val-fraction`` for LRA's own splits) is an error before data loads, not a silent no-op."""
    cfg = TrainConfig(task=task, dataset=dataset, data_dir=str(tmp_path / "none"),
                      **{option: NON_DEFAULT[option]})
    if read:
        cfg.validate()
    else:
        with pytest.raises(ValueError, match=rf"task '{task}'.* does not use {option}=.*at the default"):
            cfg.validate()


def test_lra_options_follow_the_dataset(tmp_path):
    from primal_dual_attention.data.lra import LOADERS
    from primal_dual_attention.training.tasks import LRA_DATASET_READS

    assert set(LRA_DATASET_READS) == set(LOADERS)
    TrainConfig(task="lra-image", max_len=1024).validate()  # the bundled recipe repeats the fixed length
    with pytest.raises(ValueError, match="max_len of LRA image is fixed at 1024 pixels, got 512"):
        TrainConfig(task="lra-image", max_len=512).validate()
    with pytest.raises(ValueError, match=r"on dataset 'image' does not use max_train_samples=10"):
        TrainConfig(task="lra-image", max_train_samples=10).validate()
    with pytest.raises(ValueError, match=r"LRA dataset must be one of \[.*'listops'.*\], got 'list-ops'"):
        TrainConfig(task="lra", dataset="list-ops", data_dir=str(tmp_path)).validate()


def test_a_variant_name_takes_the_fields_it_needs():
    """``MultiHeadAttention(dim, heads, "sparse", window=2)``: the name and its window make one config."""
    assert attention_config("sparse", window=2).window == 2
    assert MultiHeadAttention(16, 4, "sparse", window=2).config.window == 2
    with pytest.raises(TypeError, match=r"unknown attention option\(s\) \['windw'\]"):
        attention_config("sparse", windw=2)


def test_a_warmup_as_long_as_the_run_is_warned_and_cudagraphs_needs_inductor():
    with pytest.warns(UserWarning, match=r"the warm-up \(1000 steps\) lasts the whole run \(500 steps\)"):
        TrainConfig(task="lra", dataset="listops", steps=500, warmup_steps=1000).validate()
    with pytest.warns(UserWarning, match=r"the warm-up \(5 epochs\) lasts the whole run \(2 epochs\)"):
        TrainConfig(epochs=2, warmup_epochs=5).validate()
    with pytest.raises(ValueError, match="compile='cudagraphs' is a mode of the inductor backend, got "
                                         "compile_backend='aot_eager'"):
        TrainConfig(compile="cudagraphs", compile_backend="aot_eager").validate()


def test_cuda_under_torchrun_is_each_ranks_own_gpu(monkeypatch):
    from primal_dual_attention.training.distributed import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("cuda", local_rank=1, world_size=2) == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)  # one process: the GPU asked for
    with pytest.raises(ValueError, match="would put every rank on one GPU"):
        resolve_device("cuda:0", local_rank=1, world_size=2)
