"""ImageNet: the Table 5 nets, the streamed data path, and both through the command line.

No ImageNet here: a session fixture writes a small image folder of JPEGs
(and one PNG) of varied sizes and aspect ratios; the nets are checked on
the meta device against the published parameter counts.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.io import ImageReadMode

from resnet_exp import build_model, count_params
from resnet_exp.config import BadImage, DataConfig, Decode, Interpolation
from resnet_exp.data.augment import (
    GRAY,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PCA_EIGVAL,
    PCA_EIGVEC,
    ColourNormalize,
    centre_crops,
    image_rng,
    random_sized_crop,
    sample_train,
)
from resnet_exp.data.imagenet import load_streamed
from resnet_exp.data.stream import StreamLoader, shard_indices, stream_eval_batches
from resnet_exp.errors import UserError
from resnet_exp.models import ResNet
from resnet_exp.models.imagenet import IMAGENET_DEPTHS
from resnet_exp.models.shortcuts import Projection

from conftest import (
    BLOCKS,
    IMAGENET_CLASSES,
    TINY_IMAGENET,
    cifar10_root,
    params_of,
    read_checkpoint,
    read_summary,
    run_main,
    torchrun,
    write_image_folder,
)

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities")


@pytest.fixture(scope="session")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes, 8 training and 3 test images each."""
    return write_image_folder(tmp_path_factory.mktemp("imagenet"), {"train": 8, "val": 3})


def data_cfg(root: Path, **kw) -> DataConfig:
    base = dict(
        name="imagenet", root=str(root), image_size=32, eval_crops=[32, 48], workers=0, cache_dir=""
    )
    return DataConfig(**{**base, **kw})  # type: ignore[arg-type]


# --- nets --------------------------------------------------------------------

# torchvision's counts of the same nets (the papers round them: 11.7M ... 60.2M);
# ResNet-200 is fb.resnet.torch's (3, 24, 36, 3), 64.7M.
PUBLISHED_M = {18: 11.7, 34: 21.8, 50: 25.6, 101: 44.5, 152: 60.2}
EXACT_ORIGINAL = {
    18: 11_689_512,
    34: 21_797_672,
    50: 25_557_032,
    101: 44_549_160,
    152: 60_192_808,
    200: 64_673_832,
}


# ImageNet's classifier (1000 classes), as the published counts have it; on the meta device.
IMAGENET = {"num_classes": 1000, "family": "imagenet", "on": "meta"}


@pytest.mark.parametrize("depth", list(IMAGENET_DEPTHS))
def test_imagenet_parameter_counts(depth: int) -> None:
    original, preact = (
        params_of("original", depth, **IMAGENET),
        params_of("preact", depth, **IMAGENET),
    )
    assert original == EXACT_ORIGINAL[depth]  # = torchvision's resnetN
    if depth in PUBLISHED_M:
        assert abs(original / 1e6 - PUBLISHED_M[depth]) <= 0.01 * PUBLISHED_M[depth]
    # Pre-act: the projections lose their BN (as in preresnet.lua); the first
    # unit's skipped BN and the final BN-ReLU's add one back.
    assert abs(preact - original) / original < 0.001


def test_every_ordering_has_about_the_same_parameters() -> None:
    original = params_of("original", 50, **IMAGENET)
    for block in BLOCKS[1:]:
        assert abs(params_of(block, 50, **IMAGENET) - original) / original < 0.001, block


def test_bad_imagenet_depth_is_one_line_listing_depths() -> None:
    with pytest.raises(UserError) as e:
        build_model("preact", 110, family="imagenet")
    msg = str(e.value)
    assert "\n" not in msg
    assert "depth=110" in msg and "18, 34, 50, 101, 152, 200" in msg
    with pytest.raises(UserError, match="bottleneck units"):
        build_model("preact", 50, unit="basic", family="imagenet")


def test_preact_net_follows_preresnet_lua() -> None:
    net = build_model("preact", 50, 10, width=8, family="imagenet")
    assert isinstance(net, ResNet)
    stem = [type(m) for m in net.stem]
    assert stem == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d]  # keeps its BN-ReLU
    assert net.stem[0].kernel_size == (7, 7) and net.stem[0].stride == (2, 2)
    first, second = net.units[0], net.units[1]
    assert len(first.pre) == 0 and len(second.pre) == 2  # 'no_preact' first unit
    assert [type(m) for m in net.head] == [nn.BatchNorm2d, nn.ReLU]  # final BN-ReLU
    # projection where the shape changes (no BN on a pre-act projection)
    down = net.units[3]  # first unit of stage 2 (3 units in stage 1)
    assert isinstance(down.shortcut, Projection) and len(down.shortcut) == 1
    convs = [m for m in down.branch if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size[0] for c in convs] == [1, 3, 1]
    assert [c.stride[0] for c in convs] == [2, 1, 1]  # the authors' models: on the first 1x1
    assert convs[-1].out_channels == 8 * 2 * 4
    fb = build_model("preact", 50, 10, width=8, family="imagenet", stride_at="conv3x3")
    fb_convs = [m for m in fb.units[3].branch if isinstance(m, nn.Conv2d)]
    assert [c.stride[0] for c in fb_convs] == [1, 2, 1]  # fb.resnet.torch: on the 3x3


@pytest.mark.parametrize("block", BLOCKS)
def test_every_ordering_builds_and_runs_at_two_crops(block: str) -> None:
    torch.manual_seed(0)
    net = build_model(block, 18, 5, width=4, family="imagenet").eval()
    original = build_model("original", 18, 5, width=4, family="imagenet")
    assert isinstance(original.head, nn.Identity) and len(original.units) == 8
    for size in (64, 96):  # fully convolutional: any test crop
        assert net(torch.randn(2, 3, size, size)).shape == (2, 5)


def test_imagenet_width_defaults_to_64() -> None:
    with torch.device("meta"):
        net = build_model("original", 18, 1000, family="imagenet")
    assert net.stem[0].out_channels == 64 and net.fc.in_features == 512


# --- augmentation --------------------------------------------------------------


def test_random_sized_crop_within_bounds() -> None:
    for i in range(300):
        h, w = (int(v) for v in np.random.default_rng(i).integers(20, 500, 2))
        c = random_sized_crop(image_rng(0, 0, i), h, w)
        assert c.top >= 0 and c.top + c.height <= h and c.left >= 0 and c.left + c.width <= w
        area = c.height * c.width / (h * w)
        ratio = c.width / c.height
        fallback = c.height == c.width == min(h, w)
        assert fallback or (0.07 < area <= 1.0 and 0.7 < min(ratio, 1 / ratio) <= 1.0)
    # a very thin image mostly falls back to its centre square
    assert random_sized_crop(image_rng(0, 0, 0), 10, 400).height <= 10


def test_train_batch_shapes_and_ranges(folder: Path) -> None:
    data = load_streamed(data_cfg(folder))
    loader = StreamLoader(data.train, data_cfg(folder), 6, torch.device("cpu"), seed=0)
    x, y = loader.next()
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert y.dtype == torch.int64 and set(y.tolist()) <= {0, 1, 2}
    # normalised [0, 1] pixels, jittered by at most 1.4^3 and shifted by the lighting
    lo = (0 - max(IMAGENET_MEAN)) / min(IMAGENET_STD) - 1
    hi = (1.4**3 - min(IMAGENET_MEAN)) / min(IMAGENET_STD) + 1
    assert lo < x.min() and x.max() < hi
    assert x.std() > 0.3  # not constant


def reference_colour(img: torch.Tensor, col: np.ndarray) -> torch.Tensor:
    """fb.resnet.torch's ColorJitter (random order), Lighting and ColorNormalize, op by op."""
    x = img.double() / 255
    alpha, order, light = col[0:3], col[3:6].astype(int), col[6:9]
    g = torch.tensor(GRAY, dtype=torch.float64).view(3, 1, 1)
    for op in order:
        a = alpha[op]
        gray = (x * g).sum(0, keepdim=True)
        if op == 0:
            x = x * a  # brightness: blend with black
        elif op == 1:
            x = x * a + (1 - a) * gray.mean()  # contrast: with the mean grey
        else:
            x = x * a + (1 - a) * gray  # saturation: with the greyscale image
    rgb = np.array(PCA_EIGVEC) @ (light * np.array(PCA_EIGVAL))
    x = x + torch.tensor(rgb).view(3, 1, 1)
    mean, std = (
        torch.tensor(v, dtype=torch.float64).view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD)
    )
    return (x - mean) / std


def test_colour_chain_matches_fb_resnet_torch_op_by_op() -> None:
    x = torch.randint(0, 256, (16, 3, 12, 20), dtype=torch.uint8)
    cols = np.stack([sample_train(image_rng(1, 0, i), 50, 50).colour for i in range(16)])
    assert {tuple(c[3:6]) for c in cols} > {(0.0, 1.0, 2.0)}  # several orders drawn
    out = ColourNormalize()(x, torch.from_numpy(cols).float())
    ref = torch.stack([reference_colour(x[i], cols[i]) for i in range(16)])
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-5)
    plain = ColourNormalize()(x)  # evaluation: normalisation only
    mean, std = (
        torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
        torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
    )
    torch.testing.assert_close(plain, (x / 255 - mean) / std)


@pytest.mark.parametrize("mode", ["bicubic", "bilinear", None])
def test_eval_crops_224_and_320(mode: str | None) -> None:
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    img = torch.randint(0, 256, (3, 256, 300), dtype=torch.uint8)
    v224, v320 = centre_crops(img, [224, 320], 0.875, *([mode] if mode else []))
    assert v224.shape == (3, 224, 224) and v320.shape == (3, 320, 320)
    # shorter side already 256: the 224 view is the exact centre of the image
    assert torch.equal(v224, img[:, 16:240, 38:262])
    # 320 comes from the image resized to 366 on its shorter side (320 / 0.875),
    # bicubic by default (fb.resnet.torch's transforms.lua Scale)
    interp = InterpolationMode(mode or "bicubic")
    big = TF.resize(img, [366], interpolation=interp, antialias=True)
    assert big.shape[-2:] == (366, 428)
    assert torch.equal(v320, TF.center_crop(big, [320, 320]))


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_training_crops_use_data_interpolation(folder: Path, mode: str) -> None:
    """A training batch, rebuilt by hand from its images with torchvision's resize."""
    from torchvision.io import decode_image
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    assert DataConfig().interpolation is Interpolation.bicubic  # the default
    cfg = data_cfg(folder, interpolation=Interpolation(mode))
    data = load_streamed(cfg)
    loader = StreamLoader(data.train, cfg, 4, torch.device("cpu"), seed=5, channels_last=False)
    x, _ = loader.next()
    crops, colours = [], []
    for i in loader.batches.indices(0, 0):
        img = decode_image(data.train.path(int(i)), mode=ImageReadMode.RGB)
        p = sample_train(image_rng(5, 0, int(i)), *img.shape[-2:])
        c = p.crop
        out = TF.resized_crop(
            img, c.top, c.left, c.height, c.width, [32, 32], InterpolationMode(mode), antialias=True
        )
        crops.append(out.flip(-1) if p.flip else out)
        colours.append(p.colour)
    ref = ColourNormalize()(torch.stack(crops), torch.from_numpy(np.stack(colours)).float())
    torch.testing.assert_close(x, ref, atol=1e-5, rtol=0)


def test_eval_batches_cover_the_test_set_once_per_crop(folder: Path) -> None:
    cfg = data_cfg(folder, eval_batch_size=4)
    data = load_streamed(cfg)
    seen = []
    for views, y in stream_eval_batches(data.test, cfg, torch.device("cpu")):
        assert set(views) == {"", "_48"}
        assert views[""].shape[1:] == (3, 32, 32) and views["_48"].shape[1:] == (3, 48, 48)
        seen += y.tolist()
    assert sorted(seen) == sorted(data.test.labels.tolist()) and len(seen) == 9


# --- order, shards, resume -------------------------------------------------------


def test_rank_shards_are_disjoint_and_cover_the_epoch() -> None:
    n, world = 103, 4
    for epoch in (0, 1):
        shards = [shard_indices(5, epoch, n, r, world) for r in range(world)]
        union = np.concatenate(shards)
        assert len(union) == len(set(union.tolist())) == n
    assert not np.array_equal(shard_indices(5, 0, n, 0, world), shard_indices(5, 1, n, 0, world))


def test_loader_ranks_read_disjoint_files(folder: Path) -> None:
    cfg = data_cfg(folder)
    data = load_streamed(cfg)
    ranks = [
        StreamLoader(data.train, cfg, 4, torch.device("cpu"), 0, rank=r, world=3) for r in range(3)
    ]
    assert ranks[0].steps_per_epoch == 2  # 24 images: 8 per rank, 2 batches of 4
    files = [{int(i) for p in range(2) for i in loader.batches.indices(0, p)} for loader in ranks]
    assert sum(map(len, files)) == 24 and len(set.union(*files)) == 24


def take(loader: StreamLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next() for _ in range(n)]


def test_resume_restores_the_stream_position_exactly(folder: Path) -> None:
    cfg = data_cfg(folder)
    data = load_streamed(cfg)
    cpu = torch.device("cpu")
    full = take(StreamLoader(data.train, cfg, 5, cpu, seed=3), 7)  # 4 per epoch: crosses one
    first = StreamLoader(data.train, cfg, 5, cpu, seed=3)
    take(first, 4)
    state = first.state_dict()
    assert (state["epoch"], state["pos"]) == (0, 4)
    again = StreamLoader(data.train, cfg, 5, cpu, seed=3)
    again.load_state_dict(state)
    for (x, y), (x2, y2) in zip(full[4:], take(again, 3)):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(full[0][0], full[4][0])  # epochs differ


@pytest.mark.parametrize(
    "variant",
    [{"workers": 2}, {"decode": Decode.device}, {"decode": Decode.device, "workers": 2}],
)
def test_batches_do_not_depend_on_workers_or_decoder(folder: Path, variant: dict) -> None:
    """Two worker processes, or the GPU path's decoding (batched decode_jpeg, then
    crops on the device; here the CPU), or both (the workers read, the device decodes),
    give the same batches as one process."""
    cpu = torch.device("cpu")
    data = load_streamed(data_cfg(folder))
    base = take(StreamLoader(data.train, data_cfg(folder), 6, cpu, 0), 5)
    other = take(StreamLoader(data.train, data_cfg(folder, **variant), 6, cpu, 0), 5)
    for (x, y), (x2, y2) in zip(base, other):
        assert torch.equal(x, x2)  # bit for bit, as docs/imagenet.md says
        assert torch.equal(y, y2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_decode_path_matches_the_cpu_path(folder: Path) -> None:
    """nvjpeg decode, crops and colour on the GPU: the CPU path's batches, up to the
    decoders' rounding."""
    data = load_streamed(data_cfg(folder))
    gpu = take(StreamLoader(data.train, data_cfg(folder), 6, torch.device("cuda"), 0), 3)
    cpu = take(StreamLoader(data.train, data_cfg(folder), 6, torch.device("cpu"), 0), 3)
    for (x, y), (xc, yc) in zip(gpu, cpu):
        assert x.is_cuda and x.shape == xc.shape and torch.equal(y.cpu(), yc)
        assert (x.cpu() - xc).abs().mean() < 0.05
    views, y = next(stream_eval_batches(data.test, data_cfg(folder), torch.device("cuda")))
    assert views["_48"].is_cuda and views["_48"].shape[1:] == (3, 48, 48)


# --- bad inputs ------------------------------------------------------------------


def test_missing_val_folder(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"train": 1})
    with pytest.raises(UserError, match=r"has no val/ folder; expected train/<class>/\*"):
        load_streamed(data_cfg(tmp_path))


def test_class_folders_differ_between_splits(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"train": 1, "val": 1})
    shutil.rmtree(tmp_path / "val" / IMAGENET_CLASSES[1])
    with pytest.raises(
        UserError, match=f"different class folders .*in only one: {IMAGENET_CLASSES[1]}"
    ):
        load_streamed(data_cfg(tmp_path))


def test_unreadable_image_fails_by_default_and_is_counted_when_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_image_folder(tmp_path, {"train": 2, "val": 1})
    bad = tmp_path / "train" / IMAGENET_CLASSES[2] / "broken.JPEG"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    cfg = data_cfg(tmp_path)
    data = load_streamed(cfg)
    assert len(data.train) == 7
    with pytest.raises(
        UserError, match=r"cannot decode image .*broken\.JPEG.*data\.bad_images=skip"
    ):
        take(StreamLoader(data.train, cfg, 7, torch.device("cpu"), 0), 1)
    for decode in (Decode.workers, Decode.device):
        skip = data_cfg(tmp_path, bad_images=BadImage.skip, decode=decode)
        loader = StreamLoader(data.train, skip, 7, torch.device("cpu"), 0)
        x, y = loader.next()
        assert x.shape[0] == 7 and torch.isfinite(x).all()
        assert loader.report() == {"skipped_images": 1}
        assert "broken.JPEG" in caplog.text


# --- the command line --------------------------------------------------------------


def cli_args(root: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*TINY_IMAGENET, f"data.root={root}", f"hydra.run.dir={run_dir}", *extra]


def test_train_and_evaluate_through_the_command_line(folder: Path, tmp_path: Path) -> None:
    run_main(cli_args(folder, tmp_path / "run", "trainer.max_steps=2"), cwd=tmp_path)
    s = read_summary(tmp_path / "run")
    assert s["status"] == "completed" and s["family"] == "imagenet" and s["unit"] == "basic"
    assert s["params"] == count_params(build_model("preact", 18, 3, width=8, family="imagenet"))
    assert s["train_images"] == 24 and s["test_images"] == 9 and s["steps_per_epoch"] == 3
    for key in (
        "final_test_error",
        "final_test_top5_error",
        "final_test_error_48",
        "final_test_top5_error_48",
    ):
        assert 0 <= s[key] <= 100
    assert s["final_test_top5_error"] == 0  # 3 classes: the true one is always in the top 5
    assert math.isfinite(s["final_train_loss"])
    # the report puts both crops' top-1 / top-5 side by side
    from resnet_exp.report import group_rows, load_runs
    from resnet_exp.report.tables import markdown

    md = markdown(group_rows(load_runs([tmp_path / "run"], curves=False)), [tmp_path], [])
    assert "| 32x32 crop | 48x48 crop | paper (Table 5), 320x320 |" in md
    assert "The paper column is the paper's Table 5 (the authors' Caffe nets)" in md
    top1, top1_48 = s["final_test_error"], s["final_test_error_48"]
    assert f"{top1:.2f} / 0.00 | {top1_48:.2f} / 0.00 |" in md


def test_bad_depth_on_the_command_line(folder: Path, tmp_path: Path) -> None:
    proc = run_main(cli_args(folder, tmp_path / "run", "depth=110"), cwd=tmp_path, check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert err == [
        "resnet-exp: error: depth=110 is not an ImageNet ResNet depth; allowed: 18, 34, 50, 101, 152, 200"
    ]
    assert not (tmp_path / "run" / "last.pt").exists()


def test_table5_preset_jobs_are_the_papers_rows() -> None:
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from resnet_exp.cli import config_dir
    from resnet_exp.config import flatten
    from resnet_exp.report.paper import paper_error

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        hc = compose("config", overrides=["+experiment=table5"], return_hydra_config=True)
        params = [f"{k}={v}" for k, v in hc.hydra.sweeper.params.items()]
        (jobs,) = BasicSweeper.split_arguments(
            OverridesParser.create().parse_overrides(params), None
        )
        configs = [
            OmegaConf.to_object(compose("config", overrides=["+experiment=table5", *job]))
            for job in jobs
        ]
    rows = {(c.model.block.value, c.depth): c for c in configs}
    assert set(rows) == {(b, d) for b in ("original", "preact") for d in (152, 200)}
    papers = {
        k: paper_error(flatten(OmegaConf.to_container(OmegaConf.structured(c), enum_to_str=True)))
        for k, c in rows.items()
    }
    assert papers == {
        ("original", 152): None,  # not in PAPER.md's Table 5 summary
        ("preact", 152): "21.1/5.5",
        ("original", 200): "21.8/6.0",
        ("preact", 200): "20.7/5.3",
    }
    assert all(c.data.eval_crops == [224, 320] and c.data.name == "imagenet" for c in configs)
    # The paper's nets are Caffe nets: stride on the first 1x1, written in both presets.
    assert all(c.model.stride_at.value == "first" for c in configs)
    for preset in ("imagenet", "table5"):
        written = OmegaConf.load(Path(config_dir()) / "experiment" / f"{preset}.yaml")
        assert written.model.stride_at == "first", preset


@pytest.mark.slow
def test_table5_preset_dry_run(folder: Path, tmp_path: Path) -> None:
    proc = run_main(
        ["-m", "+experiment=table5", f"data.root={folder}", "data.batch_size=8", "dry_run=true",
         "trainer.device=cpu", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=tmp_path,
    )  # fmt: skip
    infos = [json.loads(b) for b in _json_blocks(proc.stdout)]
    assert [(i["block"], i["depth"]) for i in infos] == [
        ("original", 152), ("preact", 152), ("original", 200), ("preact", 200)
    ]  # fmt: skip
    assert {i["family"] for i in infos} == {"imagenet"} and not any(i["warmup"] for i in infos)
    params = {(i["block"], i["depth"]): i["params"] for i in infos}
    # 3 classes here; with ImageNet's 1000 the counts are the published ones (tested above)
    assert params["original", 200] == params_of("original", 200, **IMAGENET) - 997 * 2049


def _json_blocks(text: str) -> list[str]:
    blocks, depth, cur = [], 0, []
    for line in text.splitlines():
        if line == "{":
            depth, cur = 1, [line]
        elif depth:
            cur.append(line)
            if line == "}":
                blocks.append("\n".join(cur))
                depth = 0
    return blocks


def test_recipe_preset_scales_lr_with_the_batch() -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from resnet_exp.cli import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+experiment=imagenet"])
        big = compose(
            config_name="config", overrides=["+experiment=imagenet", "data.batch_size=1024"]
        )
    c = OmegaConf.to_object(cfg)
    assert (c.data.name, c.data.batch_size, c.optimizer.lr, c.trainer.epochs) == (
        "imagenet",
        256,
        0.1,
        90,
    )
    assert c.optimizer.nesterov and c.optimizer.momentum == 0.9 and c.optimizer.weight_decay == 1e-4
    assert [round(m * 90) for m in c.schedule.milestones] == [30, 60]
    assert OmegaConf.to_object(big).optimizer.lr == pytest.approx(0.4)


@pytest.mark.slow
def test_resume_through_the_command_line_is_exact(folder: Path, tmp_path: Path) -> None:
    # a constant lr: a resumed run keeps the schedule of its first, shorter length
    det = ("trainer.deterministic=true", "data.workers=2", "schedule.gamma=1")
    run_main(cli_args(folder, tmp_path / "full", "trainer.max_steps=5", *det), cwd=tmp_path)
    run_main(cli_args(folder, tmp_path / "part", "trainer.max_steps=2", *det), cwd=tmp_path)
    run_main([f"resume={tmp_path / 'part'}", "trainer.max_steps=5"], cwd=tmp_path)
    a, b = (read_checkpoint(tmp_path / name)["model"] for name in ("full", "part"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.skipif(cifar10_root() is None, reason="needs the CIFAR-10 JPEG copy")
def test_cifar10_images_resized_through_the_imagenet_path(tmp_path: Path) -> None:
    """Real photographs (32 px, resized up to 64) streamed into an ImageNet ResNet-18."""
    run_main(
        [
            "dataset=imagefolder", "data.stream=true", f"data.root={cifar10_root()}",
            "data.train_limit=2048", "data.test_limit=500", "data.image_size=64",
            "data.eval_crops=[64,80]", "model.width=16", "depth=18", "data.batch_size=64",
            "data.eval_batch_size=250", "trainer.max_steps=64", "optimizer.lr=0.05",
            "trainer.device=cpu", "trainer.progress=false", f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
    )  # fmt: skip
    s = read_summary(tmp_path / "run")
    assert s["family"] == "imagenet" and s["train_images"] == 2048 and s["test_images"] == 500
    assert s["final_train_loss"] < math.log(10)  # learning: below chance
    assert s["final_test_top5_error"] < s["final_test_error"] < 90


@pytest.mark.slow
def test_two_processes_under_torchrun(folder: Path, tmp_path: Path) -> None:
    """Rank 0 lists the folder for both; each rank reads its shard; the sums of both
    ranks' test images make the error."""
    run = tmp_path / "ddp"
    torchrun(cli_args(folder, run, "trainer.max_steps=3", "data.eval_batch_size=2"), tmp_path)
    s = read_summary(run)
    assert s["processes"] == 2 and s["steps_per_epoch"] == 3  # 12 images a rank, 4 a batch
    assert s["test_images"] == 9
    # 9 test images over 2 ranks (5 + 4): every error is a multiple of 1/9
    for key in ("final_test_error", "final_test_error_48"):
        assert abs(s[key] * 9 / 100 - round(s[key] * 9 / 100)) < 1e-6


def test_raw_batches_cross_processes_as_one_tensor(folder: Path) -> None:
    """For device decode the workers read each batch's files raw and send them packed in
    one tensor (one shared-memory file per batch, not one per image)."""
    from resnet_exp.data.decode import Packed, read_all
    from resnet_exp.data.stream import _TrainBatches

    data = load_streamed(data_cfg(folder))
    batch = _TrainBatches(data.train, 6, 32, 0, 0, 1, raw=True)[(0, 0)]
    assert isinstance(batch.images, Packed) and batch.images.data.dtype == torch.uint8
    items, _ = read_all([data.train.path(int(i)) for i in batch.index], raw=True)
    for got, want in zip(batch.images.items(), items):
        assert torch.equal(got, want)
