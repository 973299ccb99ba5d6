"""Both data paths behind one interface: the trainer's set-up and evaluation use
each through ``DataSource``/``TrainBatches`` alone (their layering in src/:
tests/test_layout.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from resnet_exp.data import DataSource, Split, TrainBatches, load_dataset
from resnet_exp.data.sources import InMemorySource
from resnet_exp.data.stream import stream_eval_batches
from resnet_exp.run.runtime import autocast
from resnet_exp.train.context import resolve
from resnet_exp.train.evaluation import evaluate_split
from resnet_exp.train.setup import build_setup

from conftest import TINY, TINY_IMAGENET, compose_config, write_image_folder

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities")


@pytest.fixture(scope="module")
def streamed_overrides(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = write_image_folder(tmp_path_factory.mktemp("streamed"), {"train": 4, "val": 3})
    return [*TINY_IMAGENET, f"data.root={root}"]


def _direct_batches(s, cfg, split):
    """The source's own batches, called without the interface."""
    cpu, channels_last = torch.device("cpu"), s.ctx.channels_last
    if isinstance(s.data, InMemorySource):
        from resnet_exp.data import Normalize, eval_batches

        norm = Normalize(s.data.mean, s.data.std, cpu)
        for x, y in eval_batches(split, cfg.data.eval_batch_size, norm, cpu, channels_last):
            yield {"": x}, y
    else:
        yield from stream_eval_batches(split, cfg.data, cpu, channels_last)


@pytest.mark.parametrize("kind", ["in_memory", "streamed"])
def test_each_source_trains_and_evaluates_through_the_interface(
    kind: str, streamed_overrides: list[str]
) -> None:
    overrides = TINY if kind == "in_memory" else streamed_overrides
    # fp32: the comparison below is of images seen, not of a CPU's bf16 rounding.
    cfg = compose_config([*overrides, "trainer.precision=fp32"])
    s = build_setup(cfg, resolve(cfg, Path("unused")))  # no run folder: nothing is written
    assert isinstance(s.data, DataSource) and isinstance(s.loader, TrainBatches)
    assert type(s.data).__name__ == ("InMemorySource" if kind == "in_memory" else "StreamedSource")
    x, y = s.loader.next()
    size = 16 if kind == "in_memory" else 32
    assert x.shape == (cfg.data.batch_size, 3, size, size) and y.shape == (x.shape[0],)
    assert s.loader.report() == {}  # every image was read

    result, counts = evaluate_split(
        s.model, s.data, s.data.eval_split, s.ctx.placement, s.precision, per_class=True
    )
    names = s.data.eval_names()
    assert names == ([""] if kind == "in_memory" else ["", "_48"])
    assert set(result) == {f"{k}{n}" for k in ("loss", "error", "top5_error") for n in names}
    # The evaluation saw the same images as the source's own batches, once each.
    assert counts is not None and int(counts[1].sum()) == len(s.data.eval_split)
    s.model.eval()
    logits, labels = [], []
    with torch.inference_mode(), autocast(s.device, s.precision):  # as the evaluation runs
        for views, y in _direct_batches(s, cfg, s.data.eval_split):
            logits.append(s.model(views[""]))
            labels.append(y)
    logits_t, labels_t = torch.cat(logits), torch.cat(labels)
    expected = 100.0 * (logits_t.argmax(1) != labels_t).float().mean().item()
    assert result["error"] == pytest.approx(expected)
    loss = F.cross_entropy(logits_t, labels_t).item()
    assert result["loss"] == pytest.approx(loss, rel=1e-5)


def test_the_interface_is_not_met_by_a_bare_split() -> None:
    data = load_dataset(compose_config(TINY).data)
    assert isinstance(data, DataSource)
    assert not isinstance(data.train, DataSource) and not isinstance(object(), TrainBatches)

    class NoEval(InMemorySource):
        eval_batches = None  # type: ignore[assignment]

    assert isinstance(data.train, Split)
    assert not isinstance(NoEval(**vars(data)), DataSource)
