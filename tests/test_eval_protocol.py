"""The evaluation protocol (segjax.engine.inference / evaluation): mmseg's slide_inference grid and
averaging ported to torch, SegTTAModel's merge with torch's interpolate and softmax, mmcv's
keep-ratio rescale rule, metrics at label resolution, and training, segjax.evaluate and
segjax.predict (JAX and ONNX) honouring `--set eval.*`; bad values end in one-line ConfigErrors."""
import json

import numpy as np
import pytest
from PIL import Image

from segjax import evaluate, metrics, predict
from segjax.config import ConfigError, EvalConfig, apply, load_experiment, validate
from segjax.data.demo import write_voc_demo
from segjax.data.files import read_rgb
from segjax.engine import evaluation, inference
from segjax.engine import steps as steps_lib
from segjax.engine.setup import restore_model
from segjax.train import resolve_config, train_and_evaluate

NUM_CLASSES = 5


def toy_scores(crops: np.ndarray) -> np.ndarray:
    """A position-dependent "model": logits [B, K, h, w] from each crop pixel and its place in the
    crop, so that windows overlapping a pixel disagree and averaging matters."""
    x = crops.astype(np.float32) / 255.0
    local_y, local_x = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in crops.shape[1:3]), indexing="ij")
    out = [x[..., k % 3] * (k + 1) + (0.3 * local_y - 0.2 * local_x) * (k - 2) / 10 for k in range(NUM_CLASSES)]
    return np.stack(out, axis=1)


def coordinate_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)


def mmseg_slide_inference(torch, inputs, crop, stride, encode_decode, num_classes):
    """mmseg 1.x EncoderDecoder.slide_inference (mmseg/models/segmentors/encoder_decoder.py), as
    written there; returns the averaged logits and the windows it visited."""
    F = torch.nn.functional
    h_stride, w_stride = stride
    h_crop, w_crop = crop
    batch_size, _, h_img, w_img = inputs.size()
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = inputs.new_zeros((batch_size, num_classes, h_img, w_img))
    count_mat = inputs.new_zeros((batch_size, 1, h_img, w_img))
    windows = []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1 = h_idx * h_stride
            x1 = w_idx * w_stride
            y2 = min(y1 + h_crop, h_img)
            x2 = min(x1 + w_crop, w_img)
            y1 = max(y2 - h_crop, 0)
            x1 = max(x2 - w_crop, 0)
            crop_img = inputs[:, :, y1:y2, x1:x2]
            windows.append((y1, y2, x1, x2))
            crop_seg_logit = encode_decode(crop_img)
            preds += F.pad(crop_seg_logit, (int(x1), int(preds.shape[3] - x2), int(y1), int(preds.shape[2] - y2)))
            count_mat[:, :, y1:y2, x1:x2] += 1
    assert (count_mat == 0).sum() == 0
    return preds / count_mat, windows


def torch_toy(torch):
    """toy_scores on an NCHW uint8-valued float tensor."""
    def encode_decode(crop):
        crops = crop.permute(0, 2, 3, 1).numpy().astype(np.uint8)
        return torch.from_numpy(toy_scores(crops))
    return encode_decode


GRIDS = [  # (height, width, crop, stride): stride dividing or not, image smaller than the crop, equal
    (50, 70, (16, 24), (10, 12)),
    (64, 64, (32, 32), (16, 16)),
    (37, 91, (20, 30), (7, 29)),
    (10, 30, (16, 16), (8, 8)),
    (16, 16, (16, 16), (16, 16)),
    (33, 17, (33, 20), (1, 20)),
]


@pytest.mark.parametrize("height,width,crop,stride", GRIDS)
def test_crop_grid_and_slide_are_mmseg_slide_inference(ref, height, width, crop, stride):
    torch = ref.torch
    image = coordinate_image(height, width)
    nchw = torch.from_numpy(image.transpose(2, 0, 1)[None].astype(np.float32))
    _, windows = mmseg_slide_inference(torch, nchw, crop, stride, torch_toy(torch), NUM_CLASSES)
    assert inference.crop_grid(height, width, crop, stride) == windows  # smaller images included
    if height >= crop[0] and width >= crop[1]:  # the formula: y = min(i * stride, H - crop)
        rows = -(-(height - crop[0]) // stride[0]) + 1
        assert sorted({w[0] for w in windows}) == sorted({min(i * stride[0], height - crop[0]) for i in range(rows)})
    # segjax pads to at least the crop (zeros, cut off after): mmseg's loop on that padded image.
    padded = np.pad(image, ((0, max(crop[0] - height, 0)), (0, max(crop[1] - width, 0)), (0, 0)))
    expected, _ = mmseg_slide_inference(torch, torch.from_numpy(padded.transpose(2, 0, 1)[None].astype(np.float32)),
                                        crop, stride, torch_toy(torch), NUM_CLASSES)
    for batch_size in (1, 3):  # the last batch padded: the same averages
        got = inference.slide(image, crop, stride, toy_scores, batch_size)
        np.testing.assert_allclose(got, expected[0, :, :height, :width].numpy(), rtol=1e-5, atol=1e-5)


def mmcv_rescale_size(old_size, scale):
    """mmcv.image.geometric.rescale_size (tuple scale), as written there; sizes are (w, h)."""
    w, h = old_size
    max_long_edge = max(scale)
    max_short_edge = min(scale)
    scale_factor = min(max_long_edge / max(h, w), max_short_edge / min(h, w))
    return int(w * float(scale_factor) + 0.5), int(h * float(scale_factor) + 0.5)


@pytest.mark.parametrize("size,bound", [((1024, 2048), (1024, 2048)), ((366, 500), (512, 2048)),
                                        ((500, 375), (512, 2048)), ((1080, 1920), (1024, 2048)),
                                        ((333, 777), (96, 128)), ((640, 480), (640, 640)), ((17, 1000), (512, 512))])
def test_keep_ratio_resize_is_mmcv_rescale_size(size, bound):
    height, width = size
    for scale in (0.5, 0.75, 1.0, 1.75):
        scaled = (int(bound[0] * scale), int(bound[1] * scale))
        w, h = mmcv_rescale_size((width, height), scaled[::-1])  # mmseg's scale is (w, h)
        assert inference.rescale_size(height, width, scaled) == (h, w)


def test_resize_is_torch_bilinear_without_antialias(ref):
    torch = ref.torch
    scores = np.random.default_rng(1).normal(size=(3, 13, 29)).astype(np.float32)
    for size in ((40, 7), (13, 29), (5, 60)):
        expected = torch.nn.functional.interpolate(torch.from_numpy(scores[None]), size=size, mode="bilinear",
                                                   align_corners=False)[0].numpy()
        np.testing.assert_allclose(inference.resize_scores(scores, size), expected, rtol=1e-5, atol=1e-5)
    image = coordinate_image(31, 45)
    expected = torch.nn.functional.interpolate(torch.from_numpy(image.transpose(2, 0, 1)[None].astype(np.float32)),
                                               size=(20, 70), mode="bilinear", align_corners=False)[0]
    got = inference.resize_image(image, (20, 70)).astype(np.float32)
    # Rounded to uint8 (as cv2): at most a unit apart, where torch's sum lands on the other side of .5.
    np.testing.assert_allclose(got, expected.numpy().transpose(1, 2, 0), atol=0.5 + 1e-3)


@pytest.mark.parametrize("mode", ["whole", "slide"])
@pytest.mark.parametrize("outputs", ["logits", "probabilities"])
def test_tta_merge_is_segtta_with_torch_interpolate_and_softmax(ref, mode, outputs):
    """Scales and flip: each version's scores resized bilinearly (torch) to the image size, flip
    undone, softmax (logits only), averaged; the class is the argmax."""
    torch = ref.torch
    F = torch.nn.functional
    image = coordinate_image(45, 70, seed=2)
    ev = EvalConfig(resize=(40, 60), mode=mode, crop=(16, 24) if mode == "slide" else (),
                    stride=(10, 12) if mode == "slide" else (), scales=(0.5, 1.0, 1.5), flip=True, batch_size=3)
    protocol = inference.build_protocol(ev, (64, 64), outputs)
    got = inference.image_scores(image, protocol, toy_scores)
    versions = []
    for scale in ev.scales:
        w, h = mmcv_rescale_size((70, 45), (int(60 * scale), int(40 * scale)))
        # The image resize itself is test_resize_is_torch_bilinear_without_antialias's.
        resized = torch.from_numpy(inference.resize_image(image, (h, w)).transpose(2, 0, 1)[None].astype(np.float32))
        for flip in (False, True):
            x = resized.flip(3) if flip else resized
            if mode == "slide":
                padded = F.pad(x, (0, max(24 - w, 0), 0, max(16 - h, 0)))
                logits = mmseg_slide_inference(torch, padded, (16, 24), (10, 12), torch_toy(torch), NUM_CLASSES)[0]
                logits = logits[:, :, :h, :w]
            else:  # the whole image (its padding to the box does not reach this pixel-wise model)
                logits = torch_toy(torch)(x)
            logits = F.interpolate(logits, size=(45, 70), mode="bilinear", align_corners=False)
            logits = logits.flip(3) if flip else logits
            versions.append(logits.softmax(1) if outputs == "logits" else logits)
    expected = torch.stack(versions).mean(0)[0].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(inference.segment(image, protocol, toy_scores), expected.argmax(0))


def test_host_confusion_matrix_is_the_metrics_rule():
    rng = np.random.default_rng(3)
    label = rng.integers(0, NUM_CLASSES, (40, 30)).astype(np.uint8)
    label[rng.random(label.shape) < 0.2] = 255
    pred = rng.integers(0, NUM_CLASSES, (40, 30)).astype(np.uint8)
    expected = np.asarray(metrics.confusion_matrix(label, pred, NUM_CLASSES, ignore_index=255))
    np.testing.assert_array_equal(evaluation.confusion_matrix(label, pred, NUM_CLASSES), expected)
    assert evaluation.confusion_matrix(label, pred, NUM_CLASSES).sum() == (label != 255).sum()


def test_mask2former_crop_scores_are_transformers_semantic_inference(ref):
    """Class softmax without "no object" x sigmoid of the mask logits upsampled to the crop, summed
    over queries (transformers' post_process_semantic_segmentation): probabilities, no softmax."""
    torch = ref.torch
    from segjax.tasks.query_semantic import Task

    task = Task.__new__(Task)  # crop_scores reads nothing of the data
    assert task.eval_outputs == "probabilities"
    rng = np.random.default_rng(4)
    classes = rng.normal(size=(2, 7, 6 + 1)).astype(np.float32)
    masks = rng.normal(size=(2, 7, 8, 12)).astype(np.float32)
    got = np.asarray(task.crop_scores((classes, masks), (32, 48)))
    up = torch.nn.functional.interpolate(torch.from_numpy(masks), size=(32, 48), mode="bilinear", align_corners=False)
    expected = torch.einsum("bqc,bqhw->bchw", torch.from_numpy(classes).softmax(-1)[..., :-1], up.sigmoid())
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- a real tiny model

TINY = ["--set", "model.size=tiny", "--set", "data.crop_size=48", "--set", "data.eval_size=64", "--batch_size", "4",
        "--num_workers", "0", "--backbone", "resnet18", "--set", "train.num_visualizations=1"]
SLIDE = ["eval.resize=80,96", "eval.mode=slide", "eval.crop=64,64", "eval.stride=40,24", "eval.scales=0.75,1.0",
         "eval.flip=true", "eval.batch_size=3"]


@pytest.fixture(scope="module")
def semantic(tmp_path_factory) -> dict:
    """voc_resnet trained one epoch on tiny demo data (100x75 images), validated with the sliding
    window and test-time scales and flip."""
    tmp = tmp_path_factory.mktemp("semantic")
    voc = write_voc_demo(tmp / "voc", num_train=4, num_val=3, size=(100, 75))
    sets = [arg for item in SLIDE for arg in ("--set", item)]
    cfg, _ = resolve_config(["--experiment", "voc_resnet", "--data_root", str(voc), *TINY, *sets, "--epochs", "1",
                             "--checkpoint_dir", str(tmp / "runs")])
    summary = train_and_evaluate(cfg)
    restored = restore_model(summary["run_dir"], overrides=["train.precision=fp32"])
    return {"run_dir": summary["run_dir"], "summary": summary, "restored": restored, "tmp": tmp}


@pytest.fixture(scope="module")
def onnx_model(semantic) -> str:
    from flax import nnx

    from segjax.export.onnx import export

    restored = semantic["restored"]
    export(restored.task, nnx.merge(restored.graphdef, restored.state), semantic["tmp"] / "model.onnx")
    return str(semantic["tmp"] / "model.onnx")


def direct_metrics(restored, sets: list[str]) -> dict:
    """Each validation image segmented by the protocol, its confusion matrix taken by the metrics'
    jitted rule against the label at its own size."""
    task = restored.task
    task = type(task)(apply(task.cfg, [tuple(s.split("=", 1)) for s in sets]))
    protocol = evaluation.task_protocol(task)
    forward = evaluation.CropScorer(steps_lib.inference_jit(evaluation.score_fn(task, restored.graphdef)),
                                    restored.state)
    source, read = task.val_images()
    total = 0
    for entry in source:
        image, label = read(entry)
        assert label.shape == image.shape[:2] == (75, 100)  # the labels' own resolution, not the model's
        pred = inference.segment(image, protocol, forward)
        total = total + np.asarray(metrics.confusion_matrix(label, pred, len(task.class_names), ignore_index=255))
    return metrics.summarize_confusion(total, list(task.class_names))


def test_training_and_evaluate_follow_the_protocol(semantic, capsys):
    summary = semantic["summary"]
    expected = direct_metrics(semantic["restored"], SLIDE)
    assert summary["last_val"]["images"] == 3 and np.isnan(summary["last_val"]["loss"])
    assert summary["last_val"]["miou"] == pytest.approx(expected["miou"], abs=1e-6)
    assert evaluate.main([semantic["run_dir"], "--json", "--no_visualization"]) == 0  # the run's saved eval
    result = json.loads(capsys.readouterr().out)[0]["metrics"]
    assert result["miou"] == pytest.approx(expected["miou"], abs=1e-6)
    assert result["pixel_accuracy"] == pytest.approx(expected["pixel_accuracy"], abs=1e-6)
    # Another protocol by --set: whole images, keep-ratio resized to 64 x 80, flipped.
    other = ["eval.mode=whole", "eval.resize=64,80", "eval.scales=1.0", "eval.flip=true"]
    assert evaluate.main([semantic["run_dir"], "--json", "--no_visualization",
                          *[a for s in other for a in ("--set", s)]]) == 0
    result = json.loads(capsys.readouterr().out)[0]["metrics"]
    expected = direct_metrics(semantic["restored"], SLIDE + other)
    assert result["miou"] == pytest.approx(expected["miou"], abs=1e-6)


def test_slide_with_the_whole_image_as_crop_is_whole(semantic):
    restored = semantic["restored"]
    task = restored.task
    forward = evaluation.CropScorer(steps_lib.inference_jit(evaluation.score_fn(task, restored.graphdef)),
                                    restored.state)
    image = coordinate_image(64, 64, seed=5)
    whole = inference.build_protocol(EvalConfig(resize=(64, 64)), (64, 64), "logits")
    slide = inference.build_protocol(EvalConfig(resize=(64, 64), mode="slide", crop=(64, 64), stride=(32, 32)),
                                     (64, 64), "logits")
    np.testing.assert_array_equal(inference.segment(image, whole, forward), inference.segment(image, slide, forward))
    # ... and whole is the model's own logits on the image.
    from flax import nnx
    model = nnx.merge(restored.graphdef, restored.state)
    logits = np.asarray(model(image[None].astype(np.float32) / 255.0)[0])
    np.testing.assert_array_equal(inference.segment(image, whole, forward), logits.argmax(-1))
    # Two overlapping windows of a 64 x 96 image: the model's logits of each, averaged where both lie.
    wide = coordinate_image(64, 96, seed=6)
    left, right = (np.asarray(model(wide[None, :, x:x + 64].astype(np.float32) / 255.0)[0]) for x in (0, 32))
    expected = np.zeros((64, 96, logits.shape[-1]), np.float32)
    expected[:, :64] += left
    expected[:, 32:] += right
    expected[:, 32:64] /= 2
    got = inference.slide(wide, (64, 64), (32, 32), forward, 2)
    np.testing.assert_allclose(got, np.moveaxis(expected, -1, 0), rtol=1e-4, atol=1e-4)


def test_predict_follows_the_protocol_in_jax_and_onnx(semantic, onnx_model, realdata, tmp_path, capsys):
    photo = realdata / "voc_assembled/VOCdevkit/VOC2012/JPEGImages/2007_000033.jpg"
    sets = [a for s in SLIDE for a in ("--set", s)]
    assert predict.main(["--checkpoint", semantic["run_dir"], "--image", str(photo), "--out_dir",
                         str(tmp_path / "jax"), *sets]) == 0
    assert predict.main(["--onnx", onnx_model, "--image", str(photo), "--out_dir", str(tmp_path / "onnx"),
                         *sets]) == 0
    jax_mask = np.asarray(Image.open(tmp_path / "jax" / "2007_000033_mask.png"))
    onnx_mask = np.asarray(Image.open(tmp_path / "onnx" / "2007_000033_mask.png"))
    assert jax_mask.shape == (366, 500)
    np.testing.assert_array_equal(jax_mask, onnx_mask)
    restored = semantic["restored"]
    forward = evaluation.CropScorer(steps_lib.inference_jit(evaluation.score_fn(restored.task, restored.graphdef)),
                                    restored.state)
    task = type(restored.task)(apply(restored.task.cfg, [s.split("=", 1) for s in SLIDE]))
    np.testing.assert_array_equal(jax_mask, inference.segment(read_rgb(photo), evaluation.task_protocol(task), forward))
    # The ONNX graph's input is fixed: another crop size is refused in one line.
    capsys.readouterr()
    assert predict.main(["--onnx", onnx_model, "--image", str(photo), "--out_dir", str(tmp_path / "x"), *sets,
                         "--set", "eval.crop=48,48", "--set", "eval.stride=24,24"]) == 2
    assert capsys.readouterr().err == "error: eval.crop (48, 48) must equal the model's fixed input size (64, 64)\n"


# ---------------------------------------------------------------- bad values


@pytest.mark.parametrize("sets,message", [
    (["eval.mode=tiles"], r"eval.mode='tiles' is not valid; choose one of \['whole', 'slide'\]"),
    (["eval.mode=slide", "eval.stride=8,8"], r"eval.crop must be \(height, width\), each >= 1, got \(\) "
                                             r"\(eval.mode=slide needs it\)"),
    (["eval.mode=slide", "eval.crop=32,32", "eval.stride=0,8"], r"eval.stride must be \(height, width\), each >= 1"),
    (["eval.mode=slide", "eval.crop=32,32", "eval.stride=8,33"], r"eval.stride must be within \[1, eval.crop\]"),
    (["eval.resize=64,80", "eval.mode=slide", "eval.crop=72,32", "eval.stride=8,8"],
     r"eval.crop \(72, 32\) must fit in eval.resize \(64, 80\)"),
    (["eval.scales=1.0,0"], r"eval.scales must be factors > 0, got \(1.0, 0.0\)"),
    (["eval.scales=-0.5"], r"eval.scales must be factors > 0"),
    (["eval.resize=64"], r"eval.resize must be \(height, width\), each >= 1, got \(64,\)"),
    (["eval.batch_size=0"], r"eval.batch_size must be >= 1, got 0"),
])
def test_bad_eval_values_are_one_line_config_errors(sets, message):
    base = load_experiment("voc_resnet", demo=True)
    with pytest.raises(ConfigError, match=message) as caught:
        validate(apply(base, [tuple(s.split("=", 1)) for s in sets]))
    assert "\n" not in str(caught.value)


def test_task_checks_crop_against_its_eval_size_and_protocol_support(semantic, tmp_path, capsys):
    # An empty eval.resize is the data's eval size (64): a crop of 72 rows only covers padding.
    assert evaluate.main([semantic["run_dir"], "--no_visualization", "--set", "eval.resize=", "--set",
                          "eval.crop=72,64", "--set", "eval.stride=32,32"]) == 2
    assert "eval.crop (72, 64) must fit in eval.resize (64, 64) (height, width), the data's eval size" in \
        capsys.readouterr().err
    # hybrid_p3m's output is a thresholded portrait score, not per-pixel class scores: no protocol.
    from segjax.tasks.query_masks import Task

    task = Task.__new__(Task)  # only its config is read
    task.cfg = apply(load_experiment("hybrid_p3m", demo=True), [("eval.flip", "true")])
    with pytest.raises(ConfigError, match="hybrid_p3m: task 'query_masks' has no evaluation protocol"):
        evaluation.task_protocol(task)


def test_mask2former_validation_averages_semantic_scores(ref, tmp_path):
    """roadways_mask2former (tiny, untrained) validated by sliding window and flip: per image
    mmseg's slide_inference (torch port) over transformers' semantic inference of each crop,
    resized to the label's size, averaged without softmax; confusion at the label's resolution."""
    torch = ref.torch
    F = torch.nn.functional
    import jax
    from flax import nnx

    from segjax import tasks
    from segjax.data.demo_roads import prepare_road_demo
    from segjax.engine import mesh as mesh_lib
    from segjax.models import mask2former

    lists = prepare_road_demo(tmp_path / "roads", num=8)
    sets = [("data.data_root", str(tmp_path / "roads")), ("data.train_list", lists["train"]),
            ("data.val_list", lists["val"]), ("model.size", "tiny"), ("model.num_queries", "4"),
            ("data.eval_size", "64,128"), ("eval.resize", "96,160"), ("eval.mode", "slide"), ("eval.crop", "64,64"),
            ("eval.stride", "48,40"), ("eval.flip", "true")]
    task = tasks.build(tasks.resolve(validate(apply(load_experiment("roadways_mask2former"), sets))))
    model = task.build_model(nnx.Rngs(0))
    model.eval()
    graphdef, state = nnx.split(model)
    evaluator = evaluation.make_evaluator(task, graphdef, mesh_lib.make_data_mesh(), task.cfg)
    assert evaluator.protocol.logits is False
    got = evaluation.validate_model(evaluator, state)

    outputs = jax.jit(lambda s, x: mask2former.export_forward(nnx.merge(graphdef, s), x))

    def encode_decode(crop):  # transformers' post_process_semantic_segmentation at the crop's size
        classes, masks = (torch.from_numpy(np.array(o)) for o in outputs(state, np.asarray(crop) / 255.0))
        masks = F.interpolate(masks, size=crop.shape[2:], mode="bilinear", align_corners=False)
        return torch.einsum("bqc,bqhw->bchw", classes.softmax(-1)[..., :-1], masks.sigmoid())

    num_classes = len(task.class_names)
    source, read = task.val_images()
    total, bad = 0, 0
    for entry in source:
        pair = read(entry)
        if pair is None:
            bad += 1
            continue
        image, label = pair
        height, width = label.shape
        w, h = mmcv_rescale_size((width, height), (160, 96))
        resized = torch.from_numpy(inference.resize_image(image, (h, w)).transpose(2, 0, 1)[None].astype(np.float32))
        merged = 0
        for flip in (False, True):
            x = resized.flip(3) if flip else resized
            x = F.pad(x, (0, max(64 - w, 0), 0, max(64 - h, 0)))
            scores = mmseg_slide_inference(torch, x, (64, 64), (48, 40), encode_decode, num_classes)[0][:, :, :h, :w]
            scores = F.interpolate(scores, size=(height, width), mode="bilinear", align_corners=False)
            merged = merged + (scores.flip(3) if flip else scores) / 2
        pred = merged[0].argmax(0).numpy()
        total = total + np.asarray(metrics.confusion_matrix(label, pred, num_classes, ignore_index=255))
    expected = metrics.summarize_confusion(total, list(task.class_names))
    assert bad == 0 and got["images"] == len(source) > 0 and label.shape == (128, 256)  # not the model's 64 x 128
    assert got["miou"] == pytest.approx(expected["miou"], abs=1e-6)
    assert got["pixel_accuracy"] == pytest.approx(expected["pixel_accuracy"], abs=1e-6)


MESH_SCRIPT = """
import json, sys
import jax, numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from segjax import tasks
from segjax.config import apply, load_experiment
from segjax.data.demo import write_voc_demo
from segjax.engine import evaluation
from segjax.engine.mesh import AXES

voc = write_voc_demo(sys.argv[1], num_train=1, num_val=2, size=(90, 70))
cfg = apply(load_experiment("voc_resnet"), [("data.data_root", str(voc)), ("model.size", "tiny"),
            ("model.name", "resnet18"), ("data.eval_size", "64"), ("eval.mode", "slide"), ("eval.crop", "48,48"),
            ("eval.stride", "16,24"), ("eval.batch_size", "3"), ("eval.flip", "true")])
task = tasks.build(tasks.resolve(cfg))
model = task.build_model(nnx.Rngs(0))
model.eval()
graphdef, state = nnx.split(model)
out = {}
for name, devices, shape in (("one", jax.devices()[:1], (1, 1, 1)), ("data", jax.devices(), (4, 1, 1)),
                             ("fsdp", jax.devices(), (2, 2, 1))):
    mesh = Mesh(np.asarray(devices).reshape(shape), AXES)
    evaluator = evaluation.make_evaluator(task, graphdef, mesh, task.cfg)
    placed = jax.device_put(state, NamedSharding(mesh, P()))
    out[name] = {"batch": evaluator.protocol.batch_size, "metrics": evaluation.validate_model(evaluator, placed)}
print("RESULT", json.dumps(out))
"""


def test_protocol_on_four_devices_matches_one(tmp_path):
    """The crops split over the mesh's batch axes (the batch rounded up to them), scores gathered
    back: the same metrics as on one device."""
    import os
    import subprocess
    import sys

    from helpers import ROOT

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT, str(tmp_path / "voc")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT")).removeprefix("RESULT "))
    assert [result[k]["batch"] for k in ("one", "data", "fsdp")] == [3, 4, 4]
    for layout in ("data", "fsdp"):
        for key in ("miou", "pixel_accuracy", "images"):
            assert result[layout]["metrics"][key] == pytest.approx(result["one"]["metrics"][key], abs=1e-6), layout
