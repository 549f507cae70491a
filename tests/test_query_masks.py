"""hybrid_p3m (the query_masks task) end to end on a tiny portrait demo: training and its run
directory, the overfit mode, the predict CLI, the export protocol, and clear errors for bad data."""
import json
import math
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import run
from PIL import Image

from segjax import losses, predict, tasks
from segjax import train as train_cli
from segjax.data.demo_portrait import write_portrait_demo
from segjax.data.files import read_rgb
from segjax.data.prepare import prepare_memmaps
from segjax.engine.setup import restore_model
from segjax.export.onnx import export
from segjax.tasks.base import class_map
from segjax.tasks.query_masks import PERSON, combine_queries
from segjax.train import resolve_config, train_and_evaluate

# 64 px: at 32 the backbone's last stage is 1x1, where BatchNorm's batch statistics of a single
# image are degenerate (zero variance) and eval-mode outputs differ wildly from training.
SIZE = 64
TINY = ["--set", f"data.image_size={SIZE}", "--set", "model.size=tiny", "--set", "model.num_queries=4",
        "--set", "train.log_every=4", "--num_workers", "0",
        "--lr", "3e-3", "--batch_size", "1", "--scheduler", "none"]
# Batch 1 and a constant lr as in --mode overfit: its train and eval steps then compile to the same
# programs as the training run's, and come from the persistent compilation cache.


def _prepare(tmp: Path, **kwargs) -> Path:
    roots = write_portrait_demo(tmp / "folders", num_train=8, num_val=3, size=(56, 72))
    prepare_memmaps(roots["p3m_root"], tmp / "memmaps", supervisely_root=roots["supervisely_root"], size=SIZE,
                    **kwargs)
    return tmp / "memmaps"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """8 training and 3 validation portraits in the P3M/Supervisely layouts, prepared as memmaps."""
    return _prepare(tmp_path_factory.mktemp("portrait"))


def argv(data_dir: Path, run_root: Path, *extra: str) -> list[str]:
    return ["--experiment", "hybrid_p3m", "--data_dir", str(data_dir), *TINY, "--checkpoint_dir", str(run_root), *extra]


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory) -> dict:
    return run(argv(data_dir, tmp_path_factory.mktemp("runs"), "--epochs", "2"))


def test_training_run_directory_and_metrics(trained):
    run_dir = Path(trained["run_dir"])
    assert run_dir.parent.name == "hybrid_p3m"
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["task"] == "query_masks" and saved["model"]["size"] == "tiny"
    assert saved["data"]["train_images"].endswith(f"train_{SIZE}_u8_images.mmap")  # resolved from --data_dir
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["split"] == "val"]
    assert [r["epoch"] for r in val] == [1, 2]
    for r in val:
        assert r["images"] == 3 and r["absent_classes"] == []
        for key in ("loss", "loss_class", "loss_mask", "loss_dice", "miou", "iou_person", "iou_background",
                    "pixel_accuracy", "dice", "dice_person"):
            assert math.isfinite(r[key]), key
    assert trained["best_step"] is not None and list((run_dir / "checkpoints").iterdir())
    panels = sorted((run_dir / "visualizations").glob("prediction_epoch002_*.png"))
    # One panel per image of the first validation batch (of 1): image | truth | prediction.
    assert len(panels) == 1 and Image.open(panels[0]).size == (3 * SIZE, SIZE)
    for name in ("train.log", "metrics_first_iter.txt", "final_metrics.txt"):
        assert (run_dir / name).is_file()


def test_overfit_mode_drives_the_loss_down(data_dir, tmp_path):
    cfg, _ = resolve_config(argv(data_dir, tmp_path, "--mode", "overfit"))
    assert cfg.data.overfit_one and cfg.train.batch_size == 1 and cfg.train.epochs == 100
    summary = train_and_evaluate(cfg)
    assert summary["steps"] == 100
    first, last = summary["first_val"], summary["last_val"]  # before training, after 100 steps
    assert last["loss"] < 0.15 * first["loss"], (first["loss"], last["loss"])
    assert last["iou_person"] > 0.7


def test_predict_writes_outputs_at_the_original_size_and_times_parts(trained, tmp_path, capsys):
    image = np.zeros((37, 50, 3), np.uint8)
    image[5:35, 20:32] = (220, 60, 40)  # a person-like block on black
    Image.fromarray(image).save(tmp_path / "odd.png")
    rc = predict.main(["--experiment", "hybrid_p3m", "--checkpoint", trained["run_dir"], "--image",
                       str(tmp_path / "odd.png"), "--out_dir", str(tmp_path / "out"), "--timing", "--repeats", "3"])
    assert rc == 0
    mask = np.asarray(Image.open(tmp_path / "out" / "odd_mask.png"))
    assert mask.shape == (37, 50) and set(np.unique(mask)) <= {0, 1}
    assert np.asarray(Image.open(tmp_path / "out" / "odd_overlay.png")).shape == (37, 50, 3)
    out = capsys.readouterr().out
    times = {name: float(value) for name, value in re.findall(r"^\s+(backbone|fpn|decoder)\s+([\d.]+) ms$", out, re.M)}
    assert sorted(times) == ["backbone", "decoder", "fpn"] and all(t > 0 for t in times.values()), out


def test_predict_mask_is_the_metric_rule_and_onnx_gives_the_same(trained, realdata, tmp_path):
    """The class mask is the validation metric's prediction (combine_queries > 0.5) at the original
    size; the exported model gives the same masks through onnxruntime (real P3M photos)."""
    restored = restore_model(trained["run_dir"], overrides=["train.precision=fp32"])
    task, model = restored.task, nnx.merge(restored.graphdef, restored.state)
    export(task, model, tmp_path / "hybrid.onnx")
    photos = realdata / "p3m" / "demo" / "imgs" / "original"
    assert predict.main(["--checkpoint", trained["run_dir"], "--input_dir", str(photos), "--out_dir",
                         str(tmp_path / "jax")]) == 0
    assert predict.main(["--onnx", str(tmp_path / "hybrid.onnx"), "--input_dir", str(photos), "--out_dir",
                         str(tmp_path / "onnx")]) == 0
    for photo in sorted(photos.glob("*.jpg")):
        mask = np.asarray(Image.open(tmp_path / "jax" / f"{photo.stem}_mask.png"))
        onnx_mask = np.asarray(Image.open(tmp_path / "onnx" / f"{photo.stem}_mask.png"))
        # The runtimes' scores differ within the export check's 1e-4: a pixel may flip only where its
        # score is that close to the 0.5 threshold (found by moving the background's score by it).
        image = read_rgb(photo)
        inputs, context = task.predict_inputs(image, size=(SIZE, SIZE))
        outputs = task.export_forward(model, jnp.moveaxis(jnp.asarray(inputs["images"], jnp.float32) / 255.0, -1, 1))
        scores = task.class_scores(*(np.asarray(x)[0] for x in outputs))
        low, high = (class_map(np.concatenate([scores[:1] + shift, scores[1:]]), context) for shift in (-1e-4, 1e-4))
        decided = low == high
        assert mask.shape == image.shape[:2] and decided.mean() > 0.999
        np.testing.assert_array_equal(mask[decided], low[decided])
        np.testing.assert_array_equal(onnx_mask[decided], low[decided])
    # At the model's own size the mask is the metric's prediction, pixel for pixel.
    image = np.asarray(Image.open(sorted(photos.glob("*.jpg"))[0]).convert("RGB").resize((SIZE, SIZE)))
    inputs, context = task.predict_inputs(image, size=(SIZE, SIZE))
    logits, masks = task.export_forward(model, jnp.moveaxis(jnp.asarray(inputs["images"], jnp.float32) / 255.0, -1, 1))
    expected = np.asarray(combine_queries(logits, masks, PERSON, task.cfg.loss.score_threshold) > 0.5)[0]
    np.testing.assert_array_equal(task.postprocess([np.asarray(logits), np.asarray(masks)], context), expected)


def test_predict_reports_unreadable_images_and_bad_arguments(trained, tmp_path, capsys):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(tmp_path / "good.jpg")
    rc = predict.main(["--checkpoint", trained["run_dir"], "--image", str(tmp_path / "broken.jpg"),
                       "--image", str(tmp_path / "good.jpg"), "--out_dir", str(tmp_path / "out")])
    assert rc == 1 and "broken.jpg: cannot decode" in capsys.readouterr().err
    assert (tmp_path / "out" / "good_mask.png").is_file()  # the readable image is still segmented
    assert predict.main(["--checkpoint", trained["run_dir"], "--experiment", "roi_human",
                         "--image", str(tmp_path / "good.jpg")]) == 2
    assert predict.main(["--checkpoint", str(tmp_path / "nowhere"), "--image", str(tmp_path / "good.jpg")]) == 2


def test_bad_data_dirs_exit_2_with_a_message(data_dir, tmp_path, capsys):
    assert train_cli.main(argv(tmp_path / "missing", tmp_path / "runs")) == 2
    assert "missing does not exist" in capsys.readouterr().err
    assert train_cli.main(argv(data_dir, tmp_path / "runs", "--set", "data.image_size=32")) == 2
    assert "no train memmaps of size 32" in capsys.readouterr().err
    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    with open(copy / f"train_{SIZE}_u8_masks.mmap", "ab") as f:
        f.write(b"\0" * 5)  # no longer what its sidecar describes
    assert train_cli.main(argv(copy, tmp_path / "runs")) == 2
    assert re.search(r"train_64_u8_masks.mmap: expected \d+ bytes .*found \d+ bytes", capsys.readouterr().err)


def test_data_dir_of_one_prepared_size_sets_the_image_size(data_dir, tmp_path, capsys):
    def no_size(folder):  # TINY without its first flag, data.image_size
        return ["--experiment", "hybrid_p3m", "--data_dir", str(folder), *TINY[2:], "--checkpoint_dir", str(tmp_path)]

    cfg, _ = resolve_config(no_size(data_dir))
    assert cfg.data.image_size == 0 and tasks.resolve(cfg).data.image_size == SIZE
    two = tmp_path / "two"
    shutil.copytree(data_dir, two)
    for path in data_dir.glob(f"train_{SIZE}_*"):
        shutil.copy(path, two / path.name.replace(f"_{SIZE}_", "_128_"))
    assert train_cli.main(no_size(two)) == 2
    err = capsys.readouterr().err
    assert f"cannot tell the records' size (prepared sizes [{SIZE}, 128]); set data.image_size" in err


def test_original_pipeline_float16_files_without_sidecars(tmp_path):
    """NCHW float16 files named as the PyTorch pipeline names them, known by their name's tag."""
    data_dir = _prepare(tmp_path, dtype="float16")
    for sidecar in data_dir.glob("*.json"):
        sidecar.unlink()
    cfg, _ = resolve_config(["--experiment", "hybrid_p3m", "--data_dir", str(data_dir), *TINY])
    task = tasks.build(tasks.resolve(cfg))
    assert (task.cfg.data.memmap_dtype, task.cfg.data.memmap_layout) == ("float16", "NCHW")
    source, transform = task.val_data()
    record = transform(source[0])
    assert len(source) == 3 and record["image"].shape == (SIZE, SIZE, 3) and record["image"].dtype == np.uint8
    assert set(np.unique(record["mask"])) <= {0, 1} and record["mask"].any()


def test_export_protocol_and_skip_safe_loss(data_dir):
    cfg, _ = resolve_config(["--experiment", "hybrid_p3m", "--data_dir", str(data_dir), *TINY])
    task = tasks.build(tasks.resolve(cfg))
    inputs, outputs = task.export_signature()
    assert inputs == [("images", ("B", 3, SIZE, SIZE))] and outputs == ["pred_logits", "pred_masks"]
    model = task.build_model(nnx.Rngs(0))
    model.eval()
    logits, masks = jax.eval_shape(task.export_forward, model, jax.ShapeDtypeStruct((2, 3, SIZE, SIZE), jnp.float32))
    assert logits.shape == (2, 4, 2) and masks.shape == (2, 4, SIZE, SIZE)

    # An unreadable (or padded) example changes neither the loss nor the sums, whatever it holds.
    source, transform = task.val_data()
    records = [transform(source[i]) for i in range(2)]
    batch = {k: np.stack([r[k] for r in records]) for k in records[0]}
    batch.update(valid=np.ones(2, bool), image_ok=np.array([True, False]))
    noise = {k: v.copy() for k, v in batch.items()}
    noise["image"][1] = np.random.default_rng(0).integers(0, 256, noise["image"][1].shape, dtype=np.uint8)
    noise["mask"][1] = noise["mask_labels"][1, 0] = 1 - noise["mask"][1]
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda s, b: task.loss_and_sums(nnx.merge(graphdef, s), b, jax.random.key(0)))
    (loss, (sums, _)), (noise_loss, (noise_sums, _)) = step(state, batch), step(state, noise)
    assert np.isfinite(loss) and float(loss) == float(noise_loss)
    for key in ("loss", "loss_class", "loss_mask", "loss_dice", "confusion"):
        np.testing.assert_array_equal(sums[key], noise_sums[key])
    assert (int(sums["count"]), int(sums["records"]), int(sums["bad_records"])) == (1, 2, 1)
    assert int(np.asarray(sums["confusion"]).sum()) == SIZE * SIZE  # one image's pixels


def _one_person_loss(torch, logits, masks, person, usable):
    """hybrid_p3m's loss as it was before multi-instance targets, written directly in PyTorch: per
    usable image, the person mask (when it has pixels) is matched to the query of least cost
    2·(−p(person)) + 5·BCE + 5·Dice over all pixels; loss 2·CE (no object weighted 0.1) + 5·BCE +
    5·Dice; the batch loss is the mean over usable images. Returns (loss, summed parts)."""
    F = torch.nn.functional
    total, parts = 0.0, dict.fromkeys(("loss_class", "loss_mask", "loss_dice"), 0.0)
    for b in np.flatnonzero(usable):
        t = torch.tensor(person[b], dtype=torch.float32).flatten()
        x = masks[b].flatten(1)
        p = x.sigmoid()
        bce = F.binary_cross_entropy_with_logits(x, t.expand_as(x), reduction="none").mean(1)
        dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum() + 1)
        target = torch.ones(len(x), dtype=torch.long)  # "no object"
        if t.any():
            q = int(torch.argmin(-2 * logits[b].softmax(-1)[:, 0] + 5 * bce + 5 * dice))
            target[q] = 0
            bce_b, dice_b = bce[q], dice[q]
        else:
            bce_b = dice_b = torch.zeros(())
        ce = F.cross_entropy(logits[b], target, weight=torch.tensor([1.0, 0.1]))
        total = total + 2 * ce + 5 * bce_b + 5 * dice_b
        for name, value in zip(parts, (ce, bce_b, dice_b)):
            parts[name] = parts[name] + value
    return total / len(np.flatnonzero(usable)), parts


@pytest.fixture(scope="module")
def fixed_batch(data_dir) -> tuple[dict, np.ndarray, np.ndarray]:
    """Four validation portraits as the task batches them (image 1 without person pixels, image 2
    unreadable, image 3 padding) and random model outputs for them: 3 queries."""
    cfg, _ = resolve_config(["--experiment", "hybrid_p3m", "--data_dir", str(data_dir), *TINY])
    source, transform = tasks.build(tasks.resolve(cfg)).val_data()
    records = [transform(source[i % len(source)]) for i in range(4)]
    records[1] = tasks.query_masks.person_targets({**records[1], "mask": np.zeros_like(records[1]["mask"])})
    batch = {k: np.stack([r[k] for r in records]) for k in records[0]}
    batch.update(valid=np.array([True, True, True, False]), image_ok=np.array([True, True, False, True]))
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 3, 2)).astype(np.float32)
    return batch, logits, 3 * rng.normal(size=(4, 3, SIZE, SIZE)).astype(np.float32)


def _task_loss(task, batch, key=0):
    def loss_fn(logits, masks):
        outputs = {"pred_logits": logits, "pred_masks": masks}
        loss, (sums, _) = task.loss_and_sums(lambda images: outputs, batch, jax.random.key(key))
        return loss, sums

    return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))


def test_padded_targets_give_the_one_person_loss(data_dir, fixed_batch):
    """hybrid_p3m through the multi-instance targets: the same loss, parts and output gradients
    (hence parameter updates) as its one-person-mask formulation, on a fixed batch."""
    torch = pytest.importorskip("torch")
    cfg, _ = resolve_config(["--experiment", "hybrid_p3m", "--data_dir", str(data_dir), *TINY])
    batch, logits, masks = fixed_batch
    assert batch["mask_labels"].shape == (4, 1, SIZE, SIZE) and batch["label_valid"].tolist() == [[1], [0], [1], [1]]
    (loss, sums), grads = _task_loss(tasks.build(tasks.resolve(cfg)), batch)(logits, masks)
    t_logits, t_masks = (torch.tensor(a, requires_grad=True) for a in (logits, masks))
    expected, parts = _one_person_loss(torch, t_logits, t_masks, batch["mask"], batch["valid"] & batch["image_ok"])
    expected.backward()
    np.testing.assert_allclose(float(loss), expected.item(), rtol=1e-5)
    for name, value in parts.items():
        np.testing.assert_allclose(float(sums[name]), value.item(), rtol=1e-5, err_msg=name)
    for ours, theirs in zip(grads, (t_logits.grad.numpy(), t_masks.grad.numpy())):
        assert np.abs(theirs).max() > 0
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5 * np.abs(theirs).max())


def test_mask2former_criterion_option(data_dir, fixed_batch, tmp_path, capsys):
    """loss.num_points > 0: Mask2Former's point-sampled criterion, its points from the step's key."""
    cfg, _ = resolve_config(["--experiment", "hybrid_p3m", "--data_dir", str(data_dir), *TINY,
                             "--set", "loss.num_points=16"])
    task = tasks.build(tasks.resolve(cfg))
    batch, logits, masks = fixed_batch
    (loss, sums), grads = _task_loss(task, batch)(logits, masks)
    usable = jnp.asarray(batch["valid"] & batch["image_ok"])
    expected, parts = losses.Mask2FormerLoss(num_points=16)(
        [(jnp.asarray(logits), jnp.asarray(masks))], jnp.asarray(batch["mask_labels"]),
        jnp.asarray(batch["class_labels"]), usable[:, None] & jnp.asarray(batch["label_valid"]), jax.random.key(0),
        image_weight=usable)
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)
    np.testing.assert_allclose(float(sums["loss_mask"]), 2 * float(parts["loss_mask"]), rtol=1e-6)  # x 2 usable
    assert float(parts["num_masks"]) == 1.0  # image 0 only: 1 has no person, 2 and 3 are not usable
    assert not np.asarray(grads[1][1:]).any()  # no mask gradient without a target
    (again, _), _ = _task_loss(task, batch)(logits, masks)
    (other, _), _ = _task_loss(task, batch, key=1)(logits, masks)
    assert float(again) == float(loss) and float(other) != float(loss)
    assert train_cli.main(argv(data_dir, tmp_path, "--set", "loss.importance_sample_ratio=2")) == 2
    assert "0 <= loss.importance_sample_ratio <= 1" in capsys.readouterr().err
