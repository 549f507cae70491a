"""roadways_mask2former: the query_semantic task on road scenes end to end (tiny Mask2Former).

Frozen fine-tuning (frozen parameters and BatchNorm statistics unchanged by a step, no
drop-path in frozen parts, optimizer state for the trained parameters only), `--init_from hf:`
with the class head re-initialised, the full-resolution post-processing against transformers,
a short training run through the real trainer with exact resume, and ONNX export.
"""
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import run

from segjax import config as config_lib
from segjax import tasks
from segjax.bridge.hf_mask2former import hf_config, save_hf_mask2former
from segjax.data.demo_roads import prepare_road_demo
from segjax.engine import mesh as mesh_lib
from segjax.engine import setup
from segjax.engine import steps as steps_lib
from segjax.models.mask2former import MASK2FORMER_VARIANTS, Mask2Former
from segjax.tasks.query_semantic import full_resolution
from segjax.train import resolve_config

TINY = dict(MASK2FORMER_VARIANTS["tiny"], num_queries=4)
# A ResNet backbone (BatchNorm) and a Swin with drop-path, both tiny, as transformers configs.
RESNET = dict(TINY, backbone="resnet", backbone_config=dict(layer_type="basic", depths=(1, 1, 1, 1), width=8))
SWIN_DROP_PATH = dict(TINY, backbone_config=dict(TINY["backbone_config"], drop_path_rate=0.5))
TINY_SETS = ["--set", "data.crop=64,64", "--set", "data.base_height=64", "--set", "data.eval_size=64,128",
             "--set", "loss.num_points=64", "--set", "train.log_every=1", "--set", "train.num_visualizations=1"]


@pytest.fixture(scope="module")
def roads(tmp_path_factory) -> dict:
    """The road demo through the split/subset code, and a tiny transformers directory (3 classes)."""
    root = tmp_path_factory.mktemp("roads")
    lists = prepare_road_demo(root / "roads", num=8)
    hf_dir = root / "hf"
    kwargs = TINY
    model = Mask2Former(3, **kwargs, rngs=nnx.Rngs(5))
    save_hf_mask2former(model, hf_dir, ["a", "b", "c"])
    return {"root": str(root / "roads"), **lists, "hf": str(hf_dir)}


def argv(roads: dict, run_root, *extra) -> list[str]:
    return ["--experiment", "roadways_mask2former", "--data_root", roads["root"], "--set",
            f"data.train_list={roads['train']}", "--set", f"data.val_list={roads['val']}",
            "--init_from", f"hf:{roads['hf']}", "--batch_size", "4", "--num_workers", "0",
            "--checkpoint_dir", str(run_root), *TINY_SETS, *extra]


def task_for(kwargs: dict, *sets: str):
    """The experiment's task with the model `kwargs` (as a transformers config) and `sets`."""
    cfg = config_lib.load_experiment("roadways_mask2former")
    pairs = [("data.data_root", "unused"), ("model.hf_config", json.dumps(hf_config(26, kwargs))),
             *config_lib.parse_set(list(sets))]
    return tasks.build(tasks.resolve(config_lib.apply(cfg, pairs)))


def synthetic_batch(batch: int = 2, size: int = 64) -> dict:
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 4, (batch, size, size)).astype(np.uint8)
    mask[:, :8] = 255
    return {"image": rng.integers(0, 255, (batch, size, size, 3), dtype=np.uint8), "mask": mask,
            "pixel_mask": np.ones((batch, size, size), bool), "image_ok": np.ones(batch, bool),
            "valid": np.ones(batch, bool)}


def host(x) -> np.ndarray:
    return np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)


def one_step(task):
    mesh = mesh_lib.make_data_mesh()
    state = setup.build_state(task, mesh, 1, 1)
    step = steps_lib.make_train_step(state.model_def, state.opt_def, task.loss_and_sums, state.shardings,
                                     wrt=task.trainable)
    before = jax.tree.map(host, state.model_state)
    model_state, opt_state, sums = step(state.model_state, state.opt_state, synthetic_batch())
    assert int(sums["nonfinite_steps"]) == 0
    return state, before, model_state, opt_state


def parts_changed(before, after) -> dict[str, bool]:
    """Per Mask2Former part: did any of its variables change?"""
    changed = {}
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(before)[0], jax.tree.leaves(after)):
        part = str(path[0].key)
        changed[part] = changed.get(part, False) or not np.array_equal(a, host(b))
    return changed


def test_frozen_parts_and_optimizer_state():
    """Default: backbone (BatchNorm statistics included) and pixel decoder unchanged by a step, the
    transformer trained, and Adam's moments only for the transformer's parameters."""
    task = task_for(RESNET)
    state, before, after, opt_state = one_step(task)
    assert parts_changed(before, after) == {"backbone": False, "pixel_decoder": False, "transformer": True}
    model = nnx.merge(state.model_def, after)
    trained = sum(x.size for x in jax.tree.leaves(nnx.state(model.transformer, nnx.Param)))
    assert state.num_trained == trained < state.num_params
    moments = sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim > 0)
    assert moments == 2 * trained  # Adam's mu and nu, nothing for the frozen parameters
    # Training every part moves the BatchNorm statistics too: the check above can fail.
    everything = task_for(RESNET, "model.train_parts=backbone,pixel_decoder,transformer")
    _, before, after, _ = one_step(everything)
    assert all(parts_changed(before, after).values())
    stats = [path for path, _ in jax.tree_util.tree_flatten_with_path(before)[0] if "mean" in str(path[-2])]
    assert stats  # the ResNet has running statistics


def test_frozen_backbone_has_no_drop_path():
    """A frozen Swin runs in inference mode in the training graph: no drop-path (rate 0.5 here)."""
    images = jnp.asarray(np.random.default_rng(1).random((2, 64, 64, 3)), jnp.float32)
    outputs = {}
    for parts in ("transformer", "backbone,transformer"):
        task = task_for(SWIN_DROP_PATH, f"model.train_parts={parts}")
        model = task.build_model(nnx.Rngs(0))
        outputs[parts] = [np.asarray(model.backbone(images)[-1]) for _ in range(2)]
    np.testing.assert_array_equal(*outputs["transformer"])
    assert not np.array_equal(*outputs["backbone,transformer"])  # trained: drop-path active


def test_full_resolution_matches_transformers(ref):
    """Per-image sizes in one canvas: equal to transformers' post_process_semantic_segmentation."""
    torch = ref.torch
    from transformers.models.mask2former.image_processing_mask2former import Mask2FormerImageProcessor

    rng = np.random.default_rng(2)
    class_logits = rng.normal(size=(2, 5, 4)).astype(np.float32)
    mask_logits = 3 * rng.normal(size=(2, 5, 24, 40)).astype(np.float32)
    sizes = [(300, 500), (200, 700)]  # one up-, one partly down-sampled from the 384² intermediate
    ours = np.asarray(full_resolution(jnp.asarray(class_logits), jnp.asarray(mask_logits),
                                      jnp.asarray(sizes, jnp.int32), (300, 700)))
    outputs = type("Out", (), {"class_queries_logits": torch.from_numpy(class_logits),
                               "masks_queries_logits": torch.from_numpy(mask_logits)})()
    theirs = Mask2FormerImageProcessor().post_process_semantic_segmentation(outputs, target_sizes=sizes)
    for i, (h, w) in enumerate(sizes):
        agree = (ours[i, :h, :w] == theirs[i].numpy()).mean()
        assert agree > 0.999, agree  # ties between near-equal scores may differ


def test_hf_init_reinitialises_the_class_head(roads, caplog):
    """--init_from hf:DIR: the directory's architecture and weights; 3 classes vs 26 keep a fresh
    class head, with a notice."""
    cfg, _ = resolve_config(argv(roads, "unused"))
    task = tasks.build(tasks.resolve(cfg))
    assert json.loads(task.cfg.model.hf_config)["num_queries"] == 4
    model = task.build_model(nnx.Rngs(0))
    fresh = np.asarray(model.transformer.class_predictor.kernel[...])
    with caplog.at_level(logging.WARNING, logger="segjax"):
        task.load_hf_weights(model, roads["hf"])
    assert "the class head is re-initialised" in caplog.text
    source = Mask2Former(3, **TINY, rngs=nnx.Rngs(5))
    np.testing.assert_array_equal(model.transformer.queries_features.embedding[...],
                                  source.transformer.queries_features.embedding[...])
    np.testing.assert_array_equal(model.transformer.class_predictor.kernel[...], fresh)
    assert fresh.shape[-1] == 27


@pytest.fixture(scope="module")
def straight(roads, tmp_path_factory) -> dict:
    return run(argv(roads, tmp_path_factory.mktemp("runs"), "--epochs", "2"))


def test_training_run(straight):
    run_dir = Path(straight["run_dir"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["split"] == "val"]
    assert [r["epoch"] for r in val] == [1, 2]
    assert {"miou", "pixel_accuracy", "iou_road", "iou_sky", "loss_mask", "absent_classes"} <= val[-1].keys()
    assert "truck" in val[-1]["absent_classes"] and "road" not in val[-1]["absent_classes"]
    assert straight["best_step"] is not None
    assert list((run_dir / "visualizations").glob("prediction_epoch002_*.png"))
    assert list((run_dir / "tensorboard" / "val").glob("events.out.tfevents.*"))
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["model"]["hf_config"] and saved["data"]["class_names"][0] == "road"


def test_resume_is_exact(straight, roads, tmp_path):
    interrupted = run(argv(roads, tmp_path, "--epochs", "2"), stop_after_epoch=1)
    resumed = run(["--experiment", "roadways_mask2former", "--resume", interrupted["run_dir"]])
    for a, b in zip(jax.tree.leaves(straight["model_state"]), jax.tree.leaves(resumed["model_state"])):
        np.testing.assert_allclose(host(a), host(b), rtol=0, atol=1e-6)
    assert abs(straight["last_val"]["loss"] - resumed["last_val"]["loss"]) <= 1e-5


@pytest.mark.parametrize("variant", ["default", "semantic"])
def test_export_from_hf_dir(roads, tmp_path, variant, capsys):
    """tools/export_onnx.py --init_from hf:DIR needs no dataset; the tool's own JAX vs
    onnxruntime check passes."""
    from helpers import load_tool

    export_onnx = load_tool("export_onnx")
    out = tmp_path / "m.onnx"
    code = export_onnx.main(["--experiment", "roadways_mask2former", "--init_from", f"hf:{roads['hf']}",
                             "--out", str(out), "--variant", variant, "--height", "64", "--width", "96"])
    assert code == 0, capsys.readouterr()
    import onnx

    graph = onnx.load(str(out)).graph
    names = [o.name for o in graph.output]
    assert names == (["segmentation"] if variant == "semantic" else
                     ["class_queries_logits", "masks_queries_logits"])


@pytest.mark.parametrize("extra, message", [
    (["--set", "model.train_parts=head"], "model.train_parts must name some of"),
    (["--init_from", "hf:/nonexistent/dir"], "not a Hugging Face model directory"),
    (["--set", "loss.num_points=0"], "loss.num_points must be >= 1"),
])
def test_user_mistakes_are_one_line(extra, message, tmp_path, capsys):
    from segjax.train import main

    assert main(["--experiment", "roadways_mask2former", "--data_root", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_predict_jax_and_onnx_on_real_road_photos(straight, realdata, tmp_path, capsys):
    """segjax.predict on the run (a 64×128 model input, not square) and on its exported model:
    real CamVid photos segmented at their own size, the same masks both ways (but for pixels where
    f32 rounding decides an argmax between near-equal class scores)."""
    from flax import nnx
    from PIL import Image

    from segjax import predict
    from segjax.export.onnx import export

    images = realdata / "icevision/samples/camvid/images"
    restored = setup.restore_model(straight["run_dir"], overrides=["train.precision=fp32"])
    export(restored.task, nnx.merge(restored.graphdef, restored.state), tmp_path / "m.onnx")
    assert predict.main(["--checkpoint", straight["run_dir"], "--input_dir", str(images),
                         "--out_dir", str(tmp_path / "jax")]) == 0, capsys.readouterr().err
    assert predict.main(["--onnx", str(tmp_path / "m.onnx"), "--input_dir", str(images),
                         "--out_dir", str(tmp_path / "onnx")]) == 0, capsys.readouterr().err
    masks = sorted((tmp_path / "jax").glob("*_mask.png"))
    assert len(masks) == len(list(images.iterdir())) > 0
    for path in masks:
        mask = np.asarray(Image.open(path))
        photo = Image.open(images / path.name.replace("_mask.png", ".png"))
        assert mask.shape == (photo.height, photo.width) and mask.max() < 26
        assert (mask == np.asarray(Image.open(tmp_path / "onnx" / path.name))).mean() > 0.999
        assert (tmp_path / "jax" / path.name.replace("_mask", "_overlay")).exists()


def test_paper_recipe_at_tiny_size(roads, tmp_path):
    """`--mode paper` carries Mask2Former's Cityscapes recipe; a few steps of it at tiny size train
    every part with its parameter groups, the poly rate and whole-image protocol validation."""
    cfg = config_lib.load_experiment("roadways_mask2former", mode="paper")
    assert (cfg.train.batch_size, cfg.data.crop, cfg.data.base_height, cfg.data.scale_min, cfg.data.scale_max) == (
        16, (512, 1024), 1024, 0.5, 2.0)
    assert (cfg.optim.optimizer, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.scheduler, cfg.optim.power,
            cfg.optim.gradient_clip, cfg.optim.param_groups) == ("adamw", 1e-4, 0.05, "poly", 0.9, 0.01,
                                                                 ("mask2former",))
    assert cfg.train.epochs * (2975 // 16) == 90_095 and cfg.eval.resize == (1024, 2048)
    assert set(cfg.model.train_parts) == {"backbone", "pixel_decoder", "transformer"}

    summary = run(argv(roads, tmp_path, "--mode", "paper", "--epochs", "2", "--set", "data.classes=idd_level3",
                       "--set", "data.label_ids=train", "--set", "data.label_suffix=", "--set", "eval.resize=64,128"))
    rows = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    steps_per_epoch, total = train_rows[0]["step"], train_rows[-1]["step"]
    for r in train_rows:  # the rate of each epoch's last update: poly 0.9 from 1e-4, no warm-up
        assert r["lr"] == pytest.approx(1e-4 * (1 - (r["step"] - 1) / total) ** 0.9, rel=1e-5)
    assert steps_per_epoch >= 1 and np.isfinite(train_rows[-1]["loss"])
    assert 0 <= rows[-1]["miou"] <= 1 and rows[-1]["split"] == "val"
    log_lines = (Path(summary["run_dir"]) / "train.log").read_text().splitlines()
    groups = [line for line in log_lines if "param group" in line]
    assert any("backbone" in g and "lr x0.1," in g for g in groups), groups
