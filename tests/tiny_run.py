"""clip.py flags for seconds-long runs on the ``tiny_dataset`` fixture (see conftest.py)."""

# Settings under which the tiny run really learns (test r_mean about 40-65 against about 12 for
# the untrained model, in about 8 s): 8 epochs of 24 steps at batch 16, a wider image tower,
# and for isogclr a rho below log(B - 1) = 2.7 and a temperature step small for G ~ 2.
LEARNING = {
    "image_encoder_kwargs": "{img_size: 32, patch_size: 8, embed_dim: 64, depth: 2, num_heads: 2}",
    "epochs": 8,
    "batch_size_train": 16,
    "lr": 3e-3,
    "warmup_steps": 20,
    "rho_init": 2.0,
    "eta_init": 0.002,
}


def tiny_run_args(root, output_dir, **overrides) -> list[str]:
    """clip.py flags for a seconds-long run on ``tiny_dataset`` (the real code paths, tiny sizes)."""
    values = {
        "data_path": str(root),
        "train_data": "train",
        "data_size": 400,
        "ann_path": "clip_train",
        "val_coco_file": "synthetic_val.json",
        "test_coco_file": "synthetic_test.json",
        "coco_image_root": "images",
        "image_encoder": "vit_tiny_patch16_224",
        "image_encoder_kwargs": "{img_size: 32, patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}",
        "text_encoder": str(root / "text_encoder"),
        "image_res": 32,
        "embed_dim": 16,
        "max_words": 45,
        "epochs": 2,
        "batch_size_train": 32,
        "batch_size_test": 64,
        "lr": 1e-3,
        "workers": 0,
        "log_every": 2,
        "device": "cpu",
        "output_dir": str(output_dir),
        "temp": 0.05,
        "tau_init": 0.05,
        "rho_init": 3.0,
        **overrides,
    }
    args = []
    for key, value in values.items():
        if value is True:
            args.append(f"--{key}")
        elif value is not None and value is not False:
            args += [f"--{key}", str(value)]
    return args
