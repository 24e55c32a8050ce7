"""export.py: the open_clip folder loads offline in open_clip (a test-only dependency) and gives this
project's embeddings, token ids and preprocessing; torchscript and state_dict exports; the
temperature; the errors, after which nothing is written."""

from __future__ import annotations

import json
import math

import numpy as np
import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoTokenizer, DistilBertConfig

import clip
import export
from data.transforms import eval_transform, pre_caption
from models.model_clip import MEAN, STD, build_model
from tiny_run import tiny_run_args

TOL = 1e-5


@pytest.fixture(scope="module")
def checkpoint(tiny_dataset, tmp_path_factory):
    """A real checkpoint of a one-epoch clip run with a learned temperature (the tiny synthetic model)."""
    out = tmp_path_factory.mktemp("run") / "clip"
    assert clip.main(tiny_run_args(tiny_dataset, out, ita_type="clip", learnable_temp=True, epochs=1)) == 0
    return out / "checkpoint_0.pth"


@pytest.fixture(scope="module")
def ours(checkpoint):
    return export.load_model(checkpoint)


@pytest.fixture(scope="module")
def open_clip_dir(checkpoint, tmp_path_factory):
    return export.export(checkpoint, "open_clip", tmp_path_factory.mktemp("export") / "open_clip")


def sample_images(tiny_dataset, n: int = 6) -> list[Image.Image]:
    """Test images of the tiny dataset, enlarged to other sizes so that the resize matters."""
    paths = sorted((tiny_dataset / "images" / "test").glob("*.jpg"))[:n]
    return [Image.open(p).convert("RGB").resize((45 + 7 * i, 60 - 3 * i)) for i, p in enumerate(paths)]


def sample_captions(tiny_dataset, n: int = 12) -> list[str]:
    rows = json.loads((tiny_dataset / "clip_train" / "synthetic_test.json").read_text())
    return [caption for row in rows[: n // 3] for caption in row["caption"][:3]]


def test_open_clip_gives_our_embeddings(open_clip_dir, ours, checkpoint, tiny_dataset):
    model, tokenizer, state = ours
    oc_model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{open_clip_dir}")
    oc_model.eval()
    oc_tokenizer = open_clip.get_tokenizer(f"local-dir:{open_clip_dir}")
    res, max_words = state["config"]["image_res"], state["config"]["max_words"]

    # preprocessing: PIL's bicubic resize (open_clip) and torchvision's uint8 one (ours) round a few
    # pixels to neighbouring grey levels
    images = sample_images(tiny_dataset)
    theirs = torch.stack([preprocess(im) for im in images])
    pixels = torch.stack([eval_transform(res)(im) for im in images])
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    levels = ((theirs * std + mean) * 255 - pixels.float()).abs()
    assert theirs.shape == pixels.shape and levels.max() < 1 + 1e-3 and levels.mean() < 0.05

    captions = sample_captions(tiny_dataset)
    tokens = tokenizer(
        [pre_caption(c, max_words) for c in captions],
        padding="longest",
        truncation=True,
        max_length=max_words,
        return_tensors="pt",
    )
    with torch.no_grad():
        image_diff = oc_model.encode_image((pixels / 255 - mean) / std, normalize=True) - model.encode_image(pixels)
        text_diff = oc_model.encode_text(oc_tokenizer(captions), normalize=True) - model.encode_text(
            tokens["input_ids"], tokens["attention_mask"]
        )
    print(f"max |open_clip - ours|: image {image_diff.abs().max():.2e}, text {text_diff.abs().max():.2e}")
    assert image_diff.abs().max() < TOL and text_diff.abs().max() < TOL
    assert oc_model.logit_scale.item() == pytest.approx(math.log(1 / state["loss"]["temp"].item()), rel=1e-6)
    assert oc_model.logit_bias is None


def test_open_clip_tokenizer_gives_our_token_ids(open_clip_dir, ours, tiny_dataset):
    _, tokenizer, state = ours
    max_words = state["config"]["max_words"]
    captions = [*sample_captions(tiny_dataset), "A Red  Circle, at the TOP; on blue."]
    expected = tokenizer(
        [pre_caption(c, max_words) for c in captions],
        padding="max_length",
        truncation=True,
        max_length=max_words,
        return_tensors="pt",
    )["input_ids"]
    assert torch.equal(open_clip.get_tokenizer(f"local-dir:{open_clip_dir}")(captions), expected)


def test_torchscript_and_state_dict_exports(checkpoint, ours, tmp_path):
    model, tokenizer, _ = ours
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)  # other sizes than the trace's
    tokens = tokenizer(["a big red square", "on gray, the heart up top is green and little", "x"], padding=True)
    ids, mask = torch.tensor(tokens["input_ids"]), torch.tensor(tokens["attention_mask"])
    with torch.no_grad():
        want_image, want_text = model.encode_image(images), model.encode_text(ids, mask)

        traced = torch.jit.load(str(export.export(checkpoint, "torchscript", tmp_path / "ts") / "model.pt"))
        assert (traced.encode_image(images) - want_image).abs().max() < TOL
        assert (traced.encode_text(ids, mask) - want_text).abs().max() < TOL

        # state_dict: rebuilt from timm and transformers alone, as the README shows
        folder = export.export(checkpoint, "state_dict", tmp_path / "sd")
        cfg = json.loads((folder / "export_config.json").read_text())
        weights = load_file(folder / "model.safetensors")
        visual = timm.create_model(cfg["image_encoder"], num_classes=0, **cfg["image_encoder_kwargs"]).eval()
        text = AutoModel.from_config(AutoConfig.from_pretrained(folder / "text_encoder"), add_pooling_layer=False)
        vision_proj, text_proj = (torch.nn.Linear(1, 1) for _ in range(2))
        for prefix, module in [("visual.", visual), ("text_encoder.", text.eval())]:
            module.load_state_dict({k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)})
        for name, module in [("vision_proj", vision_proj), ("text_proj", text_proj)]:
            module.weight.data, module.bias.data = weights[f"{name}.weight"], weights[f"{name}.bias"]
        pixels = (images / 255 - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
        image = F.normalize(vision_proj(visual(pixels)), dim=-1)
        text_feat = F.normalize(text_proj(text(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]), dim=-1)
    assert (image - want_image).abs().max() < TOL and (text_feat - want_text).abs().max() < TOL
    saved_tokenizer = AutoTokenizer.from_pretrained(folder / "text_encoder")
    assert saved_tokenizer("a big red square")["input_ids"] == tokenizer("a big red square")["input_ids"]


@pytest.mark.parametrize(
    ("ita_type", "loss", "scale", "bias"),
    [
        ("clip", {"temp": 0.05}, math.log(20), None),  # learned, in range
        ("clip", {"temp": 0.8}, math.log(2), None),  # learned, clamped to CLIP's 0.5
        ("fastclip_v3", {"tau": 0.04}, math.log(25), None),
        ("sogclr", {}, math.log(1 / 0.03), None),  # fixed: the configured --temp
        ("isogclr", {"tau_I": torch.full((4,), 0.2)}, math.log(1 / 0.03), None),  # per-sample: --temp
        ("siglip", {"log_scale": math.log(10.0), "bias": -10.0}, math.log(10.0), -10.0),
    ],
)
def test_logit_scale_and_bias(ita_type, loss, scale, bias):
    state = {"config": {"ita_type": ita_type, "temp": 0.03}, "loss": {k: torch.as_tensor(v) for k, v in loss.items()}}
    got_scale, got_bias = export.logit_scale_and_bias(state)
    assert got_scale == pytest.approx(scale, rel=1e-6) and got_bias == (pytest.approx(bias) if bias else None)


def test_siglip_bias_reaches_open_clip(checkpoint, tmp_path):
    state = torch.load(checkpoint, weights_only=False)
    state["config"]["ita_type"] = "siglip"
    state["loss"] = {"log_scale": torch.tensor(2.0), "bias": torch.tensor(-7.5)}
    (tmp_path / "text_encoder").symlink_to(checkpoint.parent / "text_encoder")
    torch.save(state, tmp_path / "siglip.pth")
    folder = export.export(tmp_path / "siglip.pth", "open_clip", tmp_path / "out")
    model = open_clip.create_model(f"local-dir:{folder}")
    assert model.logit_scale.item() == pytest.approx(2.0) and model.logit_bias.item() == pytest.approx(-7.5)


def test_text_projection_bias_folds_only_when_reachable(checkpoint):
    """open_clip's HF projection has no bias: it moves into the last LayerNorm's bias, which takes
    it only when the projection's weight reaches it (embed_dim <= the text width, full rank)."""
    config = torch.load(checkpoint, weights_only=False)["config"]
    text_dir = str(checkpoint.parent / "text_encoder")
    for embed_dim in (16, 48):  # the text width is 32
        model = build_model(config["image_encoder"], text_dir, embed_dim, False, config["image_encoder_kwargs"])
        torch.nn.init.normal_(model.text_proj.bias)
        if embed_dim == 16:
            name, shift = export._text_bias_shift(model)
            assert name == "encoder.layer.0.output.LayerNorm.bias"
            assert torch.allclose(model.text_proj.weight.double() @ shift, model.text_proj.bias.double())
        else:
            with pytest.raises(export.ExportError, match="text projection's bias is not reachable from its 32 inputs"):
                export._text_bias_shift(model)


def distilbert_checkpoint(checkpoint, folder):
    """A checkpoint whose text encoder (DistilBERT) open_clip's HF tower cannot pool as ours does."""
    text_dir = folder / "text_encoder"
    tokenizer = AutoTokenizer.from_pretrained(checkpoint.parent / "text_encoder")
    tokenizer.save_pretrained(text_dir)
    DistilBertConfig(vocab_size=len(tokenizer), dim=32, n_layers=1, n_heads=2, hidden_dim=64).save_pretrained(text_dir)
    config = {**torch.load(checkpoint, weights_only=False)["config"], "text_encoder": str(text_dir)}
    model = build_model(
        config["image_encoder"], str(text_dir), config["embed_dim"], False, config["image_encoder_kwargs"]
    )
    torch.save({"model": model.state_dict(), "config": config}, folder / "checkpoint_0.pth")
    return folder / "checkpoint_0.pth"


@pytest.mark.parametrize("case", ["missing", "not_a_checkpoint", "distilbert", "out_not_empty"])
def test_errors_name_the_problem_and_write_nothing(case, checkpoint, tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    out, fmt = tmp_path / "out", "open_clip"
    if case == "missing":
        path, message = work / "nope.pth", f"error: checkpoint {work / 'nope.pth'} does not exist"
    elif case == "not_a_checkpoint":
        path, message = work / "notes.pth", f"error: {work / 'notes.pth'} is not a checkpoint ("
        path.write_text("not a checkpoint")
    elif case == "distilbert":
        path = distilbert_checkpoint(checkpoint, work)
        message = "error: cannot export to open_clip: the text encoder is a 'distilbert' model; open_clip's"
    else:
        path, message = checkpoint, f"error: --out {out} already exists and is not an empty folder"
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert export.main(["--checkpoint", str(path), "--format", fmt, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no folder, no temporary left behind
    if case == "distilbert":  # the formats that need no open_clip config take it
        assert export.main(["--checkpoint", str(path), "--format", "state_dict", "--out", str(out)]) == 0
        assert np.isclose(json.loads((out / "export_config.json").read_text())["logit_scale"], math.log(1 / 0.05))
