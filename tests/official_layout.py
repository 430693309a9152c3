"Checkpoints written in the official ThinkDiff runner's layout, for tests of the importer and of the pipelines."
import math
from pathlib import Path
import torch
import torch.nn as nn

# The layout the official runner writes (MiZhenxing/ThinkDiff, thinkdiff/runners/runner_clip_t5.py `_save_checkpoint`):
# {"model": state dict of the DDP-unwrapped model without its frozen parameters, "optimizer": AdamW state dict,
#  "config": OmegaConf.to_container(...) (a plain dict), "scaler": GradScaler state dict or None, "epoch": int}.
# The key names are hard-coded here, independently of the library's mapping, so the test checks the mapping too.
W0, B0, W2, B2, NORM = (f"mm_projector.{k}" for k in ("0.weight", "0.bias", "2.weight", "2.bias", "3.weight"))
TIED_ALIAS = "language_model.decoder.embed_tokens.weight"  # left in by the runner's requires_grad filter
CONFIG = {"model": {"arch": "mllama-vllm-t5-embed-decoder-2", "mm_projector_type": "mlp2x_gelu_t5_norm",
                    "dtype": "bfloat16",
                    "layer_norm_reinit_weight_with_language_encoder": True, "max_txt_len": 128},
          "run": {"task": "image_text_pretrain", "runner": "runner_clip_t5", "init_lr": 1e-4, "weight_decay": 0.05,
                  "amp": True, "amp_dtype": "bfloat16", "distributed": True, "resume_ckpt_path": None,
                  "train_splits": ["train"]},
          "datasets": {"llava_instruct_mllama_embed_2": {"batch_size": 32}}}


def projector(d_in: int, d_t5: int = 4096, seed: int = 0, dtype=torch.float32) -> dict:
    "Random official `mm_projector` tensors: Linear(d_in, d_t5), GELU, Linear(d_t5, d_t5), T5LayerNorm(d_t5)."
    g = torch.Generator().manual_seed(seed)
    return {W0: torch.randn(d_t5, d_in, generator=g) / math.sqrt(d_in), B0: torch.randn(d_t5, generator=g) * 0.1,
            W2: torch.randn(d_t5, d_t5, generator=g) / math.sqrt(d_t5), B2: torch.randn(d_t5, generator=g) * 0.1,
            NORM: torch.rand(d_t5, generator=g) + 0.5} if dtype == torch.float32 else \
        {k: v.to(dtype) for k, v in projector(d_in, d_t5, seed).items()}


def write_official(path: Path, model: dict, step_optimizer: bool = False, **extra) -> Path:
    "Write `model` in the official runner's checkpoint layout, with only plain containers."
    params = [nn.Parameter(v.detach().clone()) for k, v in model.items()
              if isinstance(k, str) and k.startswith("mm_projector.") and isinstance(v, torch.Tensor)]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.05},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0}], lr=1e-4,
                             betas=(0.9, 0.999))
    if step_optimizer:
        for p in params: p.grad = torch.randn_like(p)
        opt.step()
    torch.save({"model": dict(model), "optimizer": opt.state_dict(), "config": CONFIG,
                "scaler": torch.amp.GradScaler("cpu").state_dict(), "epoch": 39, **extra}, path)
    return path
