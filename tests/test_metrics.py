"""Memorization metrics: nL2, summaries, and the copy-detection embedding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffmem.errors import DiffmemError
from diffmem.metrics import (
    COPY_THRESHOLD,
    NL2_THRESHOLD,
    CopyDetectionConfig,
    CopyDetectionEncoder,
    augment,
    copy_detection_accuracy,
    embed,
    info_nce,
    koleo,
    load_encoder,
    load_sscd_torchscript,
    max_similarity,
    nl2,
    pairwise_l2,
    per_prompt,
    save_encoder,
    summarize,
    train_copy_detector,
)


def _images(n: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _direct_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[A, B] sqrt(mean((a - b)^2)) written out, the definition pairwise_l2 must match."""
    return (a[:, None].double() - b[None].double()).square().mean((2, 3, 4)).sqrt()


def _shapes(n: int, size: int, seed: int) -> torch.Tensor:
    """Structured images: a coloured background with coloured rectangles and discs."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    images = torch.rand(n, 3, 1, 1, generator=g).expand(n, 3, size, size)
    for _ in range(4):
        x0, y0 = torch.rand(2, n, 1, 1, generator=g) * 0.8
        w, h = 0.1 + torch.rand(2, n, 1, 1, generator=g) * 0.4
        box = ((xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h)).unsqueeze(1)
        images = torch.where(box, torch.rand(n, 3, 1, 1, generator=g), images)
        cx, cy = torch.rand(2, n, 1, 1, generator=g)
        r = 0.05 + torch.rand(n, 1, 1, generator=g) * 0.2
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2 < r**2).unsqueeze(1)
        images = torch.where(disc, torch.rand(n, 3, 1, 1, generator=g), images)
    return images.contiguous()


# nL2


def test_pairwise_l2_in_chunks_equals_the_direct_formula():
    queries, references = _images(7, seed=1), _images(23, seed=2)
    d = pairwise_l2(queries, references, batch_size=5)
    assert d.shape == (7, 23) and d.dtype == torch.float32
    torch.testing.assert_close(d.double(), _direct_l2(queries, references), atol=1e-6, rtol=0)


def test_pairwise_l2_keeps_the_digits_of_near_copies():
    references = _images(5, size=64)
    queries = references[:2] + 1e-4 * torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(
        pairwise_l2(queries, references).double(), _direct_l2(queries, references), atol=1e-7, rtol=1e-4
    )


def test_exact_copy_has_nl2_zero_and_is_memorized():
    references = _images(60)
    result = nl2(references[[3, 17]], references)
    torch.testing.assert_close(result.nl2, torch.zeros(2))
    assert result.nearest_index.tolist() == [3, 17]
    assert result.nearest_l2.tolist() == [0.0, 0.0]
    assert result.memorized.all()


def test_query_equidistant_from_all_references_has_nl2_one_over_alpha():
    # every reference is 0.5 +- 0.2 per pixel, so each lies at l2 = 0.2 from the grey query:
    # nearest / (alpha * mean of equal distances) = 1 / alpha
    signs = torch.randint(0, 2, (60, 3, 8, 8), generator=torch.Generator().manual_seed(0)) * 2 - 1
    references = 0.5 + 0.2 * signs
    query = torch.full((1, 3, 8, 8), 0.5)
    torch.testing.assert_close(nl2(query, references).nl2, torch.tensor([2.0]))
    torch.testing.assert_close(nl2(query, references, k=10, alpha=0.25).nl2, torch.tensor([4.0]))
    assert not nl2(query, references).memorized.any()


def test_nl2_follows_its_definition_and_stays_within_zero_and_one_over_alpha():
    queries, references = _images(9, seed=4), _images(70, seed=5)
    result = nl2(queries, references, k=50, alpha=0.5, batch_size=16)
    d = _direct_l2(queries, references).sort(dim=1)
    expected = d.values[:, 0] / (0.5 * d.values[:, :50].mean(1))
    torch.testing.assert_close(result.nl2.double(), expected, atol=1e-5, rtol=0)
    assert result.nearest_index.tolist() == d.indices[:, 0].tolist()
    assert ((result.nl2 >= 0) & (result.nl2 <= 2)).all()
    assert result.to_table().num_rows == 9


def test_nl2_is_differentiable_with_respect_to_the_queries():
    references = _images(60)
    queries = torch.cat([_images(2, seed=9), references[:1]]).requires_grad_()
    nl2(queries, references).nl2.sum().backward()
    assert queries.grad is not None and torch.isfinite(queries.grad).all()
    assert queries.grad[:2].abs().sum() > 0


def test_nl2_explains_bad_input():
    with pytest.raises(DiffmemError, match="at least 50 reference images; got 30"):
        nl2(_images(2), _images(30))
    with pytest.raises(DiffmemError, match="differ in"):
        nl2(_images(2, size=8), _images(60, size=16))
    with pytest.raises(DiffmemError, match=r"\[B, C, H, W\]"):
        pairwise_l2(_images(2)[0], _images(60))


# summaries


def test_summary_when_higher_is_more_similar():
    summary = summarize(torch.arange(101) / 100, COPY_THRESHOLD, higher_is_more_similar=True)
    assert summary.top5_percent == pytest.approx(0.95)
    assert summary.top1 == 1.0
    assert summary.share_memorized == pytest.approx(50 / 101)  # 0.51 .. 1.00; 0.50 is not beyond
    assert summary.count == 101
    assert summary.to_dict()["threshold"] == COPY_THRESHOLD


def test_summary_when_lower_is_more_similar():
    summary = summarize(np.arange(101) / 50, NL2_THRESHOLD, higher_is_more_similar=False)
    assert summary.top5_percent == pytest.approx(0.1)  # the 5th percentile: most similar 5% lie below
    assert summary.top1 == 0.0
    assert summary.share_memorized == pytest.approx(70 / 101)  # 0.00 .. 1.38; 1.40 is not beyond


def test_summary_explains_bad_input():
    with pytest.raises(DiffmemError, match="non-empty"):
        summarize([], 0.5, True)
    with pytest.raises(DiffmemError, match="NaN"):
        summarize([0.1, float("nan")], 0.5, True)


def test_per_prompt_labels_a_prompt_by_the_majority_of_its_generations():
    values = [0.9, 0.2, 0.7, 0.1, 0.6, 0.8]
    table = per_prompt(values, [1, 1, 1, 0, 0, 2], COPY_THRESHOLD, higher_is_more_similar=True)
    assert table.column("prompt_id").to_pylist() == [0, 1, 2]
    assert table.column("n_generations").to_pylist() == [2, 3, 1]
    assert table.column("share_memorized").to_pylist() == pytest.approx([0.5, 2 / 3, 1.0])
    assert table.column("top1").to_pylist() == pytest.approx([0.6, 0.9, 0.8])
    assert table.column("memorized").to_pylist() == [False, True, True]  # a half is not a majority


def test_per_prompt_when_lower_is_more_similar():
    table = per_prompt([1.0, 1.5, 1.2, 1.3], ["a", "a", "b", "b"], NL2_THRESHOLD, False, majority=0.25)
    assert table.column("share_memorized").to_pylist() == [0.5, 1.0]
    assert table.column("top1").to_pylist() == [1.0, 1.2]
    assert table.column("memorized").to_pylist() == [True, True]
    with pytest.raises(DiffmemError, match="one prompt id per value"):
        per_prompt([1.0, 1.5], [0], NL2_THRESHOLD, False)


# copy detection


def _encoder(seed: int = 0, **config) -> CopyDetectionEncoder:
    torch.manual_seed(seed)
    return CopyDetectionEncoder(CopyDetectionConfig(**config)).eval()


@pytest.mark.parametrize("shape", [(32, 32), (64, 64), (48, 40)])
def test_encoder_gives_unit_embeddings_at_any_size(shape):
    z = embed(_encoder(), torch.rand(5, 3, *shape), batch_size=2)
    assert z.shape == (5, 128)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(5))


def test_an_embedding_does_not_depend_on_its_batch():
    encoder, images = _encoder(), _images(6, size=32)
    with torch.no_grad():
        torch.testing.assert_close(encoder(images)[2:3], encoder(images[2:3]), atol=1e-5, rtol=0)


def test_augment_is_seeded_per_draw_and_stays_in_range():
    images = _shapes(8, 32, 0)
    a = augment(images, torch.Generator().manual_seed(1))
    assert a.shape == images.shape and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, augment(images, torch.Generator().manual_seed(1)))
    assert not torch.allclose(a, augment(images, torch.Generator().manual_seed(2)))
    assert (a - images).abs().flatten(1).amax(1).min() > 0  # every image is edited


def test_max_similarity_finds_the_most_similar_reference():
    references = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), dim=1)
    queries = F.normalize(torch.tensor([[0.2, 1.0], [-1.0, -0.1]]), dim=1)
    values, index = max_similarity(queries, references)
    assert index.tolist() == [1, 2]
    torch.testing.assert_close(values, torch.stack([queries[0, 1], -queries[1, 0]]))


def test_info_nce_is_near_zero_when_views_agree_and_others_are_orthogonal():
    e = torch.eye(4)
    assert info_nce(torch.cat([e, e]), temperature=0.01).shape == (8,)
    assert info_nce(torch.cat([e, e]), temperature=0.01).max() < 1e-6
    assert info_nce(torch.cat([e, e.roll(1, 0)]), temperature=0.01).min() > 10


def test_koleo_is_lower_for_spread_embeddings():
    spread = torch.eye(4)
    bunched = F.normalize(torch.ones(4, 4) + 0.1 * torch.eye(4), dim=1)
    assert koleo(torch.cat([spread, spread])).mean() < koleo(torch.cat([bunched, bunched])).mean()


def test_save_and_load_give_identical_embeddings(tmp_path):
    encoder, images = _encoder(widths=(8, 16), embedding_dim=32), _images(4, size=32)
    save_encoder(encoder, tmp_path / "cd")
    loaded = load_encoder(tmp_path / "cd")
    assert loaded.config == encoder.config
    assert torch.equal(embed(loaded, images), embed(encoder, images))
    with pytest.raises(DiffmemError, match="save_encoder"):
        load_encoder(tmp_path / "missing")


class _TinyDescriptor(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.linear = torch.nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.conv(x).mean((2, 3)))


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")
def test_sscd_torchscript_wrapper_resizes_normalises_and_unit_normalises(tmp_path):
    torch.manual_seed(0)
    tiny = _TinyDescriptor().eval()
    torch.jit.save(torch.jit.script(tiny), str(tmp_path / "sscd.torchscript.pt"))
    encoder = load_sscd_torchscript(tmp_path / "sscd.torchscript.pt", size=16)
    images = _images(3, size=40)
    x = F.interpolate(images, size=(16, 16), mode="bilinear", antialias=True)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    with torch.no_grad():
        expected = F.normalize(tiny((x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)), dim=1)
    torch.testing.assert_close(embed(encoder, images), expected)
    with pytest.raises(DiffmemError, match="sscd-copy-detection"):
        load_sscd_torchscript(tmp_path / "missing.pt")


def test_copy_detection_accuracy_explains_bad_input():
    with pytest.raises(DiffmemError, match="num_queries"):
        copy_detection_accuracy(_encoder(), _images(4, size=32), torch.Generator(), num_queries=5)


def _trained_and_untrained_accuracy(steps: int) -> tuple[float, float]:
    images = _shapes(256, 32, seed=0)
    trained = train_copy_detector(
        images,
        steps,
        batch_size=128,
        seed=0,
        config=CopyDetectionConfig(widths=(16, 32, 64, 128)),
        progress=False,
    )
    untrained = _encoder(0, widths=(16, 32, 64, 128))
    held_out = [
        copy_detection_accuracy(e, images, torch.Generator().manual_seed(99), 256)
        for e in (trained, untrained)
    ]
    return held_out[0], held_out[1]


def test_training_makes_edited_copies_findable():
    # measured: 0.69 after 100 steps (about 13 s on 2 cores), 0.06 untrained
    trained, untrained = _trained_and_untrained_accuracy(steps=100)
    assert untrained < 0.15
    assert trained >= 0.55


@pytest.mark.slow
def test_training_longer_finds_most_edited_copies():
    # measured: 0.95 after 300 steps (about 40 s on 2 cores)
    trained, _ = _trained_and_untrained_accuracy(steps=300)
    assert trained >= 0.85
