"""Long Range Arena: generators, readers, the encoder and a few training steps per task."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch

from primal_dual_attention.attention import AttentionConfig
from primal_dual_attention.data import lra
from primal_dual_attention.models.lra import LRAClassifier


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PDA_CACHE_DIR", str(tmp_path / "cache"))


def test_listops_generator_is_seeded_bounded_distinct_and_labelled_correctly():
    sequences, labels = lra.generate_listops(40, seed=3)
    again, labels_again = lra.generate_listops(40, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(sequences, again, strict=True))
    assert np.array_equal(labels, labels_again)
    assert all(500 < len(s) < 2000 for s in sequences)
    assert len({s.tobytes() for s in sequences}) == 40
    assert all(lra.evaluate_listops(s) == label for s, label in zip(sequences, labels, strict=True))
    assert set(np.unique(labels)) <= set(range(10))
    other, _ = lra.generate_listops(5, seed=4)
    assert not np.array_equal(other[0], sequences[0])


@pytest.mark.parametrize("text, value", [
    ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),
    ("[MED 1 5 [SM 9 9 ] 3 ]", 4),     # median of 1, 5, 8, 3 -> int(4.0)
    ("[MED 1 2 ]", 1),                 # median 1.5 -> int() truncates
    ("( ( [SM 7 ) 8 ) ]", 5),           # LRA's parentheses are layout only
    ("[MIN [MAX 1 2 ] [MED 6 2 4 ] ]", 2),
])
def test_independent_evaluator_and_tokenizer(text, value):
    assert lra.evaluate_listops(lra.tokenize_listops(text)) == value


def test_generated_listops_below_lra_length_are_whole_expressions(tmp_path, monkeypatch):
    """With max_len under LRA's 2000 the generator draws shorter expressions instead of cutting
    them (a cut one keeps the whole expression's label), closing brackets included: at 64 tokens
    about 1.5 % of the trees it returns end past max_len, and version 1 (LRA's length) keeps them."""
    monkeypatch.setenv("PDA_CACHE_DIR", str(tmp_path))
    data = lra.load_listops(sizes=(1500, 2, 2), max_len=64)
    for split in (data.train, data.val, data.test):
        for index in range(len(split)):
            tokens, label = split[index]
            assert 16 < len(tokens) < 64 and lra.evaluate_listops(tokens.numpy()) == label
    kept, _ = lra.generate_listops(1500, seed=0, min_len=16, max_len=64, bounded=False)
    assert max(len(s) for s in kept) >= 64


def test_listops_tsv_reader(tmp_path):
    path = tmp_path / "basic_train.tsv"
    path.write_text("Source\tTarget\n( ( [MAX 2 ) 9 ) ]\t9\n[SM 3 4 ]\t7\n")
    split = lra.read_listops_tsv(path, max_len=16)
    assert len(split) == 2 and split.lengths.tolist() == [4, 4] and split.labels.tolist() == [9, 7]
    tokens, label = split[0]
    assert lra.evaluate_listops(tokens.numpy()) == label == 9
    with pytest.raises(ValueError, match="2 expressions are longer than max_len=3"):
        lra.read_listops_tsv(path, max_len=3)  # a cut expression would keep the whole one's label
    bad = tmp_path / "bad.tsv"
    bad.write_text("Source\tTarget\n[FOO 1 ]\t1\n")
    with pytest.raises(ValueError, match="unknown ListOps token"):
        lra.read_listops_tsv(bad)


def test_token_split_batches_trim_and_mask():
    tokens = np.array([[1, 2, 3, 0, 0], [4, 5, 0, 0, 0], [6, 0, 0, 0, 0]], dtype=np.uint8)
    split = lra.TokenSplit(tokens, np.array([3, 2, 1]), np.array([0, 1, 0]))
    x, mask, y = next(split.batches(2))
    assert x.shape == (2, 3) and mask.tolist() == [[False, False, False], [False, False, True]]
    assert len(split) == 3 and isinstance(split, torch.utils.data.Dataset)


def write_imdb_zip(path, per_class: int = 3) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for split in ("train", "test"):
            for label in ("neg", "pos"):
                for i in range(per_class):
                    archive.writestr(f"aclImdb/{split}/{label}/{i}_7.txt", f"{label} review {i} é " * (i + 1))
        archive.writestr("aclImdb/train/unsup/0_0.txt", "unlabelled")


def test_imdb_zip_reader_bytes_labels_and_truncation(tmp_path):
    write_imdb_zip(tmp_path / "imdb.zip")
    split = lra.read_imdb_zip(tmp_path / "imdb.zip", "train", max_len=20)
    assert len(split) == 6 and sorted(split.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    text = "neg review 0 é ".encode()
    first = split.tokens[0, : split.lengths[0]].numpy()
    assert np.array_equal(first, np.frombuffer(text, np.uint8).astype(int) + 1)  # bytes, not chars
    assert split.lengths.max() == 20


def test_pathfinder_generator_seeded_balanced_and_drawn():
    images, labels = lra.generate_pathfinder(12, seed=1)
    again, _ = lra.generate_pathfinder(12, seed=1)
    assert images.shape == (12, 1024) and images.dtype == np.uint8 and np.array_equal(images, again)
    assert labels.sum() == 6
    ink = (images > 0).mean(1)
    assert ((ink > 0.03) & (ink < 0.5)).all()


def test_pathfinder_markers_are_joined_exactly_when_the_label_says_so():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    style = lra.PathfinderStyle(dash=1.0)  # undashed, so contours are 8-connected pixel paths
    eight = np.ones((3, 3), dtype=bool)
    for connected in (True, False) * 5:
        image = lra.pathfinder_image(rng, connected, style)
        labels, count = ndimage.label(image > 0, structure=eight)
        assert count == 2 + style.distractors  # contours never touch
        # the two markers are the blobs of >= 9 pixels whose 3x3 neighbourhood is all ink
        solid = ndimage.binary_erosion(image > 0, structure=eight)
        marked = set(np.unique(labels[solid]))
        assert len(marked) == (1 if connected else 2)


def test_grayscale_tokens_follow_luma():
    images = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    images[0, 0] = 255
    assert lra.grayscale_tokens(images).tolist() == [[76, 76, 76, 76]]


def test_aan_reader_and_dual_encoder(tmp_path):
    path = tmp_path / "new_aan_pairs.train.tsv"
    path.write_text("1\ta\tb\tfirst doc\tsecond\n0.0\tc\td\tx\tyy\n")
    split = lra.read_aan_tsv(path, max_len=8)
    x, mask, y = next(split.batches(2))
    assert x.shape == (2, 16) and y.tolist() == [1, 0]
    assert mask[1].tolist() == [False] + [True] * 7 + [False, False] + [True] * 6
    model = LRAClassifier(257, 2, 8, dual=True, attention=AttentionConfig(variant="bn"))
    assert model(x, mask).shape == (2, 2)
    (tmp_path / "bad.tsv").write_text("1\tonly\tthree\n")
    with pytest.raises(ValueError, match="5 tab-separated columns"):
        lra.read_aan_tsv(tmp_path / "bad.tsv")


def test_an_empty_document_is_all_padding_in_either_tower(tmp_path):
    """An empty first document kept one padded position as valid (its tower gave a non-zero
    vector where an empty second one gave 0); both are now all padding."""
    path = tmp_path / "pairs.tsv"
    path.write_text("1\ta\tb\t\tsecond\n0\tc\td\tfirst\t\n")
    x, mask, _ = next(lra.read_aan_tsv(path, max_len=8).batches(2))
    assert mask[0, :8].all() and mask[1, 8:].all()
    model = LRAClassifier(257, 2, 8, dual=True).eval()
    u, v = model.encode(x[:1, :8], mask[:1, :8]), model.encode(x[1:, 8:], mask[1:, 8:])
    assert u.abs().max() == v.abs().max() == 0


@pytest.mark.parametrize("reader, text, match", [
    ("listops", "Source\tTarget\n[MAX 2 ]\t12\n", "label '12' is not a class 0..9"),
    ("aan", "2\ta\tb\tx\ty\n", "label '2' is not a class 0..1"),
    ("aan", "0.5\ta\tb\tx\ty\n", "label '0.5' is not a class 0..1"),
])
def test_tsv_labels_outside_the_classes_are_refused(tmp_path, reader, text, match):
    path = tmp_path / "rows.tsv"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        lra.read_listops_tsv(path) if reader == "listops" else lra.read_aan_tsv(path)


def test_lra_models_name_bad_token_shapes():
    dual = LRAClassifier(257, 2, 8, dual=True)
    with pytest.raises(ValueError, match=r"\(B, 2 x T\) tokens.*got shape \(2, 7\)"):
        dual(torch.ones(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match=r"must have shape \(B, N\) = \(2, 8\), got \(2, 6\)"):
        dual(torch.ones(2, 8, dtype=torch.long), torch.zeros(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"tokens must be a \(B, T\) tensor of token ids, got \(5,\)"):
        LRAClassifier(257, 2, 8)(torch.ones(5, dtype=torch.long))


def test_aan_reader_keeps_quotes_as_text(tmp_path):
    """LRA's files quote nothing: a text that starts with '"' is one field, not the start of a
    quoted run over the next tabs and rows."""
    path = tmp_path / "pairs.tsv"
    path.write_text('1\ta\tb\t"open quote\tsecond\n0\tc\td\t"Deep" nets\tx\n')
    split = lra.read_aan_tsv(path, max_len=16)
    assert len(split) == 2 and split.labels.tolist() == [1, 0]
    first = bytes((split.tokens[1, : split.lengths[1]] - 1).tolist())
    assert first == b'"Deep" nets'


def test_retrieval_without_data_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="new_aan_pairs"):
        lra.load_retrieval(None)


@pytest.mark.parametrize("variant", ["softmax", "linear", "bn", "sh", "bn_sh"])
def test_padding_never_changes_the_lra_prediction(variant):
    torch.manual_seed(0)
    model = LRAClassifier(16, 10, 64, attention=AttentionConfig(variant=variant), dropout=0.0).eval()
    tokens = torch.randint(1, 16, (2, 40))
    padded = torch.cat([tokens, torch.zeros(2, 24, dtype=torch.long)], 1)
    mask = torch.arange(64) >= 40
    torch.testing.assert_close(model(padded, mask.expand(2, 64)), model(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("task, extra", [
    ("lra-listops", ["--max-len", "256"]),
    ("lra-text", ["--max-len", "64"]),
    ("lra-pathfinder", []),
])
def test_a_few_steps_reduce_the_training_loss(tmp_path, monkeypatch, task, extra):
    from primal_dual_attention.cli import main

    if task == "lra-text":
        write_imdb_zip(tmp_path / "imdb.zip", per_class=8)
        extra = extra + ["--data-dir", str(tmp_path / "imdb.zip")]
    monkeypatch.setattr("primal_dual_attention.training.tasks.LRA_GENERATED_SIZES",
                        {"listops": (64, 16, 16), "pathfinder": (64, 16, 16)})
    args = ["train", "--task", task, "--variant", "bn_sh", "--steps", "24", "--warmup-steps", "2",
            "--batch-size", "8", "--epochs", "3", "--lr", "0.003", "--dropout", "0", "--no-progress",
            "--max-eval-samples", "16", "--threads", "1", "--depth", "1", "--mlp-dim", "64",
            "--out-dir", str(tmp_path / "runs"), *extra]
    assert main(args) == 0
    dataset = task.removeprefix("lra-")
    log = (tmp_path / "runs" / "lra" / dataset / "clean" / "bn_sh" / "seed0" / "log.csv").read_text()
    losses = [float(line.split(",")[2]) for line in log.splitlines()[1:]]
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_budget_scales_steps_and_the_alias_selects_the_dataset():
    from primal_dual_attention.training.config import TrainConfig, bundled_config

    cfg = bundled_config("lra-listops", "JapaneseVowels", TrainConfig(task="lra-listops", budget=0.1))
    cfg.validate()
    assert (cfg.task, cfg.dataset, cfg.steps, cfg.batch_size) == ("lra", "listops", 5000, 32)
    assert cfg.total_steps() == 500
    with pytest.raises(ValueError, match="budget must be a finite number > 0"):
        TrainConfig(budget=0).validate()


def test_max_train_samples_cuts_listops_read_from_lra_files(tmp_path):
    from primal_dual_attention.training.config import TrainConfig
    from primal_dual_attention.training.tasks import build_task

    for split in ("train", "val", "test"):
        rows = "".join(f"[MAX {i % 10} 3 ]\t{max(i % 10, 3)}\n" for i in range(10))
        (tmp_path / f"basic_{split}.tsv").write_text("Source\tTarget\n" + rows)
    cfg = TrainConfig(task="lra", dataset="listops", data_dir=str(tmp_path), max_train_samples=3, max_len=8,
                      dim=16, depth=1, heads=2, mlp_dim=16).validate()
    task = build_task(cfg)
    assert len(task.train) == 3 and task.train.labels.tolist() == [3, 3, 3]
    assert len(task.test) == 10


@pytest.mark.parametrize("loader, state", [  # a CIFAR-10 folder is read as torchvision's layout
    ("lra_text", "folder"), ("lra_text", "missing"), ("lm_text", "folder"), ("lm_text", "missing"),
    ("cifar", "missing")])
def test_a_wrong_data_dir_is_named_with_what_was_expected(tmp_path, loader, state):
    from primal_dual_attention.data.images import load_cifar10
    from primal_dual_attention.data.text import load_imdb_text

    path = tmp_path if state == "folder" else tmp_path / "nowhere.zip"
    loaders = {"lra_text": lra.load_text, "lm_text": lambda p: load_imdb_text(p, 16), "cifar": load_cifar10}
    load = loaders[loader]
    expected = "is a folder" if state == "folder" else "does not exist"
    with pytest.raises(FileNotFoundError, match=f"data_dir='{path}' {expected}; expected the .* zip"):
        load(str(path))


def test_generated_listops_need_room_for_distinct_expressions():
    """Below 16 tokens too few distinct expressions fit: refused at once, not searched forever."""
    from primal_dual_attention.training.config import TrainConfig

    with pytest.raises(ValueError, match="max_len=5 is too short for generated ListOps"):
        lra.generate_listops(3, 0, min_len=1, max_len=5)
    with pytest.raises(ValueError, match="max_len=8 is too short"):
        TrainConfig(task="lra", dataset="listops", max_len=8).validate()
    sequences, _ = lra.generate_listops(50, 0, min_len=4, max_len=16)
    assert all(4 < len(s) < 16 for s in sequences)
