"""What the SRLoRA paper uses and reports (its setup and its tables), for presets and tables."""

from __future__ import annotations

# The paper's GLUE hyper-parameters (DeBERTa-v3-base; its Table 2):
# task -> (r_target, epochs, batch size, learning rate). r = alpha = 8, gamma = 0.5.
GLUE_HPARAMS: dict[str, tuple[int, int, int, float]] = {
    "sst2": (512, 20, 16, 3e-5),
    "mrpc": (256, 20, 32, 2e-4),
    "cola": (256, 20, 16, 1e-4),
    "qnli": (128, 10, 32, 1e-4),
    "rte": (16, 50, 16, 1e-4),
    "stsb": (32, 20, 8, 1e-4),
}

# The paper's GLUE dev scores (DeBERTa-v3-base), as printed: task -> method -> score.
GLUE_SCORES: dict[str, dict[str, str]] = {
    "sst2": {"lora": "95.9", "pissa": "95.7", "srlora": "96.1"},
    "mrpc": {"lora": "90.8/87.5", "pissa": "90.5/87.2", "srlora": "90.3/86.6"},
    "cola": {"lora": "65.4", "pissa": "64.7", "srlora": "65.1"},
    "qnli": {"lora": "94.0", "pissa": "94.4", "srlora": "93.4"},
    "rte": {"lora": "80.4", "pissa": "82.0", "srlora": "82.1"},
    "stsb": {"lora": "90.5/89.8", "pissa": "89.6/89.0", "srlora": "90.4/90.2"},
}

# The paper's ViT-B/16 accuracies (no PiSSA row): dataset -> method -> score.
VIT_SCORES: dict[str, dict[str, str]] = {
    "cifar100": {"lora": "90.06", "srlora": "92.51"},
    "stl10": {"lora": "99.62", "srlora": "99.54"},
    "mnist": {"lora": "98.89", "srlora": "94.83"},
}
